"""Grouped secure aggregation in the service: G independent SecAgg+ sessions per round, one
merge over the G group means, so that a robust strategy defends under secure aggregation."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serve_helpers import asgi_client, make_app, tiny_config
from test_parity import assert_same_model
from test_secagg_service import Clock, stored_blobs

from coevo.codecs.secagg import SecAggClient, SecAggParams, decode_fixed, encode_fixed
from coevo.config import ConfigError
from coevo.serve.secagg_http import client_from_join, secagg_vector
from coevo.types import CloudState, Payload

TIMEOUT_S = 10.0
FEDAVG = {"name": "fedavg", "rounds": 3}
MEDIAN = {"name": "robust", "aggregator": {"name": "median"}, "inner": FEDAVG}


class GroupedCohort:
    """An in-process server whose round has ``size`` devices in ``groups`` secure-aggregation
    groups; each device drives the protocol with its own ``SecAggClient``."""

    def __init__(
        self,
        folder: Path,
        size: int,
        groups: int,
        strategy: dict[str, Any] | None = None,
        name: str = "serve",
    ) -> None:
        self.database = folder / f"{name}.sqlite"
        self.size = size
        self.config = tiny_config(
            self.database,
            **{
                "simulation.devices_per_round": size,
                "serve.secagg": {"phase_timeout_s": TIMEOUT_S, "groups": groups},
                "strategies": [strategy or FEDAVG],
            },
        )
        self.clock = Clock()
        self.app, self.coordinator = make_app(self.config, clock=self.clock)
        self.secagg = self.coordinator.secagg
        self.tokens: dict[int, str] = {}
        self.clients: dict[int, SecAggClient] = {}
        self.group: dict[int, int] = {}
        generator = torch.Generator().manual_seed(11)
        template = self.coordinator.uplink_template
        # Honest updates share a direction (as devices training the same model do).
        common = {k: 0.1 * torch.randn(s.shape, generator=generator) for k, s in template.items()}
        self.updates = {
            i: {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in common.items()}
            for i in range(size)
        }
        self.weights = {i: 3 + 2 * i for i in range(size)}

    def vector(self, index: int) -> np.ndarray:
        return secagg_vector(self.updates[index], self.weights[index])

    def auth(self, index: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[index]}"}

    async def start(self, client: Any, register: bool = True) -> list[dict[str, Any]]:
        """Register (unless done before), check in and join every device; returns the join
        answers."""
        for index in range(self.size):
            if register:
                answer = await client.post("/v1/devices", json={"device_index": index})
                self.tokens[index] = answer.json()["token"]
            checked = await client.post("/v1/checkin", headers=self.auth(index))
            assert checked.json()["action"] == "train"
        joins = []
        for index in range(self.size):
            joined = (await client.post("/v1/secagg/0/join", headers=self.auth(index))).json()
            self.clients[index] = client_from_join(joined)
            self.group[index] = joined["group"]
            joins.append(joined)
        return joins

    def members(self, group: int) -> list[int]:
        return [i for i in range(self.size) if self.group[i] == group]

    async def run(
        self,
        client: Any,
        dropped: Collection[int] = (),
        devices: Collection[int] | None = None,
        withheld: Collection[int] = (),
    ) -> dict[int, Any]:
        """The protocol for ``devices`` (all by default) until each is done; ``dropped`` ones
        stop after sharing, ``withheld`` ones send no unmasking share. The clock jumps past the
        phase timeout only when no device can progress. Returns each device's last answer."""
        phases = ("keys", "shares", "masked", "unmask")
        taking_part = set(self.clients if devices is None else devices)
        step = dict.fromkeys(taking_part, 0)
        message = {i: self.clients[i].advertise() for i in taking_part}
        sent: set[int] = set()
        final: dict[int, Any] = {}
        binary = {"Content-Type": "application/octet-stream"}
        while len(final) < len(taking_part):
            progressed = False
            for i in sorted(taking_part - set(final)):
                phase = phases[step[i]]
                if phase == "masked" and i in dropped:
                    final[i] = None
                    continue
                if i not in sent:
                    answer = await client.put(
                        f"/v1/secagg/0/{phase}", content=message[i], headers=self.auth(i) | binary
                    )
                    if answer.status_code != 200:
                        final[i] = answer
                        continue
                    sent.add(i)
                answer = await client.get(f"/v1/secagg/0/{phase}", headers=self.auth(i))
                if answer.status_code == 202:
                    continue
                progressed = True
                sent.discard(i)
                if answer.status_code != 200 or phase == "unmask":
                    final[i] = answer
                    continue
                device = self.clients[i]
                if phase == "keys":
                    message[i] = device.share_keys(answer.content)
                elif phase == "shares":
                    message[i] = device.masked_input(self.vector(i), answer.content)
                else:
                    message[i] = b"" if i in withheld else device.unmask(answer.content)
                step[i] += 1
            if not progressed:
                self.clock.now += TIMEOUT_S + 1
        return final

    def plain_merge(self, cloud: CloudState, devices: list[int]) -> CloudState:
        """The strategy's merge of the devices' updates themselves (no secure aggregation)."""
        stacked = {k: torch.stack([self.updates[i][k] for i in devices]) for k in self.updates[0]}
        weights = torch.tensor([float(self.weights[i]) for i in devices])
        return self.coordinator.strategy.merge(cloud, Payload(stacked), weights)


