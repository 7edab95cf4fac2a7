"""SecAgg+: the cloud gets the exact fixed-point sum, sees only uniform-looking vectors, and
recovers from drop-outs up to the threshold."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from coevo.codecs import Chain, ClipNorm, FixedPoint
from coevo.codecs.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    encode_fixed,
    neighbour_degree,
    neighbour_graph,
    neighbour_threshold,
    secagg_cost,
)
from coevo.codecs.shamir import shamir_combine, shamir_split
from coevo.testing.conformance import check_codec


def run_round(vectors, params, graph, before=(), after=()):
    """One round; ``before`` drop after sharing keys, ``after`` after uploading their vector.

    Returns the sum, the server, and every device's bytes up and down.
    """
    up = np.zeros(params.num_devices, dtype=np.int64)
    down = np.zeros(params.num_devices, dtype=np.int64)

    def sent(messages):
        for u, m in messages.items():
            up[u] += len(m)
        return messages

    def received(messages):
        for u, m in messages.items():
            down[u] += len(m)
        return messages

    clients = [SecAggClient(u, params, graph[u]) for u in range(params.num_devices)]
    server = SecAggServer(params, graph)
    keys = received(server.advertise(sent({u: c.advertise() for u, c in enumerate(clients)})))
    shares = received(server.share(sent({u: clients[u].share_keys(m) for u, m in keys.items()})))
    uploads = {
        u: clients[u].masked_input(vectors[u], m) for u, m in shares.items() if u not in before
    }
    requests = received(server.collect(sent(uploads)))
    answers = sent({u: clients[u].unmask(m) for u, m in requests.items() if u not in after})
    return server.unmask(answers), server, up, down


def fixed_sum(vectors, params, devices):
    codes = encode_fixed(vectors[list(devices)], params).astype(np.int64)
    if params.ring_bits == 32:
        codes = np.where(codes >= 2**31, codes - 2**32, codes)
    return codes.sum(0) / 2.0**params.scale_bits


@settings(max_examples=20, deadline=None)
@given(
    num_devices=st.integers(3, 12),
    length=st.integers(1, 40),
    sparse=st.booleans(),
    ring_bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**31),
)
def test_secure_sum_equals_the_plain_fixed_point_sum_exactly(
    num_devices, length, sparse, ring_bits, seed
):
    degree = 2 if sparse and num_devices > 3 else num_devices - 1
    params = SecAggParams(
        num_devices,
        degree,
        neighbour_threshold(degree),
        length,
        clip_range=4.0,
        ring_bits=ring_bits,
    )
    vectors = np.random.default_rng(seed).normal(0, 2, (num_devices, length))
    total, *_ = run_round(vectors, params, neighbour_graph(num_devices, degree, seed))
    assert np.array_equal(total, fixed_sum(vectors, params, range(num_devices)))


def test_a_masked_vector_looks_uniform_on_the_ring():
    params = SecAggParams(4, 3, 2, 20_000, clip_range=1.0)
    vectors = np.full((4, 20_000), 0.25)  # far from uniform: one value repeated
    _, server, *_ = run_round(vectors, params, neighbour_graph(4, 3, 0))
    top_bits = server.masked[0] >> 28
    assert stats.chisquare(np.bincount(top_bits, minlength=16)).pvalue > 1e-3
    plain_bits = encode_fixed(vectors[0], params) >> 28
    assert stats.chisquare(np.bincount(plain_bits, minlength=16)).pvalue < 1e-6
    assert not np.array_equal(server.masked[0], server.masked[1])


def test_drop_outs_up_to_the_threshold_are_recovered():
    params = SecAggParams(7, 6, 3, 16, clip_range=1.0)  # complete graph: 3 of 6 shares suffice
    graph = neighbour_graph(7, 6, 0)
    vectors = np.random.default_rng(1).uniform(-1, 1, (7, 16))
    total, *_ = run_round(vectors, params, graph, before={0, 1}, after={2})
    assert np.array_equal(total, fixed_sum(vectors, params, [2, 3, 4, 5, 6]))
    # Every survivor still hears from 3 others: exactly the threshold.
    total, *_ = run_round(vectors, params, graph, before={0, 1, 2})
    assert np.array_equal(total, fixed_sum(vectors, params, [3, 4, 5, 6]))


def test_drop_outs_beyond_the_threshold_fail_with_a_clear_error():
    params = SecAggParams(7, 6, 3, 16, clip_range=1.0)
    vectors = np.zeros((7, 16))
    with pytest.raises(SecAggError, match=r"2 of its neighbours answered, threshold is 3"):
        run_round(vectors, params, neighbour_graph(7, 6, 0), before={0, 1, 2}, after={3, 4})


def test_sparse_graph_recovers_drop_outs_on_a_larger_fleet():
    degree = 8
    params = SecAggParams(40, degree, neighbour_threshold(degree), 8, clip_range=1.0)
    graph = neighbour_graph(40, degree, 3)
    vectors = np.random.default_rng(2).uniform(-1, 1, (40, 8))
    dropped = {int(graph[0][0]), int(graph[0][1])}
    total, *_ = run_round(vectors, params, graph, before=dropped)
    assert np.array_equal(total, fixed_sum(vectors, params, sorted(set(range(40)) - dropped)))


def test_neighbour_graph_is_regular_symmetric_and_loop_free():
    graph = neighbour_graph(50, 6, 7)
    assert graph.shape == (50, 6)
    for u, row in enumerate(graph):
        assert u not in row and len(set(row.tolist())) == 6
        assert all(u in graph[v] for v in row)


def test_neighbour_degree_grows_as_log_n():
    sizes = [2**10, 2**13, 2**16, 2**19]
    degrees = [neighbour_degree(n, dropout=0.3) for n in sizes]
    steps = np.diff(degrees)
    assert all(steps > 0)
    # Equal factors of n add about equal numbers of neighbours: logarithmic, not linear, growth.
    assert steps.max() <= 2 * steps.min()
    assert degrees[-1] < 400 and degrees[-1] / sizes[-1] < 1e-3
    assert neighbour_degree(20, dropout=0.3) == 19  # small fleets use the complete graph


def test_cost_is_the_exact_length_of_the_messages():
    params = SecAggParams(10, 4, 3, 100, clip_range=1.0)
    graph = neighbour_graph(10, 4, 0)
    vectors = np.zeros((10, 100))
    cost = secagg_cost(10, 4, 100)
    _, _, up, down = run_round(vectors, params, graph)
    assert up.tolist() == [cost.bytes_up] * 10
    assert down.tolist() == [cost.bytes_down] * 10
    assert cost.round_trips == 4
    _, _, up, down = run_round(vectors, params, graph, before={3})
    assert up.max() <= cost.bytes_up and down.max() <= cost.bytes_down


def test_fixed_point_codec_is_what_the_secure_sum_adds_up():
    params = SecAggParams(5, 4, 3, 30, clip_range=2.0, scale_bits=12)
    codec = FixedPoint(clip_range=2.0, scale_bits=12)
    vectors = np.random.default_rng(4).normal(0, 1.5, (5, 30)).astype(np.float32)
    total, *_ = run_round(vectors.astype(np.float64), params, neighbour_graph(5, 4, 0))
    wires = [codec.encode({"w": torch.from_numpy(v)}, {})[0]["w::fixed"] for v in vectors]
    assert np.array_equal(total, torch.stack(wires).sum(0).double().numpy() / 2.0**12)


@pytest.mark.parametrize("codec", [FixedPoint(), Chain([ClipNorm(1.0), FixedPoint(scale_bits=20)])])
def test_fixed_point_conforms(codec):
    template = {
        "w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
        "ids": torch.arange(3),
    }
    check_codec(codec, template)


def test_shamir_needs_exactly_the_threshold():
    shares = shamir_split(123456789, [1, 2, 3, 4, 5], 3)
    assert (
        shamir_combine(list(zip([2, 4, 5], [shares[1], shares[3], shares[4]], strict=True)))
        == 123456789
    )
    assert shamir_combine(list(zip([1, 2], shares[:2], strict=True))) != 123456789


def test_parameters_that_would_wrap_the_ring_are_refused():
    with pytest.raises(ValueError, match="scale_bits"):
        SecAggParams(1000, 10, 6, 8, clip_range=10.0, scale_bits=20)
    with pytest.raises(ValueError, match="degree"):
        SecAggParams(10, 3, 2, 8)
    with pytest.raises(ValueError, match="threshold"):
        SecAggParams(10, 4, 5, 8)


def test_a_vector_of_the_wrong_length_is_refused():
    params = SecAggParams(3, 2, 2, 8)
    graph = neighbour_graph(3, 2, 0)
    with pytest.raises(SecAggError, match="expected"):
        run_round(np.zeros((3, 7)), params, graph)
