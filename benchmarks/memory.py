"""Resident memory of one daemon process, for sizing containers (README "Deploy" > "Sizing").

    python benchmarks/memory.py [--live 20000] [--cold 2000]

Each measurement runs in a fresh process that imports what ``forewarn run`` imports and loads the shipped
initialization (the baseline), then:
- live: N single-channel streams warmed up and adapted (K=0, for speed), all live; resident memory per
  live stream, model state and Python objects together, measured after ``malloc_trim`` so that what the
  allocator merely keeps from the adaptation burst does not count;
- cold: N streams whose windows fill in the same batch, adapted with the default K in slices of
  ``detector.adapt_batch`` (512), as the daemon does; the peak, which one slice sets, per stream of a
  slice (the N streams' own state, 24 KB each, taken off first), what stays resident afterwards
  (glibc keeps freed heap memory), and what is left after ``malloc_trim`` gives the free memory back
  (which the daemon does once a burst ends), with the time the call took.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def measure(n: int, steps: int | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    import connectors.kafka  # noqa: F401  (the daemon's imports)
    from monitor.daemon import release_free_memory
    from monitor.adapt import AdaptConfig
    from monitor.checkpoint import Initialization
    from monitor.cli import tune_runtime
    from monitor.config import DetectorConfig
    from monitor.pipeline import Pipeline, PipelineConfig
    from monitor.readings import Reading

    torch.set_num_threads(1)
    tune_runtime()
    init = Initialization.default()
    base = rss()
    # the daemon's default: its bookkeeping of each device's latest reading for quiet channels included
    quiet = DetectorConfig().channel_idle_timeout_s
    config = PipelineConfig(warmup=256, channel_idle_timeout_s=quiet, **({} if steps is None else
                                                                         {"adapt": AdaptConfig(steps=steps)}))
    pipe = Pipeline(init, config)
    devices = [f"dev-{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    for t in range(260):
        values = torch.randn(n, generator=g).tolist()
        pipe.feed([Reading(d, float(t), {"value": v}) for d, v in zip(devices, values, strict=True)])
    assert pipe.streams_by_state()["live"] == n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = rss()
    trim_seconds = release_free_memory()  # as the daemon does once a burst of adaptations ends
    return {"baseline": base, "after": after, "trimmed": rss(), "peak": peak, "streams": n,
            "trim_seconds": trim_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=20_000, help="live streams to hold (default: %(default)s)")
    parser.add_argument("--cold", type=int, default=2_000,
                        help="streams reaching the end of their warm-up in one batch, adapted in slices of "
                             "detector.adapt_batch (default: %(default)s)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, steps = int(args.child[0]), args.child[1]
        print(json.dumps(measure(n, None if steps == "default" else int(steps))))
        return

    def run(n: int, steps: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), steps], check=True,
                             stdout=subprocess.PIPE, text=True).stdout  # stderr passes: a failure shows why
        return json.loads(out.strip().splitlines()[-1])

    mib = 2 ** 20
    live, cold = run(args.live, "0"), run(args.cold, "default")
    print("| measurement | value |\n|---|---|")
    print(f"| baseline (imports, shipped initialization) | {live['baseline'] / mib:,.0f} MiB |")
    print(f"| {args.live:,} live streams | {live['trimmed'] / mib:,.0f} MiB, "
          f"{(live['trimmed'] - live['baseline']) / args.live / 1000:,.1f} KB per stream |")
    sys.path.insert(0, str(ROOT))
    from monitor.pipeline import PipelineConfig
    per_live = (live["trimmed"] - live["baseline"]) / args.live
    in_slice = min(args.cold, PipelineConfig().adapt_batch)
    print(f"| {args.cold:,} streams adapted in slices of {in_slice} (default K), peak | {cold['peak'] / mib:,.0f} "
          f"MiB, {(cold['peak'] - cold['baseline'] - per_live * args.cold) / in_slice / 1e6:,.2f} MB per stream "
          "of a slice |")
    print(f"| the same, resident afterwards | {cold['after'] / mib:,.0f} MiB |")
    print(f"| the same, after malloc_trim (the daemon's, once a burst ends) | {cold['trimmed'] / mib:,.0f} MiB, "
          f"the call {cold['trim_seconds'] * 1000:,.0f} ms |")


if __name__ == "__main__":
    main()
