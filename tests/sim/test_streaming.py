"""Streaming mode: sessions cover the device period exactly, the cloud's replay never reads it,
and a run's requests, bytes and quality equal what a device-by-device recount gives."""

import pytest
import torch

from coevo.policies import Always, Never, Periodic
from coevo.sim.streaming import (
    QUALITY,
    device_stream,
    replay_examples,
    replay_stream,
    request_payload,
    response_payload,
    simulate_stream,
)
from coevo.sim.wire import wire_bytes
from coevo.tasks.metrics import sampled_metrics
from coevo.testing.policy import stream_world


@pytest.fixture(scope="module")
def world():
    return stream_world(num_devices=12, seed=1)


def test_sessions_split_the_device_period_into_near_equal_chunks(world):
    split, _ = world
    stream = device_stream(split, 4)
    first = split.offsets[:-1] + split.num_cloud
    assert torch.equal(stream.starts[:, 0], first)
    assert torch.equal(stream.starts[:, -1], split.offsets[1:] - 2)  # validation, test excluded
    sizes = stream.starts.diff(dim=1)
    assert (sizes.max(1).values - sizes.min(1).values <= 1).all()


def test_the_cloud_replays_only_cloud_period_rows(world):
    split, _ = world
    stream = replay_stream(split, 4)
    cloud_end = split.offsets[:-1] + split.num_cloud
    assert (stream.starts[:, -1] <= cloud_end).all()
    assert (stream.starts[:, 0] > split.offsets[:-1]).all()  # some history before the replay


def test_requests_and_bytes_equal_the_payloads_sent(world):
    split, model = world
    stream = device_stream(split, 5)
    result = simulate_stream(Periodic(Periodic.Config(every=2)), model, split, stream)
    response = wire_bytes(response_payload(model.item_vectors()[0]))
    for device, rows in enumerate(stream.starts):
        sent = [
            wire_bytes(request_payload(split.history(rows[s : s + 1], 5)[0], split.num_items))
            for s in (2, 4)
        ]
        assert result.bytes_up[device] == sum(sent)
        assert result.bytes_down[device] == 2 * response
    assert torch.equal(result.policy_state["requests"], result.requests)
    assert result.summary()["request_share"] == pytest.approx(2 / 5)


def test_quality_is_each_event_ranked_with_the_representation_held_then(world):
    split, model = world
    stream = device_stream(split, 3)
    items = model.item_vectors()
    for policy, refreshed in ((Always(), True), (Never(), False)):
        result = simulate_stream(policy, model, split, stream)
        for device in range(split.num_devices):
            values = []
            for session in range(3):
                start, end = stream.starts[device, session : session + 2].tolist()
                trigger = start if refreshed else int(stream.starts[device, 0])
                user = model.user_vectors(split.history(torch.tensor([trigger]), 5))[0]
                for row in range(start, end):
                    candidates = torch.cat([split.items[row : row + 1], split.negatives[device]])
                    values.append(sampled_metrics((items[candidates] @ user)[None], ks=(10,)))
            for name in QUALITY:
                want = torch.cat([v[name] for v in values]).mean()
                assert result.quality[name][device] == pytest.approx(float(want), abs=1e-6)


def test_replay_labels_no_gain_for_parameters_that_are_already_fresh(world):
    split, model = world
    features, gain = replay_examples(model, split, replay_stream(split, 3))
    fresh = features["age"] == 0
    assert fresh.any() and (~fresh).any()
    assert torch.equal(gain[fresh], torch.zeros(int(fresh.sum())))
    assert (features["log_new"][fresh] == 0).all()
    assert (gain[~fresh] != 0).any()


def test_bad_streams_are_refused_with_the_field_named(world):
    split, model = world
    with pytest.raises(ValueError, match="num_sessions"):
        device_stream(split, 0)
    with pytest.raises(ValueError, match="share"):
        replay_stream(split, 3, share=1.5)
    other = stream_world(num_devices=5)[0]
    with pytest.raises(ValueError, match="devices"):
        simulate_stream(Always(), model, split, device_stream(other, 3))
