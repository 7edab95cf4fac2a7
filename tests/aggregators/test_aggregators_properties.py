import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coevo.aggregators import (
    AGGREGATORS,
    AdaptiveClip,
    CenteredClip,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    clip_rows,
)

ANY_FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
HONEST_FLOAT = st.floats(-1e3, 1e3, width=32)


def _cohort(draw, max_corrupted):
    """Honest rows, then corrupted rows; returns (all rows, honest rows)."""
    total = draw(st.integers(1, 12))
    corrupted = draw(st.integers(0, max_corrupted(total)))
    dim = draw(st.integers(1, 4))
    honest = draw(hnp.arrays(np.float32, (total - corrupted, dim), elements=HONEST_FLOAT))
    bad = draw(hnp.arrays(np.float32, (corrupted, dim), elements=ANY_FLOAT))
    order = draw(st.permutations(range(total)))
    rows = torch.from_numpy(np.concatenate([honest, bad]))[list(order)]
    return rows, torch.from_numpy(honest)


def _within_honest_range(result, honest):
    low, high = honest.min(0).values.double(), honest.max(0).values.double()
    slack = 1e-6 * (high.abs() + low.abs()) + 1e-30
    value = result.double()
    assert bool(torch.isfinite(value).all())
    assert bool(((value >= low - slack) & (value <= high + slack)).all())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_median_stays_within_the_honest_range_while_under_half_are_corrupted(data):
    rows, honest = _cohort(data.draw, lambda total: (total - 1) // 2)
    result, _ = Median().aggregate(rows, torch.ones(len(rows)), {})
    _within_honest_range(result, honest)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from([0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_stays_within_the_honest_range_up_to_the_trimmed_count(data, trim):
    rows, honest = _cohort(data.draw, lambda total: math.floor(trim * total + 1e-9))
    result, _ = TrimmedMean({"trim": trim}).aggregate(rows, torch.ones(len(rows)), {})
    _within_honest_range(result, honest)


def test_median_of_an_even_count_averages_the_two_middle_values():
    rows = torch.tensor([[1.0], [4.0], [2.0], [100.0]])
    assert Median().aggregate(rows, torch.ones(4), {})[0].item() == 3.0


@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(3, 20),
    byzantine_share=st.floats(0.0, 0.5),
    dim=st.integers(1, 8),
    collude=st.booleans(),
    distance=st.floats(10.0, 1e6),
    seed=st.integers(0, 2**31 - 1),
)
def test_krum_selects_an_honest_update_when_f_is_below_half_of_n_minus_2(
    total, byzantine_share, dim, collude, distance, seed
):
    byzantine = min(math.floor(byzantine_share * total), (total - 3) // 2)
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=generator) * 5
    honest = center + 0.01 * (2 * torch.rand(total - byzantine, dim, generator=generator) - 1)
    directions = torch.randn(byzantine, dim, generator=generator)
    if collude:
        directions = directions[:1].expand(byzantine, dim)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp(min=1e-12)
    bad = center + distance * directions
    rows = torch.cat([honest, bad])[torch.randperm(total, generator=generator)]
    share = (byzantine + 0.5) / total
    chosen, _ = Krum({"byzantine_share": share}).aggregate(rows, torch.ones(total), {})
    assert bool((honest == chosen).all(dim=1).any())
    averaged, _ = MultiKrum({"byzantine_share": share}).aggregate(rows, torch.ones(total), {})
    assert float((averaged - center).norm()) <= 0.01 * math.sqrt(dim) + 1e-5


@settings(max_examples=200, deadline=None)
@given(
    rows=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=50),
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    ),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_norms_never_exceed_the_bound(rows, max_norm):
    vectors = torch.from_numpy(rows)
    clipped = clip_rows(vectors, max_norm)
    assert bool((torch.linalg.vector_norm(clipped.double(), dim=1) <= max_norm).all())
    inside = torch.linalg.vector_norm(vectors.double(), dim=1) <= max_norm
    assert torch.equal(clipped[inside], vectors[inside])


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(1, 12),
    tau=st.one_of(st.none(), st.floats(1e-3, 10.0)),
    scale=st.floats(1e-2, 1e4),
)
def test_centred_clipping_moves_at_most_tau_per_iteration(seed, count, tau, scale):
    generator = torch.Generator().manual_seed(seed)
    rows = scale * torch.randn(count, 5, generator=generator)
    center = torch.randn(5, generator=generator)
    aggregator = CenteredClip({"tau": tau, "iterations": 1})
    radius = float(aggregator.radius(rows - center))
    moved, state = aggregator.aggregate(
        rows, torch.rand(count, generator=generator), {"center": center}
    )
    # Beyond tau only by float32 rounding of the centre's coordinates.
    rounding = 1e-6 * float(center.abs().sum() + moved.abs().sum())
    assert float((moved - center).double().norm()) <= radius * (1 + 1e-5) + rounding
    assert torch.equal(state["center"], moved)


def test_centred_clipping_ignores_a_far_outlier_that_the_mean_follows():
    rows = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [1e6, 1e6]])
    moved, _ = CenteredClip({"iterations": 20}).aggregate(
        rows, torch.ones(4), {"center": torch.zeros(2)}
    )
    assert float((moved - torch.tensor([1.0, 0.0])).norm()) < 0.5


def test_adaptive_clip_starts_at_the_median_norm_and_tracks_the_quantile():
    aggregator = AdaptiveClip({"quantile": 0.5, "lr": 0.2})
    rows = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    merged, state = aggregator.aggregate(rows, torch.ones(5), aggregator.init_state(5))
    assert float(merged.max()) <= 3.0 / 5 * (1 + 1e-5)
    start = state["clip_norm"] / math.exp(-0.2 * (3 / 5 - 0.5))
    assert math.isclose(float(start), 3.0, rel_tol=1e-6)
    small = {"clip_norm": torch.tensor(10.0, dtype=torch.float64)}
    assert float(aggregator.aggregate(rows[:4], torch.ones(4), small)[1]["clip_norm"]) < 10.0
    large = {"clip_norm": torch.tensor(0.5, dtype=torch.float64)}
    assert float(aggregator.aggregate(rows[:4], torch.ones(4), large)[1]["clip_norm"]) > 0.5


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_returns_one_finite_update_of_the_right_size(name):
    rows = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    aggregator = AGGREGATORS.get(name)()
    merged, state = aggregator.aggregate(rows, torch.arange(1.0, 8.0), aggregator.init_state(11))
    assert merged.shape == (11,)
    assert bool(torch.isfinite(merged).all())
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
