"""Conformance checks that every Strategy and Codec must pass, after river's ``check_estimator``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from torch.func import vmap

from coevo.codecs.base import Codec, Tensors, encoded_bytes
from coevo.sim.batching import cohort_batch
from coevo.sim.executor import Backend
from coevo.sim.simulator import SimulationResult, select_cohort, simulate
from coevo.sim.wire import wire_bytes
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.tasks.protocol import Period
from coevo.tasks.recommendation import RecommendationTask
from coevo.testing.fixtures import tiny_task
from coevo.types import CloudState, DeviceState, Payload

__all__ = ["check_codec", "check_strategy"]

Named = Mapping[str, Tensor]


@contextmanager
def _checking(subject: str) -> Iterator[SimpleNamespace]:
    """Reports a failure in the block against ``checks.property`` (and ``checks.where``)."""
    checks = SimpleNamespace(property="init", where="")
    try:
        yield checks
    except Exception as error:
        cause = "" if isinstance(error, AssertionError) else f"{type(error).__name__}: "
        failed = f"{subject} fails {checks.property!r}{checks.where}"
        raise AssertionError(f"{failed}: {cause}{error}") from error


def _expect(condition: bool, message: str) -> None:
    # An explicit raise, as ``assert`` statements vanish under ``python -O``.
    if not condition:
        raise AssertionError(message)


def _mismatch(actual: Named, want: Named, atol: float | None = 0.0) -> str | None:
    """How ``actual`` differs from ``want`` (in values too unless ``atol`` is None), or None."""
    if actual.keys() != want.keys():
        return f"names {sorted(actual)} != {sorted(want)}"
    for name, b in want.items():
        a = actual[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{name} is {a.dtype}{list(a.shape)}, not {b.dtype}{list(b.shape)}"
        if atol is None:
            continue
        # NaN equals NaN: a state that holds NaN is still reproduced exactly.
        floating = b.is_floating_point()
        if not (torch.allclose(a, b, 0.0, atol, True) if floating else torch.equal(a, b)):
            gap = float((a.double() - b.double()).abs().nan_to_num(torch.inf).max())
            return f"{name} differs by up to {gap:.3g} (atol {atol:g})"
    return None


def _same(actual: Named, want: Named, what: str, atol: float | None = 0.0) -> None:
    problem = _mismatch(actual, want, atol)
    _expect(problem is None, f"{what}: {problem}")


def _joined(**groups: Named) -> dict[str, Tensor]:
    return {f"{group}/{k}": t for group, tensors in groups.items() for k, t in tensors.items()}


def _stack(dicts: Sequence[Named]) -> dict[str, Tensor]:
    return {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]}


def _unchanged(what: str, call: Callable[[], Any], **inputs: Named) -> Any:
    """``call()``, checking that it leaves the tensors of ``inputs`` as they were."""
    before = {name: tensor.clone() for name, tensor in _joined(**inputs).items()}
    result = call()
    _same(_joined(**inputs), before, f"{what} changed its inputs")
    return result


def _with_answer(
    strategy: Strategy, cloud: CloudState, payload: Payload, state: DeviceState, one: DeviceBatch
) -> tuple[DeviceState, int, int]:
    """Device 0's state with its ``answer``, and the bytes of its query and answer."""
    inputs = {"payload": payload.tensors, "state": state.tensors, "batch": one.inputs}
    query = _unchanged("query", partial(strategy.query, payload, state, one), **inputs)
    stacked = Payload({name: tensor[None] for name, tensor in query.tensors.items()})
    call = partial(strategy.answer, cloud, torch.arange(1), stacked)
    answer = _unchanged("answer", call, cloud=cloud.tensors, queries=stacked.tensors)
    own = {name: tensor[0] for name, tensor in answer.tensors.items()}
    return state.with_tensors(**own), wire_bytes(query), wire_bytes(Payload(own))


