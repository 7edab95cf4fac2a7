"""Streaming mode: device-period data released as sessions, a request Policy before each.

Each device serves its device-period interactions as ``num_sessions`` equal sessions
(PROTOCOL.md P1, item 5) with a user representation that the cloud generated from the device's
history at the last request (DUET/IntellectReq's "edge-cloud collaborative dynamic
recommendation": the cloud's large model, the device's cheap dot product). Before each
session the policy decides, for every device at once, whether to ask for a fresh one, from
features the device can compute itself. The simulation accounts each device's requests and
exact wire bytes, and the quality of what it served: every event of the session ranked
against the device's 99 evaluation negatives (GAUC, NDCG@10, HR@10).

``replay_examples`` is the cloud's side of a learned policy: the same streams replayed on the
tail of each device's cloud-period data, labelled with what a fresh representation would have
gained; no device-period data is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from coevo.policies.base import FEATURE_NAMES, Policy, Requests
from coevo.sim.wire import wire_bytes
from coevo.tasks.metrics import sampled_metrics
from coevo.tasks.models import CloudModel
from coevo.tasks.protocol import P1Split
from coevo.types import DeviceState, Payload

QUALITY = ("gauc", "ndcg@10", "hr@10")
_RECENT = 5
_CHUNK = 512


class StreamModel(Protocol):
    """A cloud-generated user representation served on the device by a dot product."""

    history_len: int

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """Cloud side: ``[batch, dim]`` from histories ``[batch, length]`` (left-padded)."""
        ...

    def item_vectors(self) -> torch.Tensor:
        """Device side: the catalogue ``[num_items, dim]`` it scores with (downloaded once)."""
        ...


class CloudUserModel:
    """The cloud model's last hidden state as the user vector; scores equal the model's own."""

    def __init__(self, model: CloudModel, params: Mapping[str, torch.Tensor]) -> None:
        self.model = model.eval()
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(params[name])
        self.history_len = model.history_len

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = [
                self.model.encode(history[i : i + _CHUNK])[:, -1]
                for i in range(0, len(history), _CHUNK)
            ]
        return torch.cat(parts) if parts else torch.zeros(0, self.item_vectors().shape[1])

    def item_vectors(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.item_vectors(torch.arange(self.model.num_items))


class RecentMean:
    """User vector: the mean item vector of the last ``history_len`` items (fixed, untrained)."""

    def __init__(self, items: torch.Tensor, history_len: int) -> None:
        self.items, self.history_len = items, history_len

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        history = history[:, -self.history_len :]
        real = (history < len(self.items)).float().unsqueeze(-1)
        vectors = self.items[history.clamp(max=len(self.items) - 1)] * real
        return vectors.sum(1) / real.sum(1).clamp(min=1.0)

    def item_vectors(self) -> torch.Tensor:
        return self.items


@dataclass(frozen=True)
class Stream:
    """Sessions of each device: rows ``starts[d, s]:starts[d, s + 1]`` are session ``s``.

    Attributes:
        starts: int64 ``[num_devices, num_sessions + 1]`` global rows of the split.
        negatives: int64 ``[num_devices, C]`` the items each event is ranked against.
    """

    starts: torch.Tensor
    negatives: torch.Tensor

    @property
    def num_sessions(self) -> int:
        return self.starts.shape[1] - 1

    @property
    def num_devices(self) -> int:
        return self.starts.shape[0]


def _sessions(first: torch.Tensor, count: torch.Tensor, num_sessions: int) -> torch.Tensor:
    # Session of position p is floor(p * S / n): session s starts at ceil(s * n / S).
    s = torch.arange(num_sessions + 1)
    return first[:, None] + (s * count[:, None] + num_sessions - 1) // num_sessions


def device_stream(split: P1Split, num_sessions: int = 5) -> Stream:
    """Each device's device-period rows as ``num_sessions`` equal sessions."""
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    first = split.offsets[:-1] + split.num_cloud
    return Stream(_sessions(first, split.num_device_period, num_sessions), split.negatives)


