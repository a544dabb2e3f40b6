"""The scoring path without Kafka, for comparing two checkouts in the same minutes.

    python benchmarks/feed_ab.py [CHECKOUT ...] [--rounds 3] [--devices 10000]

Each checkout (default: this one; e.g. a ``git worktree`` of an older commit) runs
in a fresh process, in turn, ``--rounds`` times: ``Pipeline.feed`` and
``Metrics.observe_scores`` over batches of one reading per live device, as the
daemon calls them per batch, with no broker (whose consume rate moves most with
the machine's load). Prints readings/s per run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(devices: int) -> float:
    from prometheus_client import CollectorRegistry

    from monitor.adapt import AdaptConfig
    from monitor.checkpoint import Initialization
    from monitor.cli import tune_runtime
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline, PipelineConfig
    from monitor.readings import Reading
    tune_runtime(threads=2)
    pipe = Pipeline(Initialization.default(), PipelineConfig(warmup=16, adapt=AdaptConfig(steps=0)))
    metrics = Metrics(CollectorRegistry())
    names = [f"dev-{i}" for i in range(devices)]

    def batch(t: int) -> list[Reading]:
        return [Reading(d, float(t), {"value": float((t * 7 + i) % 13) / 4}) for i, d in enumerate(names)]
    for t in range(17):  # every device live
        metrics.observe_scores(pipe.feed(batch(t)).scores)
    batches = [batch(t) for t in range(17, 47)]
    started = time.perf_counter()
    for b in batches:
        metrics.observe_scores(pipe.feed(b).scores)
    return len(batches) * devices / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", default=[str(ROOT)], help="repository roots (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, args.checkouts[0])
        print(measure(args.devices))
        return
    for r in range(args.rounds):
        for root in args.checkouts:
            out = subprocess.run([sys.executable, __file__, root, "--child", "--devices", str(args.devices)],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr passes through
            print(f"round {r + 1}  {root}: {float(out.strip().splitlines()[-1]):,.0f} readings/s", flush=True)


if __name__ == "__main__":
    main()