def _verbs_leave_inputs(
    strategy: Strategy, period: Period, cloud: CloudState
) -> tuple[Payload, int, int]:
    """Calls ``downlink``, ``local`` (on device 0) and ``merge`` directly (with ``query`` and
    ``answer`` first when the strategy exchanges); returns the uplink and the bytes of the
    query and the answer."""
    task, local = strategy.task, strategy.config.local
    payload = _unchanged("downlink", partial(strategy.downlink, cloud, 0), cloud=cloud.tensors)
    rows, offsets = task.device_rows(period)
    sizes = {"epochs": local.epochs, "batch_size": local.batch_size}
    sparse = getattr(task, "sparse_inputs", None)
    batch = cohort_batch(task, rows, offsets, torch.arange(1), seed=0, sparse=sparse, **sizes)
    state = DeviceState({k: v[0] for k, v in strategy.init_devices(cloud, 1).tensors.items()})
    one = batch.device(0)
    exchanged = (state, 0, 0)
    if strategy.exchanges:
        exchanged = _with_answer(strategy, cloud, payload, state, one)
    state = exchanged[0]
    inputs = {"payload": payload.tensors, "state": state.tensors, "batch": one.inputs}
    call = partial(strategy.local, payload, state, one)
    uplink = _unchanged("local", call, **inputs, mask={"": one.mask})[0]
    stacked = Payload({name: tensor[None] for name, tensor in uplink.tensors.items()})
    merge = partial(strategy.merge, cloud, stacked, (offsets[1:2] - offsets[:1]).float())
    _unchanged("merge", merge, cloud=cloud.tensors, uplinks=stacked.tensors)
    return uplink, exchanged[1], exchanged[2]


def _simulate(
    strategy: Strategy, seed: int, per_round: int | None, backend: Backend
) -> tuple[SimulationResult, Tensor]:
    """A run from ``seed``, and who took part in it, ``[rounds, num_devices]``."""
    num_devices, rng = strategy.task.num_devices, torch.Generator().manual_seed(seed)
    # Cohorts come from a generator of their own, so that participation is known exactly.
    picker, taken = torch.Generator(), torch.zeros(strategy.rounds, num_devices, dtype=torch.bool)

    def select(round: int) -> Tensor:
        cohort = select_cohort(torch.arange(num_devices), per_round, picker.manual_seed(round))
        taken[round, cohort] = True
        return cohort

    result = simulate(strategy, rng, backend=backend, block_size=3, select=select)
    return result, taken


def _final(run: SimulationResult) -> dict[str, Tensor]:
    traffic = {"down": run.bytes_down, "up": run.bytes_up}
    return _joined(cloud=run.cloud.tensors, devices=run.devices.tensors, bytes=traffic)


def _bytes_reported(
    strategy: Strategy, run: SimulationResult, taken: Tensor, up: int, answer: int = 0
) -> None:
    """Each device's bytes against the real payloads' ``wire_bytes`` times its rounds.

    ``up`` includes the query and ``answer`` is the answer of a strategy that exchanges.
    """
    sizes = [wire_bytes(strategy.downlink(run.cloud, r)) + answer for r in range(strategy.rounds)]
    down, rounds = torch.tensor(sizes, dtype=torch.long), taken.long()
    if taken.any() or not strategy.rounds:
        want = {"down": (rounds * down[:, None]).sum(0), "up": rounds.sum(0) * up}
        _same({"down": run.bytes_down, "up": run.bytes_up}, want, "bytes per device")
        return
    # A driver that picks no cohort per round (the asynchronous one) hides participation: then
    # each device must show whole payloads, and no more uplinks than downlinks.
    counts = torch.stack([run.bytes_down / max(sizes[0], 1), run.bytes_up / max(up, 1)])
    whole = bool((counts == counts.round()).all() and (counts[1] <= counts[0]).all())
    _expect(whole, f"payloads down, up per device: {counts.tolist()}")


