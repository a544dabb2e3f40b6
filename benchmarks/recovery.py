"""Restoring device state from the changelog against re-warming it, from one run.

    python benchmarks/recovery.py [--devices 10000] [--partitions 4]

Builds N live devices (one channel each, adapted with the shipped
initialization and K), writes their snapshots to a changelog topic on the
embedded broker, then times (a) a restore: read the changelog to its end,
decode, place every device back in a fresh pipeline; and (b) a re-warm: adapt
the same N devices from their warm-up windows, as a daemon without state must
(not counting the wait for the warm-up readings themselves, which in a live
fleet is ``warmup`` reporting intervals).  Prints both, their ratio and the
snapshot bytes per device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.state_store import ChangelogStore  # noqa: E402
from connectors.tansu import EmbeddedBroker  # noqa: E402
from monitor.checkpoint import Initialization  # noqa: E402
from monitor.cli import tune_runtime  # noqa: E402
from monitor.config import KafkaConfig  # noqa: E402
from monitor.pipeline import Pipeline, PipelineConfig  # noqa: E402
from monitor.readings import Reading  # noqa: E402
from monitor.state import StateCodec  # noqa: E402


def warm_batches(devices: list[str], warmup: int) -> list[list[Reading]]:
    g = torch.Generator().manual_seed(0)
    phase = torch.rand(len(devices), generator=g) * 6.28
    out = []
    for t in range(warmup):
        values = (torch.sin(phase + t / 8) + 0.1 * torch.randn(len(devices), generator=g)).tolist()
        out.append([Reading(d, float(t), {"value": v}) for d, v in zip(devices, values)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    tune_runtime(2)
    init = Initialization.default()
    devices = [f"dev-{i}" for i in range(args.devices)]
    batches = warm_batches(devices, PipelineConfig().warmup)

    pipe = Pipeline(init)
    for b in batches[:-1]:
        pipe.feed(b)
    started = time.perf_counter()
    pipe.feed(batches[-1])  # every window fills here: one batched adaptation of all N
    rewarm = time.perf_counter() - started
    print(f"re-warm (adapt {args.devices:,} devices, K={init.adapt.steps}): {rewarm:.1f} s", flush=True)

    codec = StateCodec(init)
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap)
        broker.create_topics({"bench-state": args.partitions})
        store = ChangelogStore(cfg, "bench-state")
        store.ensure_partitions(args.partitions)
        total_bytes = 0
        for i, state in enumerate(pipe.export_devices(devices)):
            data = codec.encode(state)
            total_bytes += len(data)
            store.put(i % args.partitions, state.device, data)
        store.flush()

        started = time.perf_counter()
        fresh = Pipeline(init)
        records = store.load(range(args.partitions))
        restored = fresh.import_devices(codec.decode(data) for _, _, data in records)
        restore = time.perf_counter() - started
        store.close()
    assert restored == args.devices, f"restored {restored} of {args.devices}"
    print(f"restore from changelog ({args.devices:,} devices, {args.partitions} partitions): {restore:.1f} s")
    print(f"restore is {rewarm / restore:.1f}x faster than re-warming (goal: >= 10x)")
    print(f"state per device (one channel): {total_bytes / args.devices / 1024:.1f} KB")


if __name__ == "__main__":
    main()