def ring_sum(vectors: list[np.ndarray], params: SecAggParams) -> np.ndarray:
    total = np.zeros(params.vector_len, dtype=params.dtype)
    for vector in vectors:
        np.add(total, encode_fixed(vector, params), out=total)
    return decode_fixed(total, params)


def distance(a: CloudState, b: CloudState) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a.tensors))


def test_two_groups_merge_the_plain_fedavg_aggregate(tmp_path: Path) -> None:
    cohort = GroupedCohort(tmp_path, size=6, groups=2)
    cloud_before = cohort.coordinator.cloud

    async def scenario() -> tuple[list[dict[str, Any]], dict[int, Any]]:
        async with asgi_client(cohort.app) as client:
            joins = await cohort.start(client)
            return joins, await cohort.run(client)

    joins, final = asyncio.run(scenario())
    assert all(answer.status_code == 200 for answer in final.values())
    assert cohort.coordinator.version == 1
    # Two sessions of 3: ids, neighbours and sizes are the group's, not the round's.
    assert sorted(cohort.group.values()) == [0, 0, 0, 1, 1, 1]
    for group in (0, 1):
        answers = [j for i, j in enumerate(joins) if cohort.group[i] == group]
        assert sorted(j["slot"] for j in answers) == [0, 1, 2]
        assert all(j["num_devices"] == 3 and j["groups"] == 2 for j in answers)
        assert all(max(j["neighbours"]) < 3 for j in answers)
    # Each group's sum is exactly the ring sum of its own members' fixed-point vectors.
    params = cohort.secagg.params
    totals = cohort.secagg.group_totals(0)
    assert sorted(totals) == [0, 1]
    for group, total in totals.items():
        expected = ring_sum([cohort.vector(i) for i in cohort.members(group)], params)
        assert np.array_equal(total, expected)
    # The merge over the two weighted group means is plain FedAvg over all six updates.
    assert_same_model(cohort.coordinator.cloud, cohort.plain_merge(cloud_before, list(range(6))))