def _score(strategy: Strategy, cloud: CloudState, devices: DeviceState) -> Tensor:
    """Finite test-candidate scores of the first three devices, as the evaluation asks."""
    split, block = strategy.task.split, min(3, strategy.task.num_devices)
    history = split.history(split.target_rows("test")[:block], strategy.task.history_len)
    state = type(devices)({name: tensor[:block] for name, tensor in devices.tensors.items()})
    candidates = split.candidates("test")[:block]
    with torch.no_grad():
        scores = strategy.score(cloud, state, history, candidates)
    _expect(scores.shape == candidates.shape, f"scores of shape {list(scores.shape)}")
    _expect(bool(torch.isfinite(scores).all()), "non-finite scores")
    return scores


def check_strategy(
    strategy_cls: type[Strategy],
    config: BaseModel | Mapping[str, Any] | None = None,
    *,
    task: RecommendationTask | None = None,
    rounds: int = 2,
    devices_per_round: int | None = None,
    atol: float = 1e-5,
) -> None:
    """Checks a strategy's contract; raises AssertionError naming it and the property it breaks.

    Properties: no input mutation, determinism, vectorized == loop, bytes reported, score and
    state round-trip (device-side ones skipped when ``local_period`` is ``None``). Backends agree
    within ``atol``, not exactly: ``vmap`` sums float32 reductions in another order than a loop.

    Args:
        strategy_cls: the strategy class under test.
        config: its ``Config`` or a mapping that validates as one; keep its epochs small.
        task: the task to run on; ``tiny_task()`` when ``None``.
        rounds: replaces the config's ``rounds`` where it has that field.
        devices_per_round: devices per round; ``None`` is full participation.
        atol: absolute tolerance of ``vectorized == loop``.

    Example:
        >>> from coevo.strategies import FedAvg
        >>> check_strategy(FedAvg, {"local": {"epochs": 1, "lr": 0.5, "optimizer": "sgd"}})
    """
    task = tiny_task() if task is None else task
    values = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
    rounds_field = {"rounds": rounds} if "rounds" in strategy_cls.Config.model_fields else {}
    settings = strategy_cls.Config.model_validate(values | rounds_field)
    strategy, uplink, per_round = strategy_cls(task, settings), Payload(), devices_per_round
    query_bytes = answer_bytes = 0
    trains = strategy.local_period is not None
    with _checking(f"strategy {strategy_cls.name!r}") as checks:
        rng = torch.Generator().manual_seed(0)
        cloud = strategy.init(rng)
        drew = not torch.equal(rng.get_state(), torch.Generator().manual_seed(0).get_state())
        if strategy.local_period is not None:
            checks.property = "no input mutation"
            uplink, query_bytes, answer_bytes = _verbs_leave_inputs(
                strategy, strategy.local_period, cloud
            )
        checks.property = "simulate"
        first, taken = _simulate(strategy, 0, per_round, "vectorized")
        checks.property = "determinism"
        # The same instance again, so that state kept on ``self`` between runs shows up.
        again = _simulate(strategy, 0, per_round, "vectorized")[0]
        _same(_final(again), _final(first), "final states from the same seed")
        if drew or trains:
            other = _simulate(strategy, 1, per_round, "vectorized")[0]
            cloud_moved = _mismatch(other.cloud.tensors, first.cloud.tensors) is not None
            devices_moved = _mismatch(other.devices.tensors, first.devices.tensors) is not None
            _expect(cloud_moved or (devices_moved and not drew), "seed 1 gives seed 0's states")
        if trains:
            checks.property = "vectorized == loop"
            loop = _simulate(strategy_cls(task, settings), 0, per_round, "loop")[0]
            _same(_final(loop), _final(first), "final states and bytes", atol)
        checks.property = "bytes reported"
        up = wire_bytes(uplink) + query_bytes
        _bytes_reported(strategy, first, taken, up, answer_bytes)
        checks.property = "score"
        scores = _score(strategy, first.cloud, first.devices)
        checks.property = "state round-trip"
        cloud = type(first.cloud).from_bytes(first.cloud.to_bytes())
        devices = type(first.devices).from_bytes(first.devices.to_bytes())
        _same(_final(replace(first, cloud=cloud, devices=devices)), _final(first), "states")
        _same({"": _score(strategy, cloud, devices)}, {"": scores}, "scores from them")


