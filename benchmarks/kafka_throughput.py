"""Kafka throughput and latency, all against one embedded broker in one run.

    python benchmarks/kafka_throughput.py [--devices 10000] [--live-readings 60] [--state none|changelog]
                                          [--repeat N]

1. raw: kafka-python polls the whole topic and discards it (the ceiling);
2. Forewarn: the daemon (one instance) consumes the same records, parses,
   scores, and commits after each batch; its rate is taken over the live phase,
   from the moment every device is past its warm-up (60 readings a device by default: the
   first seconds after the warm-ups flattered code whose steady state was slower,
   see the README);
3. latency (a daemon of its own, after the rounds): readings produced at a
   steady 2,000/s to live devices; from the record's broker timestamp to its
   score being sent, p50 and p99.

Each Forewarn run lies between two raw runs and is compared with the better of
them. ``--repeat N`` makes N such rounds on the same broker and records and
reports the round with the median ratio: on a shared machine single runs of
either have spread by 2x.

Every device is live after a 16-reading warm-up adapted with K=0 (the scoring
path's speed does not depend on K; adaptation is measured in throughput.py).
``--state changelog`` adds the daemon's state checkpoints (every device's
snapshot to a changelog topic every ``--checkpoint-interval`` seconds, with the
offset commits that wait for them); ``none`` measures the scoring path alone.
At the default sizes the measured window lasts less than the default 30 s, so
a run in which no checkpoint fell is refused: the README's uses 5 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from connectors.tansu import EmbeddedBroker  # noqa: E402
from monitor.cli import tune_runtime  # noqa: E402
from monitor.config import Config, StateConfig  # noqa: E402
from monitor.daemon import Daemon  # noqa: E402

WARMUP = 16
POLL_RECORDS = 10_000  # the daemon's kafka.max_poll_records here


def produce(bootstrap: str, topic: str, devices: int, rounds: range, rate: float | None = None) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024, acks=1)
    n = 0
    started = time.monotonic()
    for t in rounds:
        for d in range(devices):
            msg = json.dumps({"device": f"dev-{d}", "ts": float(t), "value": (t * 7 + d) % 13 / 4.0}).encode()
            producer.send(topic, key=f"dev-{d}".encode(), value=msg)
            n += 1
            if rate is not None:
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    producer.flush()
    producer.close()
    return n


def raw_rate(bootstrap: str, topic: str, total: int, group: str) -> float:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=5000, max_poll_interval_ms=3000,
                             session_timeout_ms=3000, heartbeat_interval_ms=500)
    n, first, untimed = 0, None, 0
    while n < total:
        for msgs in consumer.poll(timeout_ms=500, max_records=5000).values():
            if first is None:  # the timer starts here: this poll's records were fetched before it
                first, untimed = time.perf_counter(), len(msgs)
            n += len(msgs)
    elapsed = time.perf_counter() - first
    consumer.close()
    return (n - untimed) / elapsed


def wait_for_records(daemon: Daemon, thread: threading.Thread, n: int, interval: float) -> None:
    """Until the daemon has processed ``n`` records; a daemon that exited (its error is in the
    log above) ends the benchmark rather than leaving it waiting for ever."""
    while daemon.records < n:
        if not thread.is_alive():
            sys.exit(f"kafka_throughput: the daemon exited after {daemon.records:,} of {n:,} records; "
                     "its error is logged above")
        time.sleep(interval)


def forewarn_rate(bootstrap: str, topic: str, group: str, warm: int, total: int, args) -> tuple:
    """A fresh daemon in a consumer group of its own consumes the topic; its rate over the live phase."""
    env = {"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FOREWARN_KAFKA_TOPIC": topic,
           # the poll interval allows a checkpoint of every device between two polls
           "FOREWARN_KAFKA_GROUP_ID": group, "FOREWARN_KAFKA_MAX_POLL_INTERVAL_MS": "30000",
           "FOREWARN_KAFKA_SESSION_TIMEOUT_MS": "3000", "FOREWARN_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
           "FOREWARN_KAFKA_MAX_POLL_RECORDS": str(POLL_RECORDS), "FOREWARN_METRICS_HOST": "127.0.0.1",
           "FOREWARN_METRICS_PORT": "0", "FOREWARN_DETECTOR_WARMUP": str(WARMUP),
           "FOREWARN_DETECTOR_ADAPT_STEPS": "0", "FOREWARN_LOG_LEVEL": "WARNING",
           "FOREWARN_STATE_STORE": args.state,
           "FOREWARN_STATE_CHECKPOINT_INTERVAL_S": str(args.checkpoint_interval)}
    daemon = Daemon(Config.load(environ=env), registry=CollectorRegistry())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    wait_for_records(daemon, thread, warm, 0.01)
    # partitions are not consumed in step: one may still be warming its devices up (adapting
    # them, growing the fleet) after as many records as the warm-ups hold have been processed
    while daemon.pipeline.streams_by_state()["live"] < args.devices and daemon.records < total:
        wait_for_records(daemon, thread, daemon.records + 1, 0.005)
    live_start, live_start_records = time.perf_counter(), daemon.records
    checkpoints_before = daemon.registry.get_sample_value("forewarn_state_checkpoints_total")
    if total - live_start_records < 5 * POLL_RECORDS:
        sys.exit(f"kafka_throughput: only {total - live_start_records:,} records were left once every device "
                 "was live: too few to measure; raise --live-readings")
    wait_for_records(daemon, thread, total, 0.005)
    rate = (daemon.records - live_start_records) / (time.perf_counter() - live_start)
    checkpoints = int(daemon.registry.get_sample_value("forewarn_state_checkpoints_total") - checkpoints_before)
    print(f"  {group}: {total - live_start_records:,} records after every device was live, "
          f"{checkpoints} state checkpoint(s) among them", file=sys.stderr)
    if args.state != "none" and not checkpoints:
        sys.exit(f"kafka_throughput: no state checkpoint fell in the measured {time.perf_counter() - live_start:.1f} s "
                 f"(interval {args.checkpoint_interval:g} s): the rate would be the scoring path's alone; "
                 "raise --live-readings or lower --checkpoint-interval")
    assert daemon.pipeline.streams_by_state()["live"] == args.devices
    return daemon, thread, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--live-readings", type=int, default=60, help="readings per device after the warm-up")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--state", choices=("none", "changelog"), default="none")
    parser.add_argument("--checkpoint-interval", type=float, default=StateConfig().checkpoint_interval_s,
                        help="seconds (default: the daemon's)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of raw and Forewarn runs in turn (median)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.devices * args.live_readings < 5 * POLL_RECORDS:  # a rate over a poll or two measures nothing
        parser.error(f"too few live records to measure: --devices x --live-readings must be at least "
                     f"{5 * POLL_RECORDS:,} (five of the daemon's polls of {POLL_RECORDS:,})")
    tune_runtime(threads=2)
    with EmbeddedBroker() as broker:
        topic = "bench"
        broker.create_topics({topic: args.partitions})
        warm = produce(broker.bootstrap, topic, args.devices, range(WARMUP))
        live = produce(broker.bootstrap, topic, args.devices, range(WARMUP, WARMUP + args.live_readings))
        total = warm + live
        # the raw rate is the ceiling: the better of the runs just before and just after each
        # Forewarn run, so that a machine slowed or sped up meanwhile moves both
        raw_runs = [raw_rate(broker.bootstrap, topic, total, "raw-0")]
        rounds_ = []
        for r in range(args.repeat):
            daemon, thread, forewarn = forewarn_rate(broker.bootstrap, topic, f"forewarn-{r}", warm, total, args)
            daemon.stop()  # not left polling beside the next raw run
            thread.join(30)
            raw_runs.append(raw_rate(broker.bootstrap, topic, total, f"raw-{r + 1}"))
            rounds_.append((max(raw_runs[-2:]), forewarn))
            print(f"round {r + 1}: raw {rounds_[-1][0]:,.0f}, Forewarn {forewarn:,.0f} records/s "
                  f"({forewarn / rounds_[-1][0]:.0%})", file=sys.stderr)
        raw, forewarn = sorted(rounds_, key=lambda rf: rf[1] / rf[0])[(len(rounds_) - 1) // 2]  # lower median
        daemon, thread, _ = forewarn_rate(broker.bootstrap, topic, "forewarn-latency", warm, total, args)

        daemon.latency_log = []
        rounds = max(1, int(args.latency_seconds * 2000 / args.devices))
        paced = produce(broker.bootstrap, topic, args.devices, range(WARMUP + args.live_readings,
                                                                     WARMUP + args.live_readings + rounds), rate=2000)
        wait_for_records(daemon, thread, total + paced, 0.01)
        daemon.stop()
        thread.join(30)
        lat = sorted(daemon.latency_log)
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(0.99 * (len(lat) - 1))] * 1000

    state = "no state store" if args.state == "none" else f"state checkpoints every {args.checkpoint_interval:g} s"
    print(f"{args.devices:,} devices, {total:,} records ({args.partitions} partitions), one instance, 2 threads, "
          f"{state}")
    if args.repeat > 1:
        print(f"the round with the median ratio of {args.repeat} ({', '.join(f'{f / r:.0%}' for r, f in rounds_)})")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| raw kafka-python consume (poll and discard) | {raw:,.0f} records/s |")
    print(f"| Forewarn end to end, live devices (parse, score, commit) | {forewarn:,.0f} records/s |")
    print(f"| Forewarn / raw | {forewarn / raw:.0%} |")
    print(f"| latency produce -> score at 2,000 readings/s, p50 | {p50:.1f} ms |")
    print(f"| latency produce -> score at 2,000 readings/s, p99 | {p99:.1f} ms |")


if __name__ == "__main__":
    main()
