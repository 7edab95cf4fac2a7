import pytest
import torch
import torch.nn.functional as F

from coevo.sim.simulator import simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies import Distill
from coevo.strategies.base import seeded_model
from coevo.strategies.distill import distill_fit, distillation_loss
from coevo.tasks.models import count_parameters
from coevo.tasks.train import FitConfig, fit, windows
from coevo.testing import tiny_task

QUICK = {"epochs": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def teacher(task):
    model = seeded_model(task.cloud_model, torch.Generator().manual_seed(0))
    config = FitConfig(epochs=5, lr=0.01, window=task.shapes.cloud_history)
    return fit(model, task.split, task.rows("cloud"), config, torch.Generator().manual_seed(0))


def _kl_to_teacher(student, teacher, task):
    inputs, targets = windows(task.split, task.rows("cloud"), task.shapes.cloud_history)
    with torch.no_grad():
        teacher_log = F.log_softmax(teacher.sequence_logits(inputs), -1)
        student_log = F.log_softmax(student.sequence_logits(inputs), -1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    valid = targets < task.num_items
    return float(kl[valid].mean())


def _student(task, teacher, alpha):
    student = seeded_model(task.device_model, torch.Generator().manual_seed(1))
    before = _kl_to_teacher(student, teacher, task)
    config = FitConfig(epochs=20, lr=0.02, window=task.shapes.cloud_history)
    distill_fit(
        student,
        teacher,
        task.split,
        task.rows("cloud"),
        config,
        torch.Generator().manual_seed(0),
        temperature=1.0,
        alpha=alpha,
    )
    return before, _kl_to_teacher(student, teacher, task)


def test_distillation_moves_the_student_towards_the_teacher(task, teacher):
    before, after_kd = _student(task, teacher, alpha=0.0)
    _, after_labels_only = _student(task, teacher, alpha=1.0)
    assert after_kd < 0.85 * before
    # training on the labels alone overfits them and drifts away from the teacher
    assert after_kd < 0.5 * after_labels_only


def test_loss_mixes_cross_entropy_and_temperature_scaled_kl():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 7, generator=generator)
    teacher = torch.randn(3, 4, 7, generator=generator)
    target = torch.randint(0, 8, (3, 4), generator=generator)  # 7 is padding
    valid = target < 7
    hard = distillation_loss(student, teacher, target, temperature=3.0, alpha=1.0)
    expected = F.cross_entropy(student[valid], target[valid])
    assert torch.allclose(hard, expected, atol=1e-6)
    same = distillation_loss(student, student, target, temperature=3.0, alpha=0.0)
    assert abs(float(same)) < 1e-6
    soft = distillation_loss(student, teacher, target, temperature=3.0, alpha=0.0)
    kl = F.kl_div(
        F.log_softmax(student[valid] / 3, -1),
        F.log_softmax(teacher[valid] / 3, -1),
        log_target=True,
        reduction="batchmean",
    )
    assert torch.allclose(soft, 9.0 * kl, atol=1e-5)


@pytest.mark.parametrize("dim", [4, 12])
def test_student_width_sets_its_size_and_only_the_student_ships(task, dim):
    strategy = Distill(task, Distill.Config(dim=dim, train=QUICK, pretrain=QUICK))
    result = simulate(strategy, torch.Generator().manual_seed(0))
    facts = strategy.model_facts()
    student_params = count_parameters(strategy.model)
    assert facts["device"]["params"] == student_params
    assert result.cloud["item_embedding.weight"].shape[1] == dim
    payload = strategy.downlink(result.cloud, 0)
    assert not any(k.startswith("teacher/") for k in payload.tensors)
    assert sum(t.numel() for t in payload.tensors.values()) == student_params
    assert torch.all(result.bytes_down == wire_bytes(payload))
    assert torch.all(result.bytes_up == 0)
    assert result.devices.tensors == {}  # mode none: every device runs the shipped student
    assert strategy.rounds == 1
    assert 4 * student_params < wire_bytes(payload) < 4 * student_params + 4096


def test_wider_students_cost_more_bytes_and_flops(task):
    facts = [Distill(task, Distill.Config(dim=d)).model_facts()["device"] for d in (4, 16)]
    assert facts[1]["params"] > 3 * facts[0]["params"]
    assert facts[1]["flops_per_prediction"] > facts[0]["flops_per_prediction"]


def test_fine_tuning_after_shipping_personalises_the_student(task):
    config = Distill.Config(dim=8, train=QUICK, pretrain=QUICK, mode="head", local={"epochs": 2})
    strategy = Distill(task, config)
    result = simulate(strategy, torch.Generator().manual_seed(0))
    heads = result.devices["head.weight"]
    assert set(result.devices.tensors) == {"head.weight", "head.bias"}
    assert not torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], result.cloud["head.weight"])


def test_a_width_sweep_distils_every_student_from_one_teacher(task, teacher):
    weights = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    for dim in (4, 8):
        strategy = Distill(task, Distill.Config(dim=dim, pretrain=QUICK))
        cloud = strategy.distil(weights, torch.Generator().manual_seed(0))
        assert all(torch.equal(cloud[f"teacher/{k}"], v) for k, v in weights.items())
        assert cloud["tower.weight"].shape == (dim, dim)
    default = Distill(task).model_facts()["device"]["params"]
    assert default == count_parameters(task.device_model())