def _codec_input(template: Named, round: int, device: int) -> dict[str, Tensor]:
    """Device ``device``'s tensors in ``round``: the template itself first, then seeded draws."""
    generator = torch.Generator().manual_seed(1000 * round + device)
    draws = {k: torch.randn(t.shape, generator=generator).to(t.dtype) for k, t in template.items()}
    floating = {k: v for k, v in draws.items() if template[k].is_floating_point()}
    return dict(template) if round == device == 0 else {**template, **floating}


def _encoded(encode: Callable[..., tuple[Tensors, Tensors]], x: Named, state: Named) -> Tensors:
    """``encode``'s wire and new state in one mapping, as ``wire/...`` and ``state/...``."""
    wire, new_state = encode(x, state)
    return _joined(wire=wire, state=new_state)


def check_codec(codec: Codec, template: Named, *, rounds: int = 3) -> None:
    """Checks a codec's contract; raises AssertionError naming it and the property it breaks.

    Three devices encode for ``rounds`` rounds; device 0 starts with the template's values.
    Properties: no input mutation, determinism, decoded like the template, error bound (within
    ``codec.bound`` from a fresh state), bytes reported (decode reads nothing but the counted
    wire), vmap == loop (exactly) and state round-trip (through safetensors).

    Args:
        codec: the codec under test.
        template: tensors with the names, shapes and dtypes the codec will be given.
        rounds: rounds of encoding, to exercise state carried from round to round.

    Example:
        >>> import torch
        >>> from coevo.codecs import Int8
        >>> check_codec(Int8(), {"w": torch.randn(4, 5), "ids": torch.arange(3)})
    """
    with _checking(f"codec {codec!r}") as checks:
        states = [codec.init_state(template) for _ in range(3)]
        for round in range(rounds):
            inputs = [_codec_input(template, round, device) for device in range(3)]
            results = []
            for device, (x, state) in enumerate(zip(inputs, states, strict=True)):
                checks.where = f" (device {device}, round {round})"
                checks.property = "no input mutation"
                encode = partial(codec.encode, x, state)
                wire, new_state = _unchanged("encode", encode, x=x, state=state)
                out = _unchanged("decode", partial(codec.decode, wire, x), wire=wire)
                checks.property = "determinism"
                encoded = _joined(wire=wire, state=new_state)
                _same(_encoded(codec.encode, x, state), encoded, "a second encode")
                _same(codec.decode(wire, x), out, "a second decode")
                checks.property = "decoded like the template"
                _same(out, x, "decode(encode(x))", atol=None)
                checks.property = "error bound"
                bound = codec.bound(x) if round == 0 or not state else None
                for name, limit in (bound or {}).items():
                    excess = float(((out[name].double() - x[name].double()).abs() - limit).max())
                    _expect(excess <= 0, f"{name} exceeds its bound by {excess:.3g}")
                checks.property = "bytes reported"
                size = len(Payload(wire).to_bytes())
                _expect(encoded_bytes(wire) == size, f"encoded_bytes != {size}")
                checks.property = "state round-trip"
                saved = save_safetensors({k: v.contiguous() for k, v in new_state.items()})
                restored = load_safetensors(saved)
                _same(restored, new_state, "state through safetensors")
                upcoming = _codec_input(template, round + 1, device)
                next_encode = _encoded(codec.encode, upcoming, new_state)
                _same(_encoded(codec.encode, upcoming, restored), next_encode, "next encode")
                results.append((wire, out, encoded, restored))
            checks.where = f" (round {round})"
            checks.property = "bytes reported"
            for device, (x, (wire, out, _, _)) in enumerate(zip(inputs, results, strict=True)):
                # A decode that changes once other devices have encoded reads a side channel.
                _same(codec.decode(wire, x), out, f"device {device}'s wire decoded later")
            checks.property = "vmap == loop"
            stacked = _encoded(vmap(codec.encode), _stack(inputs), _stack(states))
            for device, (_, _, encoded, _) in enumerate(results):
                _same({k: v[device] for k, v in stacked.items()}, encoded, f"device {device}")
            states = [restored for *_, restored in results]