def test_robust_strategy_over_group_means_resists_a_scaled_update(tmp_path: Path) -> None:
    """One device sends its update times 100. The median of 3 group means keeps the merge
    near the honest FedAvg merge, where a plain mean is dragged away."""
    cohort = GroupedCohort(tmp_path, size=6, groups=3, strategy=MEDIAN)
    cloud_before = cohort.coordinator.cloud
    attacker = 2
    honest = [i for i in range(6) if i != attacker]
    honest_merge = cohort.plain_merge(cloud_before, honest)
    plain_move = distance(honest_merge, cloud_before)
    cohort.updates[attacker] = {k: 100 * v for k, v in cohort.updates[attacker].items()}

    async def scenario() -> dict[int, Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            return await cohort.run(client)

    final = asyncio.run(scenario())
    assert all(answer.status_code == 200 for answer in final.values())
    assert len(cohort.secagg.group_totals(0)) == 3
    assert distance(cohort.coordinator.cloud, honest_merge) < 0.5 * plain_move
    # The cohort's weighted mean update (what one group, or no defence, would merge).
    weights = torch.tensor([float(cohort.weights[i]) for i in range(6)])
    share = weights / weights.sum()
    mean_shift = sum(
        float((sum(share[i] * cohort.updates[i][k] for i in range(6)) - honest_mean).pow(2).sum())
        for k, honest_mean in honest_mean_update(cohort, honest).items()
    )
    assert math.sqrt(mean_shift) > 5 * plain_move


def honest_mean_update(cohort: GroupedCohort, devices: list[int]) -> dict[str, torch.Tensor]:
    weights = torch.tensor([float(cohort.weights[i]) for i in devices])
    share = weights / weights.sum()
    return {
        k: sum(share[j] * cohort.updates[i][k] for j, i in enumerate(devices))
        for k in cohort.updates[0]
    }


@pytest.mark.parametrize("groups", [1, 2])
def test_a_robust_strategy_needs_three_groups(tmp_path: Path, groups: int) -> None:
    """With one group the aggregator would see the cohort's mean alone (no defence at all),
    with two it cannot outvote one: both are refused, naming the field."""
    with pytest.raises(
        ValueError, match=rf"serve\.secagg\.groups: .*at least 3 groups.*got {groups}"
    ):
        GroupedCohort(tmp_path, size=6, groups=groups, strategy=MEDIAN)


def test_database_never_holds_an_unmasked_vector_with_groups(tmp_path: Path) -> None:
    cohort = GroupedCohort(tmp_path, size=8, groups=2)

    async def scenario() -> dict[int, Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            return await cohort.run(client, dropped={0})

    final = asyncio.run(scenario())
    assert final[0] is None
    assert all(final[i].status_code == 200 for i in range(1, 8))
    assert cohort.coordinator.version == 1
    params = cohort.secagg.params
    blobs = stored_blobs(cohort.database)
    masked = blobs.pop("secagg_masked")
    assert len(masked) == 7
    assert "updates" not in blobs
    # Neither a device's vector nor a group's sum is stored in the clear anywhere.
    clear = [encode_fixed(cohort.vector(i), params) for i in range(8)]
    clear += [encode_fixed(total, params) for total in cohort.secagg.group_totals(0).values()]
    tensors = [t.numpy().tobytes() for i in range(8) for t in cohort.updates[i].values()]
    for blob in masked:
        values = np.frombuffer(blob, dtype=params.dtype)
        decoded = decode_fixed(values.copy(), params)
        for i in range(8):
            assert np.abs(decoded - cohort.vector(i)).max() > 1e3
        top = (values >> np.uint64(params.ring_bits - 1)).astype(float).mean()
        assert abs(top - 0.5) < 5 / np.sqrt(len(values))
    for table, values in blobs.items():
        for blob in values:
            for chunk in [*(c.tobytes() for c in clear), *tensors]:
                assert chunk[:64] not in blob, table


def test_dropouts_within_a_group_recover_and_a_lost_group_is_left_out(tmp_path: Path) -> None:
    """Two groups of 5 (complete graphs, threshold 3): group A loses one device after sharing
    and still unmasks; group B keeps only 2 and fails; the round merges from A alone."""
    cohort = GroupedCohort(tmp_path, size=10, groups=2)
    cloud_before = cohort.coordinator.cloud
    threshold = cohort.secagg.params.threshold
    assert threshold == 3

    async def scenario() -> tuple[dict[int, Any], Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            group_a, group_b = cohort.members(0), cohort.members(1)
            dropped = {group_a[0], *group_b[:3]}
            final = await cohort.run(client, dropped)
            waiting = await client.post("/v1/checkin", headers=cohort.auth(group_b[4]))
            return final, waiting

    final, waiting = asyncio.run(scenario())
    group_a, group_b = cohort.members(0), cohort.members(1)
    survivors_a = group_a[1:]
    assert all(final[i].status_code == 200 for i in survivors_a)
    for i in group_b[3:]:
        assert final[i].status_code == 409
        detail = final[i].json()["detail"]
        assert "group 1" in detail and f"threshold is {threshold}" in detail
    errors = cohort.secagg.group_errors(0)
    assert list(errors) == [1] and "too many devices dropped" in errors[1]
    assert cohort.coordinator.version == 1
    params = cohort.secagg.params
    expected = ring_sum([cohort.vector(i) for i in survivors_a], params)
    assert np.array_equal(cohort.secagg.last_total(0), expected)
    assert_same_model(cohort.coordinator.cloud, cohort.plain_merge(cloud_before, survivors_a))
    # The merged round moved on: a device of the lost group is sent to round 1.
    assert waiting.json()["action"] == "train" and waiting.json()["round"] == 1


def test_a_failed_group_waits_while_the_other_group_merges(tmp_path: Path) -> None:
    """Group 1 finishes first but its devices withhold their unmasking shares: it fails at
    once, its devices are told to wait at check-in (not to train again), and the round merges
    from group 0 alone when that group is done."""
    cohort = GroupedCohort(tmp_path, size=6, groups=2)
    cloud_before = cohort.coordinator.cloud

    async def scenario() -> tuple[dict[int, Any], Any, dict[int, Any]]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            lost = cohort.members(1)
            first = await cohort.run(client, devices=lost, withheld=lost)
            errors.update(cohort.secagg.group_errors(0))
            waiting = await client.post("/v1/checkin", headers=cohort.auth(lost[0]))
            second = await cohort.run(client, devices=cohort.members(0))
            return first, waiting, second

    errors: dict[int, str] = {}
    first, waiting, second = asyncio.run(scenario())
    for answer in first.values():
        detail = answer.json()["detail"]
        assert answer.status_code == 409 and "group 1 of attempt 0 failed" in detail
    assert list(errors) == [1] and "threshold is 2" in errors[1]
    assert waiting.json()["action"] == "wait"
    assert all(answer.status_code == 200 for answer in second.values())
    assert cohort.coordinator.version == 1
    merged = cohort.plain_merge(cloud_before, cohort.members(0))
    assert_same_model(cohort.coordinator.cloud, merged)


def test_every_group_failing_fails_the_round_and_a_new_attempt_starts(tmp_path: Path) -> None:
    cohort = GroupedCohort(tmp_path, size=6, groups=2)

    async def scenario() -> tuple[dict[int, Any], Any, Any]:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            dropped = {cohort.members(0)[0], cohort.members(1)[0]}
            final = await cohort.run(client, dropped)
            errors.update(cohort.secagg.group_errors(0))
            survivor = cohort.members(0)[1]
            failed = await client.get("/v1/secagg/0/unmask", headers=cohort.auth(survivor))
            again = await client.post("/v1/secagg/0/join", headers=cohort.auth(survivor))
            return final, failed, again

    errors: dict[int, str] = {}
    final, failed, again = asyncio.run(scenario())
    assert cohort.coordinator.version == 0
    answers = [answer for answer in final.values() if answer is not None]
    assert len(answers) == 4
    for answer in answers:
        assert answer.status_code == 409 and "threshold is 2" in answer.json()["detail"]
    assert sorted(errors) == [0, 1]
    detail = failed.json()["detail"]
    assert failed.status_code == 409 and "attempt 0 failed: group 0:" in detail
    assert "; group 1:" in detail
    assert again.status_code == 200 and again.json()["attempt"] == 1


def test_restart_mid_round_never_reuses_a_stored_attempt(tmp_path: Path) -> None:
    """Masked vectors of attempt 0 are stored, then the server restarts: the new attempt gets
    number 1 (not a key already in the database) and the round completes."""
    cohort = GroupedCohort(tmp_path, size=4, groups=2)

    async def first_life() -> None:
        async with asgi_client(cohort.app) as client:
            await cohort.start(client)
            await cohort.run(client, dropped={cohort.members(0)[0], cohort.members(1)[0]})

    asyncio.run(first_life())
    assert len(stored_blobs(cohort.database)["secagg_masked"]) == 2
    cohort.coordinator.store.close()
    restarted = GroupedCohort(tmp_path, size=4, groups=2)
    restarted.clock.now = cohort.clock.now

    async def second_life() -> tuple[list[dict[str, Any]], dict[int, Any]]:
        async with asgi_client(restarted.app) as client:
            restarted.tokens = cohort.tokens
            joins = await restarted.start(client, register=False)
            return joins, await restarted.run(client)

    joins, final = asyncio.run(second_life())
    assert {j["attempt"] for j in joins} == {1}
    assert all(answer.status_code == 200 for answer in final.values())
    assert restarted.coordinator.version == 1
    assert len(stored_blobs(cohort.database)["secagg_masked"]) == 6


def test_invalid_groups_name_the_field_and_the_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"serve\.secagg\.groups: .*at most 2 groups, got 3"):
        GroupedCohort(tmp_path, size=5, groups=3)
    with pytest.raises(ConfigError, match=r"serve\.secagg\.groups"):
        GroupedCohort(tmp_path, size=5, groups=0, name="zero")
