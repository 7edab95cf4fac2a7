"""Generate the synthetic world at a million devices and report time and peak memory.

Run: ``python benchmarks/synthetic_scale.py [--devices N]``. The last line is machine-readable:
``synthetic_scale: devices=... rows=... seconds=... peak_rss_gib=...``. Peak RSS should stay
under 4 GiB at 1,000,000 devices, 2,000 items and a mean of 30 interactions.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from coevo.tasks.log import describe
from coevo.tasks.synthetic import SyntheticConfig, make_world


def _peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = SyntheticConfig(
        num_devices=args.devices,
        num_items=args.items,
        mean_interactions=30.0,
        min_interactions=10,
    )
    started = time.perf_counter()
    log = make_world(config, seed=args.seed)
    seconds = time.perf_counter() - started
    peak_gib = _peak_rss_gib()
    for key, value in describe(log).items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<20} {shown:>14}")
    print(f"{'seconds':<20} {seconds:>14.1f}")
    print(f"{'peak_rss_gib':<20} {peak_gib:>14.2f}")
    print(
        f"synthetic_scale: devices={log.num_users} rows={log.num_rows} "
        f"seconds={seconds:.1f} peak_rss_gib={peak_gib:.2f}"
    )


if __name__ == "__main__":
    main()
