"""Speed and memory of the live path, from one run on this machine.

    python benchmarks/throughput.py [--streams 10000] [--batches 20]

Prints readings/s of ``Pipeline.feed`` with N live streams (one reading per
stream per batch, as when a fleet reports each interval), of the forecaster plus
scoring alone, and of a naive loop over per-stream ``nn.LSTM`` modules doing the
same one-step forecast; the seconds to adapt a cold start of 1,000 new streams
with the default warm-up and K; the bytes of state per live stream; and, for
devices of 40 channels, ``Pipeline.feed`` with the channels combined jointly and
by the worst one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.adapt import AdaptConfig  # noqa: E402
from monitor.checkpoint import Initialization  # noqa: E402
from monitor.cli import tune_runtime  # noqa: E402
from monitor.pipeline import Pipeline, PipelineConfig  # noqa: E402
from monitor.readings import Reading  # noqa: E402
from monitor.scoring import ScoringConfig  # noqa: E402


def live_pipeline(init: Initialization, n: int, warmup: int, **options) -> tuple[Pipeline, list[str]]:
    """A pipeline whose ``n`` streams are all live (adapted with K=0: speed does not depend on K)."""
    pipe = Pipeline(init, PipelineConfig(warmup=warmup, adapt=AdaptConfig(steps=0), **options))
    devices = [f"dev-{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    for t in range(warmup):
        values = torch.randn(n, generator=g).tolist()
        pipe.feed([Reading(d, float(t), {"value": v}) for d, v in zip(devices, values)])
    return pipe, devices


def bench_feed(pipe: Pipeline, devices: list[str], batches: int, t0: int) -> float:
    g = torch.Generator().manual_seed(1)
    prepared = [[Reading(d, float(t0 + b), {"value": v}) for d, v in
                 zip(devices, torch.randn(len(devices), generator=g).tolist())] for b in range(batches)]
    started = time.perf_counter()
    for batch in prepared:
        pipe.feed(batch)
    return batches * len(devices) / (time.perf_counter() - started)


def bench_forecaster_and_scoring(pipe: Pipeline, batches: int) -> float:
    streams = list(pipe._streams.values())
    rows = torch.tensor([s.row for s in streams])
    scorers = [s.scorer for s in streams]
    g = torch.Generator().manual_seed(2)
    values = [torch.randn(len(rows), generator=g, dtype=torch.float64) for _ in range(batches)]
    started = time.perf_counter()
    for v in values:
        _, residuals = pipe.fleet.observe(rows, v)
        for scorer, r in zip(scorers, residuals.tolist()):
            scorer.surprise_learn_one(r)
    return batches * len(rows) / (time.perf_counter() - started)


def bench_naive(n: int, hidden: int, batches: int) -> float:
    """Per-stream ``nn.LSTM`` + ``nn.Linear`` modules, one forward call per reading."""
    models = [(torch.nn.LSTM(1, hidden), torch.nn.Linear(hidden, 1)) for _ in range(n)]
    states = [None] * n
    x = torch.randn(batches, n)
    started = time.perf_counter()
    with torch.no_grad():
        for b in range(batches):
            for i, (lstm, head) in enumerate(models):
                out, states[i] = lstm(x[b, i].view(1, 1, 1), states[i])
                head(out[0, 0])
    return batches * n / (time.perf_counter() - started)


def bench_online_update(init: Initialization, n: int, batches: int) -> float:
    """Seconds per stream of one online update (one step on its newest 256 readings): the same
    fleet fed the same batches with an update after every reading, and without."""
    plain, devices = live_pipeline(init, n, warmup=32)
    updating, _ = live_pipeline(init, n, warmup=32, online_every=1, online_window=256)
    per_reading = 1 / bench_feed(plain, devices, batches, t0=1000)
    assert updating.counts["updated"] == 0
    per_update = 1 / bench_feed(updating, devices, batches, t0=1000)
    assert updating.counts["updated"] == n * batches
    return per_update - per_reading


def bench_channel_combination(init: Initialization, devices: int, channels: int, batches: int) -> dict[str, float]:
    """Channel values/s of ``Pipeline.feed`` for devices of many channels, each reading scored by
    its channels' joint surprise and by its worst channel's: the same fleet and readings."""
    g = torch.Generator().manual_seed(4)
    names = [f"dev-{i}" for i in range(devices)]
    columns = [f"c{j}" for j in range(channels)]

    def readings(t: int) -> list[Reading]:
        values = torch.randn(devices, channels, generator=g).tolist()
        return [Reading(d, float(t), dict(zip(columns, row))) for d, row in zip(names, values)]

    warm = [readings(t) for t in range(32)]
    live = [readings(1000 + b) for b in range(batches)]
    rates = {"max": 0.0, "joint": 0.0}
    for combination in ("max", "joint") * 2:  # the better of two runs each, interleaved
        pipe = Pipeline(init, PipelineConfig(warmup=32, adapt=AdaptConfig(steps=0),
                                             scoring=ScoringConfig(channel_combination=combination)))
        for batch in warm:
            pipe.feed(batch)
        started = time.perf_counter()
        for batch in live:
            pipe.feed(batch)
        rate = batches * devices * channels / (time.perf_counter() - started)
        rates[combination] = max(rates[combination], rate)
    return rates


def bench_cold_start(init: Initialization, n: int, warmup: int) -> float:
    pipe = Pipeline(init, PipelineConfig(warmup=warmup))
    devices = [f"new-{i}" for i in range(n)]
    g = torch.Generator().manual_seed(3)
    history = torch.cumsum(torch.randn(warmup, n, generator=g), 0).tolist()
    for t in range(warmup - 1):
        pipe.feed([Reading(d, float(t), {"value": v}) for d, v in zip(devices, history[t])])
    last = [Reading(d, float(warmup - 1), {"value": v}) for d, v in zip(devices, history[-1])]
    started = time.perf_counter()
    result = pipe.feed(last)  # every stream fills its window here: one batched adaptation
    elapsed = time.perf_counter() - started
    assert result.adapted == n and pipe.streams_by_state()["live"] == n
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--naive-streams", type=int, default=2_000,
                        help="streams in the naive loop (its rate does not depend on the count)")
    parser.add_argument("--cold-start", type=int, default=1_000)
    parser.add_argument("--online-streams", type=int, default=2_000,
                        help="streams for the online-update cost (per-stream cost, about 1 ms each)")
    args = parser.parse_args()
    tune_runtime(threads=2)
    init = Initialization.default()

    pipe, devices = live_pipeline(init, args.streams, warmup=32)
    feed_rate = bench_feed(pipe, devices, args.batches, t0=1000)
    core_rate = bench_forecaster_and_scoring(pipe, args.batches)
    naive_rate = bench_naive(args.naive_streams, init.spec.hidden, batches=3)
    cold = bench_cold_start(init, args.cold_start, warmup=256)
    state = pipe.fleet.state_bytes_per_stream()
    update = bench_online_update(init, args.online_streams, batches=2)
    combined = bench_channel_combination(init, args.streams // 40, 40, args.batches)

    print(f"torch threads: {torch.get_num_threads()}, LSTM hidden {init.spec.hidden} x {init.spec.layers} layer(s)")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| Pipeline.feed, {args.streams:,} live streams | {feed_rate:,.0f} readings/s |")
    print(f"| forecaster + scoring alone | {core_rate:,.0f} readings/s |")
    print(f"| naive loop of per-stream nn.LSTM | {naive_rate:,.0f} readings/s |")
    print(f"| Pipeline.feed / naive | {feed_rate / naive_rate:.1f}x |")
    print(f"| cold start: adapt {args.cold_start:,} new streams (W=256, K={init.adapt.steps}) | {cold:.2f} s |")
    print(f"| model state per live stream | {state:,} bytes |")
    print(f"| online update, per stream (1 step on 256 readings, {args.online_streams:,} at once) | {update * 1e3:.2f} ms |")
    for every in (64, 256):
        print(f"| Pipeline.feed with online updates every {every} readings (derived) | "
              f"{1 / (1 / feed_rate + update / every):,.0f} readings/s |")
    for combination, rate in combined.items():
        print(f"| Pipeline.feed, {args.streams // 40:,} devices x 40 channels, channels combined by "
              f"{combination} | {rate:,.0f} channel values/s |")
    print(f"| joint / max | {combined['joint'] / combined['max']:.2f} |")


if __name__ == "__main__":
    main()
