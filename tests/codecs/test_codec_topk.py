import pytest
import torch

from coevo.codecs import TopK, encoded_bytes


def test_hand_case_sends_the_two_largest_magnitudes():
    codec = TopK(0.5, error_feedback=False)
    update = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    wire, state = codec.encode(update, codec.init_state(update))
    assert wire["w::values"].tolist() == [-3.0, 2.0]
    assert wire["w::indices"].tolist() == [1, 2]
    assert wire["w::indices"].dtype == torch.int32
    assert wire["w::values"].dtype == torch.float32
    assert codec.decode(wire, update)["w"].tolist() == [0.0, -3.0, 2.0, 0.0]
    assert state == {} and codec.init_state(update) == {}


def test_error_feedback_carries_the_residual_into_the_next_round():
    codec = TopK(0.5)
    first = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    state = codec.init_state(first)
    assert torch.equal(state["w"], torch.zeros(4))

    wire, state = codec.encode(first, state)
    assert wire["w::values"].tolist() == [-3.0, 2.0]
    assert torch.equal(state["w"], torch.tensor([0.1, 0.0, 0.0, 0.5]))

    # Round 2: 0.75 + carried 0.5 = 1.25 and 0.25 + 0 outrank the carried 0.1.
    second = {"w": torch.tensor([0.0, 0.0, 0.25, 0.75])}
    wire, state = codec.encode(second, state)
    assert wire["w::values"].tolist() == [1.25, 0.25]
    assert wire["w::indices"].tolist() == [3, 2]
    assert codec.decode(wire, second)["w"].tolist() == [0.0, 0.0, 0.25, 1.25]
    assert torch.equal(state["w"], torch.tensor([0.1, 0.0, 0.0, 0.0]))


def test_missing_residual_counts_as_zero():
    codec = TopK(0.5)
    update = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    assert torch.equal(codec.encode(update, {})[0]["w::values"], torch.tensor([-3.0, 2.0]))


def test_error_feedback_sum_of_decoded_updates_tracks_the_true_sum():
    generator = torch.Generator().manual_seed(0)
    num_entries, num_rounds = 20, 400
    drift = torch.linspace(-1.0, 1.0, num_entries)
    updates = [drift + torch.randn(num_entries, generator=generator) for _ in range(num_rounds)]
    largest_update = max(update.norm().item() for update in updates)
    fraction = 0.1
    # ||r'||² ≤ (1 - k/d)·||r + g||² gives ||r|| ≤ √(1-δ)/(1-√(1-δ))·max||g|| (Stich et al.).
    contraction = (1 - fraction) ** 0.5
    residual_limit = contraction / (1 - contraction) * largest_update

    sums = {}
    for error_feedback in (True, False):
        codec = TopK(fraction, error_feedback=error_feedback)
        template = {"w": torch.zeros(num_entries)}
        state = codec.init_state(template)
        decoded_sum = torch.zeros(num_entries)
        for update in updates:
            wire, state = codec.encode({"w": update}, state)
            decoded_sum += codec.decode(wire, template)["w"]
            if error_feedback:
                assert state["w"].norm().item() <= residual_limit
        sums[error_feedback] = decoded_sum
        if error_feedback:
            true_sum = torch.stack(updates).sum(0)
            # Nothing is lost, only delayed: the gap is exactly the residual still held.
            torch.testing.assert_close(decoded_sum + state["w"], true_sum, rtol=1e-4, atol=1e-3)

    true_sum = torch.stack(updates).sum(0)
    with_feedback = ((sums[True] - true_sum).norm() / true_sum.norm()).item()
    without_feedback = ((sums[False] - true_sum).norm() / true_sum.norm()).item()
    assert with_feedback < 0.05
    assert without_feedback > 0.5


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match=r"TopK\.fraction must be in \(0, 1\]"):
        TopK(fraction)


@pytest.mark.parametrize(
    ("fraction", "numel", "kept"),
    [(0.5, 4, 2), (0.1, 1000, 100), (0.07, 100, 7), (0.01, 10, 1), (1.0, 5, 5), (0.3, 1, 1)],
)
def test_num_kept_is_ceil_of_fraction_at_least_one(fraction, numel, kept):
    assert TopK(fraction).num_kept(numel) == kept


def test_shapes_and_scalars_round_trip_and_integers_pass_through():
    codec = TopK(1.0)
    update = {
        "matrix": torch.arange(6.0).reshape(2, 3),
        "scalar": torch.tensor(-2.5),
        "ids": torch.tensor([4, 5]),
    }
    wire, state = codec.encode(update, codec.init_state(update))
    assert set(state) == {"matrix", "scalar"}
    assert wire["ids"] is update["ids"]
    decoded = codec.decode(wire, update)
    for name, tensor in update.items():
        assert torch.equal(decoded[name], tensor)
    assert torch.equal(state["matrix"], torch.zeros(2, 3))


def test_bytes_of_top_tenth_of_1000_floats():
    update = {"w": torch.linspace(-1.0, 1.0, 1000)}
    sparse_bytes = encoded_bytes(TopK(0.1).encode(update, {})[0])
    assert sparse_bytes / encoded_bytes(update) < 0.25