def replay_stream(split: P1Split, num_sessions: int = 5, share: float = 1 / 3) -> Stream:
    """The last ``share`` of each device's cloud-period rows as sessions (the cloud's replay).

    The default third makes replayed sessions as long as device-period ones under P1, whose
    device period is a third of the cloud period.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    count = torch.ceil(share * split.num_cloud.double()).long().clamp(max=split.num_cloud - 1)
    first = split.offsets[:-1] + split.num_cloud - count
    return Stream(_sessions(first, count, num_sessions), split.negatives)


def device_features(
    items: torch.Tensor,
    split: P1Split,
    user: torch.Tensor,
    trigger_row: torch.Tensor,
    current_row: torch.Tensor,
    age: torch.Tensor,
    window: int,
) -> dict[str, torch.Tensor]:
    """The ``FEATURE_NAMES`` of a batch of devices, from what each device holds.

    Args:
        items: the catalogue vectors ``[num_items, dim]`` on the device.
        user: the on-device user vectors ``[batch, dim]``, generated at ``trigger_row``.
        trigger_row, current_row: int64 ``[batch]`` rows the parameters were generated
            before, and the row the next session starts at.
        age: sessions since the parameters were generated.
        window: items of history a device keeps.
    """
    num_items = len(items)
    history = split.history(current_row, window)
    index = current_row[:, None] - window + torch.arange(window)
    new = (index >= trigger_row[:, None]) & (history < num_items)
    recent = new & (torch.arange(window) >= window - _RECENT)
    logits = user @ items.T
    log_probs = F.log_softmax(logits, dim=-1)
    item_log_probs = log_probs.gather(1, history.clamp(max=num_items - 1))
    vectors = items[history.clamp(max=num_items - 1)]

    def mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.float().view(*mask.shape, *([1] * (values.dim() - mask.dim())))
        return (values * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    new_mean = mean(vectors, new)
    old = split.history(trigger_row, window)
    old_real = old < num_items
    old_mean = mean(items[old.clamp(max=num_items - 1)], old_real)
    old_log_probs = log_probs.gather(1, old.clamp(max=num_items - 1))
    old_recent = old_real & (torch.arange(window) >= window - _RECENT)
    any_new = new.any(1).float()

    def rank(positions: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        # Share of the catalogue scored above each of the last _RECENT items of ``positions``.
        tail = positions[:, -_RECENT:].clamp(max=num_items - 1)
        scored = logits.gather(1, tail)
        above = (logits.unsqueeze(1) > scored.unsqueeze(-1)).float().mean(-1)
        return mean(above, picked[:, -_RECENT:])

    uncertainty = -(log_probs.exp() * log_probs).sum(1) / torch.log(torch.tensor(num_items))
    features = {
        "age": age.float(),
        "log_new": torch.log1p((current_row - trigger_row).float()),
        "loglik_new": mean(item_log_probs, new),
        "loglik_recent": mean(item_log_probs, recent),
        "loglik_old": mean(old_log_probs, old_recent),
        "rank_recent": rank(history, recent),
        "rank_old": rank(old, old_recent),
        "new_share": new.sum(1) / (history < num_items).sum(1).clamp(min=1),
        "alignment": F.cosine_similarity(user, new_mean, dim=1, eps=1e-8) * any_new,
        "drift": (1.0 - F.cosine_similarity(new_mean, old_mean, dim=1, eps=1e-8)) * any_new,
        "uncertainty": uncertainty,
    }
    return {name: features[name] for name in FEATURE_NAMES}


def session_quality(
    items: torch.Tensor, split: P1Split, stream: Stream, user: torch.Tensor, session: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-device sums of ``QUALITY`` over session ``session``'s events, and event counts.

    Each event's item is ranked against the device's negatives by ``user @ items`` (ties
    count half, deterministically).
    """
    start, end = stream.starts[:, session], stream.starts[:, session + 1]
    counts = end - start
    device = torch.repeat_interleave(torch.arange(stream.num_devices), counts)
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts
    )
    rows = start[device] + offset
    candidates = torch.cat([split.items[rows, None], stream.negatives[device]], dim=1)
    scores = (items[candidates] * user[device].unsqueeze(1)).sum(-1)
    metrics = sampled_metrics(scores, ks=(10,)) if len(rows) else {}
    sums = {
        name: torch.zeros(stream.num_devices).index_add(0, device, metrics[name])
        if metrics
        else torch.zeros(stream.num_devices)
        for name in QUALITY
    }
    return sums, counts


@dataclass(frozen=True)
class StreamResult:
    """Per-device accounting of one policy over a stream.

    Attributes:
        actions: bool ``[num_sessions, num_devices]`` who requested before each session.
        requests: int64 ``[num_devices]``.
        bytes_up, bytes_down: int64 ``[num_devices]`` request traffic (history up, fresh
            representation down), exact wire bytes.
        setup_bytes_down: int64 ``[num_devices]`` the catalogue, first representation and the
            policy's parameters, downloaded once before the stream.
        quality: per-device mean of each ``QUALITY`` metric over the device's events.
        events: int64 ``[num_devices]`` events served.
        policy_state: the devices' policy state after the last session.
    """

    actions: torch.Tensor
    requests: torch.Tensor
    bytes_up: torch.Tensor
    bytes_down: torch.Tensor
    setup_bytes_down: torch.Tensor
    quality: Mapping[str, torch.Tensor]
    events: torch.Tensor
    policy_state: DeviceState

    def summary(self) -> dict[str, float]:
        """Fleet means: quality over devices with events, requests and bytes per device."""
        served = self.events > 0
        out = {name: float(values[served].mean()) for name, values in self.quality.items()}
        out["requests_per_device"] = float(self.requests.double().mean())
        out["request_share"] = float(self.actions.double().mean())
        out["bytes_up_per_device"] = float(self.bytes_up.double().mean())
        out["bytes_down_per_device"] = float(self.bytes_down.double().mean())
        out["setup_bytes_down_per_device"] = float(self.setup_bytes_down.double().mean())
        return out


