"""Step-major blocks: `scan` lifted out of the per-device vmap, devices leaving as they finish."""

from typing import Any, ClassVar

import pytest
import torch

from coevo.sim.executor import run_block
from coevo.strategies.base import DeviceBatch, Strategy
from coevo.strategies.scan import scan
from coevo.types import CloudState, DeviceState, Payload


class Accumulate:
    """``total += scale * value`` per step; ``stacked`` (when on) records each call's devices."""

    def __init__(self, stacked: bool) -> None:
        self.calls: list[int] = []
        self.stacked = self._block if stacked else None

    def __call__(self, const, carry, x):
        return {"total": carry["total"] + const["scale"] * x["value"]}

    def _block(self, const, carry, x):
        self.calls.append(len(carry["total"]))
        return {"total": carry["total"] + const["scale"] * x["value"]}


class Summing(Strategy):
    """A toy whose ``local`` runs ``scans`` scans (each starting from the last one's total),
    or none: the uplink is the weighted sum of the real examples per step."""

    name = "summing"
    local_period = "device"
    steps: ClassVar[list[Accumulate]] = []

    def __init__(self, scans: int, stacked: bool) -> None:
        super().__init__(task=None)
        self.scans, self.stacked = scans, stacked

    def init(self, rng):
        return CloudState()

    def local(self, payload: Payload, device_state: DeviceState, batch: DeviceBatch):
        sizes = batch.mask.sum(-1)
        scale = device_state["scale"]
        total = torch.zeros(())
        if self.scans == 0:
            total = scale * sizes.sum()
        for _ in range(self.scans):
            step = Accumulate(self.stacked)
            Summing.steps.append(step)
            start = {"total": total + 1.0}
            total = scan(step, {"scale": scale}, start, {"value": sizes}, sizes > 0)["total"]
        return Payload({"total": total}), DeviceState(), {"loss": total}

    def score(self, cloud, device_state, history, candidates):
        return torch.zeros(len(history), candidates.shape[-1])


def _block(step_counts: list[int]) -> tuple[DeviceState, DeviceBatch]:
    """Devices with the given step counts (unsorted), 2 examples a step, padded to the longest."""
    longest = max(step_counts)
    mask = torch.zeros(len(step_counts), longest, 2)
    for device, count in enumerate(step_counts):
        mask[device, :count] = 1.0
        mask[device, count - 1, 1] = 0.0  # a partly real last step
    batch = DeviceBatch({"x": torch.zeros(len(step_counts), longest, 2)}, mask)
    return DeviceState({"scale": torch.arange(1.0, len(step_counts) + 1)}), batch


@pytest.mark.parametrize("scans", [0, 1, 2])
@pytest.mark.parametrize("stacked", [False, True])
def test_vectorized_equals_loop_for_any_number_of_scans(scans, stacked):
    state, batch = _block([3, 1, 4, 2])
    results = {
        backend: run_block(Summing(scans, stacked), Payload(), state, batch, backend)[0]["total"]
        for backend in ("vectorized", "loop")
    }
    torch.testing.assert_close(results["vectorized"], results["loop"])
    # One scan by hand for device 0: scale 1, steps of 2, 2 and 1 real examples, from 0 + 1.
    if scans == 1:
        assert results["loop"][0].item() == 1.0 + 5.0


def test_a_block_steps_only_the_devices_with_steps_left():
    Summing.steps.clear()
    state, batch = _block([3, 1, 4, 2])
    run_block(Summing(1, stacked=True), Payload(), state, batch, "vectorized")
    # Step s runs the devices with more than s steps: 4, then 3, 2 and 1 of them.
    assert [step.calls for step in Summing.steps if step.calls] == [[4, 3, 2, 1]]


def test_a_step_that_changes_the_carry_layout_is_refused():
    class Growing(Summing):
        def local(self, payload, device_state, batch):
            def step(const, carry, x):
                return {"total": carry["total"], "extra": x["value"]}

            live = batch.mask.sum(-1) > 0
            out = scan(step, {}, {"total": torch.zeros(())}, {"value": batch.mask.sum(-1)}, live)
            return Payload({"total": out["total"]}), DeviceState(), {}

    state, batch = _block([2, 1])
    with pytest.raises(ValueError, match="carry shaped"):
        run_block(Growing(1, stacked=False), Payload(), state, batch, "vectorized")


def test_scan_without_a_runner_visits_every_step_including_padding():
    seen: list[float] = []

    def step(const: dict[str, Any], carry: dict[str, Any], x: dict[str, Any]):
        seen.append(float(x["value"]))
        return {"total": carry["total"] * 2 + x["value"]}

    out = scan(
        step,
        {},
        {"total": torch.tensor(0.0)},
        {"value": torch.tensor([1.0, 2.0, 0.0])},
        torch.tensor([True, True, False]),
    )
    assert seen == [1.0, 2.0, 0.0]
    assert out["total"].item() == 8.0


def test_a_scan_whose_inputs_every_device_shares_still_runs_per_device():
    class Counting(Summing):
        def local(self, payload, device_state, batch):
            # Nothing per-device enters the scan; only its number of live steps differs.
            ones = torch.ones(batch.mask.shape[0])
            step = Accumulate(stacked=False)
            start = {"total": torch.zeros(())}
            total = scan(step, {"scale": torch.ones(())}, start, {"value": ones}, ones > 0)
            return Payload({"total": total["total"]}), DeviceState(), {}

    state, batch = _block([3, 1])
    results = [
        run_block(Counting(1, stacked=False), Payload(), state, batch, backend)[0]["total"]
        for backend in ("vectorized", "loop")
    ]
    torch.testing.assert_close(results[0], results[1])
    assert results[1].tolist() == [3.0, 3.0]
