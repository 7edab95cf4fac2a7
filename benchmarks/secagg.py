"""Secure aggregation's price: bytes, device and server seconds per round, and drop-out survival.

Runs the real SecAgg+ protocol (``coevo.codecs.secagg``: X25519, AES-GCM, Shamir, AES-CTR masks
in Z_2^32) for 100 and 1,000 devices, each sending a vector as long as FedAvg's shared update on
the recommendation task (57,203 values on MovieLens-100K), against plain aggregation of the same
float32 updates in the same run. The neighbour degree is chosen for 30% drop-out
(``neighbour_degree(n, 0.3)``); every round checks the secure sum against the plain fixed-point
sum, exactly. Drop-outs happen after key sharing (the costliest case for the cloud: pairwise
masks to rebuild); a round completes when the cloud gets the sum.

Bytes are per surviving device and round, up plus down, including the model download both
ways. Device seconds are the mean over devices of their own protocol compute; server seconds
the cloud's, for the whole round.

    python benchmarks/secagg.py                 # about 8 minutes on one core
    python benchmarks/secagg.py --quick         # short vectors, one round each

The last line is ``secagg: n=1000 bytes_ratio=… server_s=… dropout30_ok=…``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

import numpy as np
import torch

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
from coevo.types import Payload

VECTOR_LEN = 57_203
"""FedAvg's shared parameters with the device model of dim 32 on MovieLens-100K."""


class Timer:
    """Seconds of compute per party."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = defaultdict(float)

    def each(self, calls: Mapping[int, Callable[[], bytes]]) -> dict[int, bytes]:
        out = {}
        for party, call in calls.items():
            started = time.perf_counter()
            out[party] = call()
            self.seconds[party] += time.perf_counter() - started
        return out


def secure_round(
    vectors: np.ndarray, params: SecAggParams, graph: np.ndarray, dropped: set[int]
) -> dict[str, float]:
    """One SecAgg+ round where ``dropped`` leave after sharing keys; its costs and outcome."""
    n = params.num_devices
    devices, server_time = Timer(), 0.0
    traffic = np.zeros(n, dtype=np.int64)

    def count(messages: Mapping[int, bytes]) -> Mapping[int, bytes]:
        for u, message in messages.items():
            traffic[u] += len(message)
        return messages

    def serve(phase: Callable, messages: Mapping[int, bytes]):
        nonlocal server_time
        started = time.perf_counter()
        out = phase(count(messages))
        server_time += time.perf_counter() - started
        return out

    clients = [SecAggClient(u, params, graph[u]) for u in range(n)]
    server = SecAggServer(params, graph)
    keys = serve(server.advertise, devices.each({u: c.advertise for u, c in enumerate(clients)}))
    count(keys)
    calls = {u: (lambda u=u, m=m: clients[u].share_keys(m)) for u, m in keys.items()}
    shares = count(serve(server.share, devices.each(calls)))
    alive = {u: m for u, m in shares.items() if u not in dropped}
    calls = {u: (lambda u=u, m=m: clients[u].masked_input(vectors[u], m)) for u, m in alive.items()}
    requests = count(serve(server.collect, devices.each(calls)))
    calls = {u: (lambda u=u, m=m: clients[u].unmask(m)) for u, m in requests.items()}
    answers = devices.each(calls)
    ok = True
    try:
        total = serve(server.unmask, answers)
        survivors = sorted(set(range(n)) - dropped)
        codes = encode_fixed(vectors[survivors], params).view(np.int32).astype(np.int64)
        if not np.array_equal(total, codes.sum(0) / 2.0**params.scale_bits):
            raise AssertionError("the secure sum differs from the plain fixed-point sum")
    except SecAggError as error:
        print(f"  round failed: {error}")
        ok = False
    return {
        "ok": float(ok),
        "protocol_bytes": float(traffic[sorted(set(range(n)) - dropped)].mean()),
        "device_s": float(np.mean(list(devices.seconds.values()))),
        "server_s": server_time,
    }


def plain_round(vectors: np.ndarray) -> dict[str, float]:
    """Plain aggregation of the same updates: serialise each, sum at the cloud."""
    started = time.perf_counter()
    messages = [
        Payload({"update": torch.from_numpy(v.astype(np.float32))}).to_bytes() for v in vectors
    ]
    device_s = (time.perf_counter() - started) / len(vectors)
    started = time.perf_counter()
    total = np.zeros(vectors.shape[1], dtype=np.float64)
    for message in messages:
        total += Payload.from_bytes(message).tensors["update"].numpy()
    return {
        "bytes_up": float(len(messages[0])),
        "device_s": device_s,
        "server_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--vector-len", type=int, default=VECTOR_LEN)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per drop-out rate")
    parser.add_argument("--quick", action="store_true", help="5,000 values, one round each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.vector_len, args.rounds = 5_000, 1
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    rows, line = [], {}
    for n in args.devices:
        degree = neighbour_degree(n, dropout=0.3)
        scale_bits = int(np.floor(np.log2(2.0**31 / n))) - 1  # values clipped to ±1
        params = SecAggParams(
            n, degree, neighbour_threshold(degree), args.vector_len, 1.0, scale_bits
        )
        graph = neighbour_graph(n, degree, args.seed)
        vectors = rng.uniform(-1, 1, (n, args.vector_len)) / np.sqrt(args.vector_len)
        plain = plain_round(vectors)
        model_down = plain["bytes_up"]  # the model download, the same with and without
        cost = secagg_cost(n, degree, args.vector_len)
        print(f"n={n}: degree {degree}, threshold {params.threshold}, 2^-{scale_bits} resolution")
        for rate in (0.0, 0.1, 0.3):
            results = []
            for _ in range(1 if rate == 0 else args.rounds):
                dropped = set(rng.choice(n, size=round(rate * n), replace=False).tolist())
                results.append(secure_round(vectors, params, graph, dropped))
            mean = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
            if rate == 0 and mean["protocol_bytes"] != cost.bytes_up + cost.bytes_down:
                raise AssertionError("secagg_cost disagrees with the protocol's messages")
            secure_bytes = mean["protocol_bytes"] + model_down
            plain_bytes = plain["bytes_up"] + model_down
            rows.append(
                (
                    n,
                    rate,
                    secure_bytes,
                    plain_bytes,
                    mean["device_s"],
                    plain["device_s"],
                    mean["server_s"],
                    plain["server_s"],
                    f"{int(sum(r['ok'] for r in results))}/{len(results)}",
                )
            )
            print("  " + " ".join(str(v) for v in rows[-1]), flush=True)
            if n == 1000 and rate == 0:
                line["bytes_ratio"] = secure_bytes / plain_bytes
                line["server_s"] = mean["server_s"]
            if n == 1000 and rate == 0.3:
                line["dropout30_ok"] = all(r["ok"] for r in results)
    print(
        "\n| devices | drop-out | bytes/device secure | plain | ratio | device s secure | plain | "
        "server s secure | plain | rounds completed |\n" + "|---:" * 10 + "|"
    )
    for n, rate, sb, pb, sd, pd, ss, ps, done in rows:
        print(
            f"| {n} | {rate:.0%} | {sb:,.0f} | {pb:,.0f} | {sb / pb:.3f} | {sd:.4f} | {pd:.5f} | "
            f"{ss:.2f} | {ps:.4f} | {done} |"
        )
    if line:
        print(
            f"secagg: n=1000 bytes_ratio={line['bytes_ratio']:.3f} server_s={line['server_s']:.2f} "
            f"dropout30_ok={line['dropout30_ok']}"
        )


if __name__ == "__main__":
    main()