def request_payload(history: torch.Tensor, num_items: int) -> Payload:
    """What one request sends up: the real items of the device's history, as int32 ids."""
    return Payload({"history": history[history < num_items].int()})


def response_payload(user: torch.Tensor) -> Payload:
    """What the cloud answers: the fresh user representation."""
    return Payload({"user": user.float()})


def _request_bytes(split: P1Split, rows: torch.Tensor, window: int) -> torch.Tensor:
    """Exact request bytes of each row's history (payload size depends only on its length)."""
    history = split.history(rows, window)
    lengths = (history < split.num_items).sum(1)
    sizes = torch.tensor(
        [
            wire_bytes(request_payload(torch.zeros(n, dtype=torch.long), split.num_items))
            for n in range(window + 1)
        ]
    )
    return sizes[lengths]


def simulate_stream(
    policy: Policy, model: StreamModel, split: P1Split, stream: Stream
) -> StreamResult:
    """Run ``policy`` over ``stream``: every device decides in one batch before each session."""
    num_devices, window = stream.num_devices, model.history_len
    if stream.num_devices != split.num_devices:
        raise ValueError(f"stream has {stream.num_devices} devices, the split {split.num_devices}")
    items = model.item_vectors()
    trigger = stream.starts[:, 0].clone()
    user = model.user_vectors(split.history(trigger, window))
    age = torch.zeros(num_devices, dtype=torch.long)
    state = policy.init_state(num_devices)
    devices = torch.arange(num_devices)
    sums = {name: torch.zeros(num_devices) for name in QUALITY}
    events = torch.zeros(num_devices, dtype=torch.long)
    actions = torch.zeros(stream.num_sessions, num_devices, dtype=torch.bool)
    bytes_up = torch.zeros(num_devices, dtype=torch.long)
    response = wire_bytes(response_payload(user[0])) if num_devices else 0
    for session in range(stream.num_sessions):
        current = stream.starts[:, session]
        features = device_features(items, split, user, trigger, current, age, window)
        requests = Requests(devices, torch.full((num_devices,), session), features)
        decided = policy.decide(requests, state)
        request = decided.request.bool()
        state = DeviceState(dict(decided.state.tensors))
        asked = torch.nonzero(request).squeeze(1)
        if len(asked):
            user = user.clone()
            user[asked] = model.user_vectors(split.history(current[asked], window))
            bytes_up[asked] += _request_bytes(split, current[asked], window)
            trigger = torch.where(request, current, trigger)
            age = torch.where(request, 0, age)
        actions[session] = request
        served, counts = session_quality(items, split, stream, user, session)
        for name in QUALITY:
            sums[name] += served[name]
        events += counts
        age = age + 1
    requests_made = actions.long().sum(0)
    setup = wire_bytes(Payload({"items": items, **policy.parameters()})) + response
    return StreamResult(
        actions=actions,
        requests=requests_made,
        bytes_up=bytes_up,
        bytes_down=requests_made * response,
        setup_bytes_down=torch.full((num_devices,), setup, dtype=torch.long),
        quality={name: value / events.clamp(min=1) for name, value in sums.items()},
        events=events,
        policy_state=state,
    )


def replay_examples(
    model: StreamModel, split: P1Split, stream: Stream, horizon: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The cloud's training examples for a learned policy, from a replayed stream.

    For every pair of sessions ``t <= s`` and every device with events from session ``s``
    on: the features a device would compute before ``s`` holding a representation generated
    before ``t``, and the mean GAUC that a fresh one (generated before ``s``) gains over it on
    the events of sessions ``s`` to ``s + horizon - 1`` (IntellectReq labels one step ahead,
    ``horizon = 1``; longer horizons were no better on MovieLens-100K).

    Returns:
        ``(features, gain)``: float32 tensors ``[examples]`` each.
    """
    window, items, sessions = model.history_len, model.item_vectors(), stream.num_sessions
    starts = stream.starts
    users = [model.user_vectors(split.history(starts[:, s], window)) for s in range(sessions)]
    # quality[t][s]: per-device GAUC sum on session s with the representation generated at t.
    quality = [
        [session_quality(items, split, stream, users[t], s)[0]["gauc"] for s in range(sessions)]
        for t in range(sessions)
    ]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURE_NAMES}
    gains = []
    for s in range(sessions):
        end = min(s + horizon, sessions)
        ahead = stream.starts[:, end] > stream.starts[:, s]
        events = (stream.starts[:, end] - stream.starts[:, s]).clamp(min=1)
        for t in range(s + 1):
            age = torch.full((stream.num_devices,), s - t)
            features = device_features(
                items, split, users[t], stream.starts[:, t], stream.starts[:, s], age, window
            )
            for name in FEATURE_NAMES:
                parts[name].append(features[name][ahead])
            gain = sum(quality[s][later] - quality[t][later] for later in range(s, end))
            gains.append((gain / events)[ahead])
    return {name: torch.cat(values) for name, values in parts.items()}, torch.cat(gains)
