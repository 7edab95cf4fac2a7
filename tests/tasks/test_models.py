import torch

from coevo.tasks.models import CloudModel, DeviceModel, count_parameters, flops_per_request


def test_device_sequence_logits_match_forward_on_each_prefix():
    torch.manual_seed(0)
    model = DeviceModel(num_items=30, dim=8, history_len=3, item_features=torch.rand(30, 4))
    history = torch.tensor([[30, 30, 4, 7, 1, 9, 2]])
    per_position = model.sequence_logits(history)
    for t in range(history.shape[1]):
        expected = model(history[:, : t + 1])
        assert torch.allclose(per_position[:, t], expected, atol=1e-5)


def test_device_model_scores_candidates_like_all_items():
    torch.manual_seed(0)
    model = DeviceModel(num_items=30, dim=8, history_len=4)
    history = torch.tensor([[30, 1, 2, 3], [5, 6, 7, 8]])
    candidates = torch.tensor([[0, 4, 29], [1, 2, 3]])
    everything = model(history)
    assert torch.allclose(model(history, candidates), everything.gather(1, candidates), atol=1e-6)


def test_cloud_model_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = CloudModel(num_items=40, dim=16, history_len=6, num_layers=2, num_heads=2).eval()
    history = torch.tensor([[40, 40, 1, 2, 3, 4]])
    changed = history.clone()
    changed[0, -1] = 9
    with torch.no_grad():
        a, b = model.sequence_logits(history), model.sequence_logits(changed)
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)  # the future does not leak back
        assert not torch.allclose(a[:, -1], b[:, -1])
        assert torch.isfinite(a).all()
        # more padding in front changes nothing for the real positions
        shorter = model(torch.tensor([[40, 40, 40, 40, 3, 4]]), torch.tensor([[5, 6]]))
        trimmed = model(torch.tensor([[3, 4]]), torch.tensor([[5, 6]]))
        assert torch.allclose(shorter, trimmed, atol=1e-4)


def test_sizes_and_flops_grow_with_width():
    small, large = DeviceModel(100, dim=8), DeviceModel(100, dim=16)
    assert count_parameters(large) > count_parameters(small)
    assert flops_per_request(large, 20) > flops_per_request(small, 20) > 0
    cloud = CloudModel(100, dim=16, history_len=10, num_layers=1)
    assert flops_per_request(cloud, 10) > flops_per_request(DeviceModel(100, dim=16), 10)
