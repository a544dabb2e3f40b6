"""Soak run: one Forewarn daemon under steady input with device churn, then idle; does anything grow?

    python benchmarks/soak.py [--quick] [--minutes 10] [--idle-minutes 2] [--rate 1500] [--devices 1000]
                              [--churn 0.2] [--ramp 60] [--idle-timeout 60] [--checkpoint-interval 30]
                              [--sample 30] [--max-rss-growth 0.10] [--no-scores] [--seed 1] [--out DIR]

One embedded Tansu broker and one real daemon (``python -m monitor.cli --threads 1 run``, changelog
state store, ``detector.idle_timeout_s`` = --idle-timeout, a 32-reading warm-up, the shipped
initialization's K), measured from outside only.  A producer thread sends --rate messages/s for
--minutes: readings of a working set of --devices single-channel devices (round robin, ts = wall
clock; they join evenly over the first --ramp s), of which --churn per minute retire and are
replaced by new ids (in steps every 10 s), plus 1% bad messages of six kinds, each with a known
rejection reason, and 0.1% duplicates; then nothing for --idle-minutes.  Every --sample s it records
the daemon's VmRSS and VmHWM (/proc), the broker's RSS, the size of /metrics and its series (all,
device-labelled, exported devices), forewarn_streams by state, the forgotten, readings and
bad-record counters, the daemon's lag gauge and the group's committed lag (up to a checkpoint
interval of readings, by design), and prints a line.

At the end it prints a table of the samples (thinned to ~12 rows), the daemon's and the broker's RSS
slopes (MB/min) over the second half of the feed and over the idle phase, the series slope, and a
verdict on five checks, each with its criterion:

1. bounded: the daemon's streams and exported devices never exceed the working set plus the retired
   devices the idle timeout still keeps (those retired within the last idle timeout + its check
   interval + 10 s);
2. flat series: the device-labelled series grow by at most 3% of their level over the second half of
   the feed (least-squares slope x its length), and not at all while idle;
3. flat memory: the daemon's RSS grows by at most --max-rss-growth (10%) of its post-warm-up level
   (the fit's value at the start of the second half) over the second half of the feed, and by no
   more than that while idle;
4. accounted: at the end forewarn_readings_total equals the readings sent, each bad-record reason's
   count equals the bad messages sent for it, and no lag is left;
5. clean: no ERROR line or traceback in the daemon log, and exit code 0 on SIGTERM.

The idle phase is judged from one idle-check interval + 10 s after the last message (what was left to
forget or to process is done by then; by design nothing is forgotten while no record arrives at
all).  Exits 0 when every check passes, 1 when one fails (the daemon exiting by itself fails check
5), 2 if the run itself failed (the broker or the daemon did not start, the broker died, the
producer's sends failed, /metrics could not be read).  Sizes whose second half of the feed would
begin before the run is steady, or whose idle phase is too short to judge, are refused.  samples.jsonl, daemon.log and summary.json go
to --out (a new temporary folder by default).  The default size takes ~12.2 minutes on 2 cores,
``--quick`` ~3; the broker keeps every record in memory (~80 MB/min, ~0.8 GB by the end at the
defaults), which bounds how long a soak on it can be (--no-scores leaves out one record per reading).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from benchmarks.children import CHILDREN, kill_children, say  # noqa: E402
from connectors.tansu import EmbeddedBroker, free_port  # noqa: E402

PARTITIONS = 4
WARMUP = 32            # readings before a device goes live: at 1.5 readings/s a device is live in ~21 s
CHURN_STEP_S = 10.0    # devices are replaced in steps this far apart
BAD_FRACTION = 0.01    # messages that are bad, each kind as often
DUPLICATE_FRACTION = 0.001  # readings sent twice (the second is a duplicate_timestamp)
GROUP, TOPIC = "soak", "sensors"

# Criteria.  The idle timeout lets the daemon keep a retired device until it has been silent for
# detector.idle_timeout_s while others kept arriving, checked every min(60, timeout / 4) s
# (monitor/daemon.py, _loop); a retired device is therefore gone by its retirement + timeout + check
# interval + the daemon's processing delay, for which 10 s (one churn step) is allowed.  Streams and
# exported devices above the working set plus the devices retired within that window are devices
# the daemon kept that it should have forgotten: check 1 is exact, not a trend.
# Series: a series left behind per retired device (200 retire per minute at the defaults) would add
# 1,000 series (~20%) over a 5-minute half; the churn itself moves the level by a churn step's
# devices (~34 of ~1,250, <1% of the series) and flags add a series per device that stays, which
# saturates long before the second half, so 3% is well above the noise and well below a leak.
SERIES_GROWTH = 0.03
# Memory: after the warm-up the daemon's RSS sits at ~385-420 MB here and moves in steps of 10-50 MB
# that come and go (one 440 MB sample among 385s: producer and fetch buffers, glibc's free lists and
# its sliding mmap threshold), so the allowance is 10% of the level over the second half, ~40 MB or
# ~8 MB/min at the defaults.  A whole stream (24 KB) left behind per retired device, 200 a minute,
# is ~4.8 MB/min, below that; but such a stream still counted fails check 1, and this check is for
# what no counter shows.  The allowance is per half whatever its length, so a longer run is
# proportionally more sensitive.  The devices join over --ramp s because a cold start of the whole
# working set adapts a full detector.adapt_batch slice at once, whose peak (~0.5 GB over the
# baseline at this warm-up) glibc keeps: a leak would first fill that freed memory, unseen in RSS.
RSS_GROWTH = 0.10

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Producer(threading.Thread):
    """Sends ``rate`` messages/s until ``seconds`` have passed, the devices joining evenly over the
    first ``ramp`` seconds; counts what it sent by kind, and the rejection reason each bad message
    must get."""

    # the bad messages: (payload maker, the reason the daemon must reject it with)
    BAD = (
        (lambda dev, ts, rng: b"not json {" + str(ts).encode(), "malformed"),
        (lambda dev, ts, rng: json.dumps({"device": dev, "ts": ts}).encode(), "missing_value"),
        (lambda dev, ts, rng: json.dumps({"device": dev, "ts": "yesterday", "value": 1.0}).encode(), "bad_timestamp"),
        (lambda dev, ts, rng: json.dumps({"device": dev, "ts": ts, "value": "high"}).encode(), "non_numeric_value"),
        (lambda dev, ts, rng: json.dumps({"ts": ts, "value": 1.0}).encode(), "missing_device"),
        # a device never seen before whose only message is bad: it must take no stream and no series
        (lambda dev, ts, rng: json.dumps({"device": f"junk-{rng.randrange(10**9)}", "ts": ts,
                                          "value": None}).encode(), "missing_value"),
    )

    def __init__(self, bootstrap: str, rate: float, devices: int, churn: float, ramp: float, seconds: float,
                 seed: int) -> None:
        super().__init__(daemon=True, name="producer")  # an interrupted run does not wait for it
        self.bootstrap, self.rate, self.churn, self.ramp, self.seconds = bootstrap, rate, churn, ramp, seconds
        self.rng = random.Random(seed)
        self.active = [f"dev-{i}" for i in range(devices)]
        self.next_id = devices
        self.stop_evt = threading.Event()
        self.sent: Counter = Counter()       # reading, bad, duplicate
        self.reasons: Counter = Counter()    # the rejections owed: reason -> count
        self.errors = 0                      # sends the broker did not acknowledge
        self.error: BaseException | None = None
        self.started = self.ended = None

    def reading(self, device: str, ts: float) -> bytes:
        phase = zlib.crc32(device.encode()) % 1000 / 159.0
        value = round(math.sin(ts / 5.0 + phase) + self.rng.gauss(0, 0.1), 4)
        return json.dumps({"device": device, "ts": ts, "value": value}).encode()

    def _failed(self, _exc) -> None:
        self.errors += 1

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001  reported by the main thread as a failed run
            self.error = exc
        finally:
            self.ended = time.monotonic()

    def _run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20, batch_size=128 * 1024, acks=1)
        try:
            self.started = time.monotonic()
            until = self.started + self.seconds
            next_churn, owed, slot, devices = self.started + CHURN_STEP_S, 0.0, 0, len(self.active)
            while not self.stop_evt.is_set() and time.monotonic() < until:
                now = time.monotonic()
                if now >= next_churn:
                    next_churn += CHURN_STEP_S
                    owed += devices * self.churn * CHURN_STEP_S / 60.0
                    k = int(owed)
                    owed -= k
                    for j in self.rng.sample(range(devices), k):
                        self.active[j] = f"dev-{self.next_id}"
                        self.next_id += 1
                j, slot = slot % devices, slot + 1
                if slot % 50 == 0:  # paced by slots: each device sends at rate / devices from when it joins
                    delay = self.started + slot / self.rate - now
                    if delay > 0:
                        time.sleep(delay)
                if now - self.started < self.ramp and j >= devices * (now - self.started) / self.ramp:
                    continue  # not joined yet
                device = self.active[j]
                ts = round(time.time(), 3)
                r = self.rng.random()
                if r < BAD_FRACTION:
                    make, reason = self.BAD[self.rng.randrange(len(self.BAD))]
                    value, kind = make(device, ts, self.rng), "bad"
                    self.reasons[reason] += 1
                else:
                    value, kind = self.reading(device, ts), "reading"
                copies = 2 if kind == "reading" and r > 1 - DUPLICATE_FRACTION else 1
                for _ in range(copies):  # the same record again: a duplicate timestamp
                    producer.send(TOPIC, key=device.encode(), value=value).add_errback(self._failed)
                self.sent[kind] += 1
                if copies == 2:
                    self.sent["duplicate"] += 1
                    self.reasons["duplicate_timestamp"] += 1
            producer.flush(60)
        finally:
            producer.close(10)

    @property
    def ids(self) -> int:
        return self.next_id


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) and CPU seconds of a process, or {} once it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return {}
    return out


def fetch(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
COUNTERS = ("readings_total", "scored_readings_total", "devices_forgotten_total", "adapted_streams_total",
            "state_checkpoints_total", "commit_failures_total", "score_devices_not_exported")


def parse_metrics(body: bytes) -> dict:
    """What a sample keeps of one /metrics scrape."""
    lines = [x for x in body.decode().splitlines() if x and not x.startswith("#")]
    out: dict = {"metrics_bytes": len(body), "series": len(lines),
                 "device_series": sum('device="' in x for x in lines),
                 "exported_devices": sum(x.startswith("forewarn_device_last_reading_timestamp_seconds{")
                                         for x in lines),
                 "streams": {}, "bad": {}, "lag": 0}
    for line in lines:
        m = SAMPLE_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "forewarn_streams":
            out["streams"][re.search(r'state="(\w+)"', labels).group(1)] = int(value)
        elif name == "forewarn_bad_records_total" and value:
            out["bad"][re.search(r'reason="(\w+)"', labels).group(1)] = int(value)
        elif name == "forewarn_consumer_lag_records":
            out["lag"] += int(value)
        elif name.removeprefix("forewarn_") in COUNTERS:
            out[name.removeprefix("forewarn_")] = int(value)
    out["streams_total"] = sum(out["streams"].values())
    out["bad_total"] = sum(out["bad"].values())
    return out


class GroupLag:
    """The group's committed lag on the input topic, through long-lived clients."""

    def __init__(self, bootstrap: str) -> None:
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]

    def __call__(self) -> int:
        ends = self.consumer.end_offsets(self.tps)
        got = self.admin.list_group_offsets({GROUP: self.tps})[GROUP]
        # Tansu reports end offsets up to a record batch short, so a partition can read as committed
        # past its end: counted as no lag, not as negative
        return sum(max(0, ends[tp] - (max(got[tp].offset, 0) if tp in got else 0)) for tp in self.tps)

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, value at the first x) of (x, y) points; (nan, nan) with fewer than 2."""
    if len(points) < 2:
        return math.nan, math.nan
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else math.nan
    return slope, my + slope * (points[0][0] - mx)


def growth(samples: list[dict], key, scale: float = 1.0) -> dict:
    """Slope per minute, fitted level at the window's start, and slope x the window's length."""
    points = [(s["t_min"], key(s) * scale) for s in samples if key(s) is not None]
    slope, level = fit(points)
    span = points[-1][0] - points[0][0] if len(points) > 1 else 0.0
    return {"per_min": slope, "level": level, "growth": slope * span, "minutes": span, "n": len(points)}


def rss_mb(s: dict) -> float | None:
    return s["VmRSS"] / 1024 if "VmRSS" in s else None


def broker_mb(s: dict) -> float | None:
    return s["broker_rss_kb"] / 1024 if s.get("broker_rss_kb") else None


class Soak:
    """One run: the broker, the daemon, the producer, the samples."""

    def __init__(self, args, broker: EmbeddedBroker, out: Path) -> None:
        self.args, self.broker, self.out = args, broker, out
        self.samples: list[dict] = []
        self.port = free_port()
        self.log_path = out / "daemon.log"
        self.samples_path = out / "samples.jsonl"
        self.samples_path.unlink(missing_ok=True)
        self.producer: Producer | None = None
        self.lag: GroupLag | None = None
        self.daemon: subprocess.Popen | None = None
        self.exit_code: int | str | None = None
        self.scrape_failures = 0

    def start_daemon(self) -> None:
        a = self.args
        topics = {TOPIC: PARTITIONS, "soak-anomalies": 1, "soak-dead": 1}
        if not a.no_scores:
            topics["soak-scores"] = 1
        self.broker.create_topics(topics)
        env = {**os.environ,
               "FOREWARN_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap, "FOREWARN_KAFKA_TOPIC": TOPIC,
               "FOREWARN_KAFKA_GROUP_ID": GROUP, "FOREWARN_KAFKA_ANOMALIES_TOPIC": "soak-anomalies",
               "FOREWARN_KAFKA_SCORES_TOPIC": "" if a.no_scores else "soak-scores",
               "FOREWARN_KAFKA_DEAD_LETTER_TOPIC": "soak-dead",
               "FOREWARN_METRICS_HOST": "127.0.0.1", "FOREWARN_METRICS_PORT": str(self.port),
               "FOREWARN_DETECTOR_WARMUP": str(WARMUP), "FOREWARN_DETECTOR_IDLE_TIMEOUT_S": str(a.idle_timeout),
               "FOREWARN_STATE_STORE": "changelog",
               "FOREWARN_STATE_CHECKPOINT_INTERVAL_S": str(a.checkpoint_interval),
               "FOREWARN_LOG_FORMAT": "json", "FOREWARN_LOG_LEVEL": "INFO"}
        with open(self.log_path, "wb") as log:
            self.daemon = subprocess.Popen([sys.executable, "-m", "monitor.cli", "--threads", "1", "run"],
                                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        CHILDREN.append(self.daemon)
        say(f"daemon pid {self.daemon.pid}, /metrics on 127.0.0.1:{self.port}; broker pid "
            f"{self.broker.process.pid} on {self.broker.bootstrap}; output in {self.out}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited at start (exit code {self.daemon.returncode}): "
                                   f"{self.log_tail()}")
            try:
                if fetch(self.port, "/readyz", timeout=5)[0] == 200:
                    say("daemon ready (partitions assigned, state restored)")
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the daemon was not ready within 120 s")

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def sample(self, t: float, phase: str) -> dict:
        p = self.producer
        s: dict = {"t_min": round(t / 60, 3), "phase": phase, **proc_status(self.daemon.pid)}
        broker = proc_status(self.broker.process.pid)
        s["broker_rss_kb"], s["broker_hwm_kb"], s["broker_cpu_s"] = (broker.get("VmRSS"), broker.get("VmHWM"),
                                                                    broker.get("cpu_s"))
        try:
            s.update(parse_metrics(fetch(self.port, "/metrics")[1]))
        except Exception as exc:  # noqa: BLE001  a missed scrape is recorded; too many fail the run
            s["scrape_error"] = repr(exc)
            self.scrape_failures += 1
        try:
            s["committed_lag"] = self.lag()
        except Exception as exc:  # noqa: BLE001  information only
            s["committed_lag_error"] = repr(exc)
        s["sent"], s["ids"] = dict(p.sent), p.ids
        self.samples.append(s)
        with open(self.samples_path, "a") as f:
            f.write(json.dumps(s) + "\n")
        return s

    HEADER = (f"{'min':>6} {'phase':>5} {'RSS MB':>7} {'HWM MB':>7} {'broker':>7} {'/metrics KB':>11} "
              f"{'series':>7} {'dev ser':>7} {'exported':>8} {'live':>5} {'warm':>5} {'adapt':>5} "
              f"{'forgot':>7} {'readings':>10} {'bad':>6} {'lag':>6} {'c.lag':>6}")

    @staticmethod
    def row(s: dict) -> str:
        st = s.get("streams", {})

        def mb(kb):
            return f"{kb / 1024:7.0f}" if kb else f"{'-':>7}"

        return (f"{s['t_min']:6.2f} {s['phase']:>5} {mb(s.get('VmRSS'))} {mb(s.get('VmHWM'))} "
                f"{mb(s.get('broker_rss_kb'))} {s.get('metrics_bytes', 0) / 1024:11.0f} {s.get('series', 0):7d} "
                f"{s.get('device_series', 0):7d} {s.get('exported_devices', 0):8d} {st.get('live', 0):5d} "
                f"{st.get('warming', 0):5d} {st.get('adapting', 0):5d} {s.get('devices_forgotten_total', 0):7d} "
                f"{s.get('readings_total', 0):10d} {s.get('bad_total', 0):6d} {s.get('lag', 0):6d} "
                f"{s.get('committed_lag', -1):6d}")

    def run(self) -> None:
        a = self.args
        self.start_daemon()
        self.lag = GroupLag(self.broker.bootstrap)
        feed_s, total_s = a.minutes * 60, (a.minutes + a.idle_minutes) * 60
        self.producer = Producer(self.broker.bootstrap, a.rate, a.devices, a.churn, a.ramp, feed_s, a.seed)
        t0 = time.monotonic()
        self.producer.start()
        say(f"feeding {a.rate:,.0f} msg/s for {a.minutes:g} min, then idle for {a.idle_minutes:g} min; "
            f"a sample every {a.sample:g} s")
        print(self.HEADER, flush=True)
        k = 0
        while True:
            k += 1
            target = t0 + min(k * a.sample, total_s)
            while time.monotonic() < target:
                time.sleep(min(1.0, max(0.0, target - time.monotonic())))
                self.check_alive()
            t = time.monotonic() - t0
            phase = "feed" if self.producer.is_alive() else "idle"
            if phase == "idle" and self.producer.error is not None:
                raise RuntimeError("the producer failed") from self.producer.error
            s = self.sample(t, phase)
            print(self.row(s), flush=True)
            if self.scrape_failures > max(2, k // 10):
                raise RuntimeError(f"/metrics could not be read {self.scrape_failures} times: {s['scrape_error']}")
            if t >= total_s - 0.5:
                break
        if "scrape_error" in self.samples[-1]:
            raise RuntimeError("the last /metrics scrape failed: nothing to judge the end by")
        if self.producer.errors:
            raise RuntimeError(f"{self.producer.errors} sends were not acknowledged by the broker: the "
                               "counts to check against are unknown")
        self.stop_daemon()

    def check_alive(self) -> None:
        if self.broker.process.poll() is not None:
            raise RuntimeError(f"the broker exited (code {self.broker.process.returncode})")
        if self.daemon.poll() is not None:
            self.exit_code = self.daemon.returncode
            raise DaemonExited(f"the daemon exited by itself (exit code {self.exit_code}): {self.log_tail()}")

    def stop_daemon(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            self.exit_code = "did not stop within 60 s of SIGTERM (killed)"
        say(f"daemon stopped on SIGTERM: exit code {self.exit_code}")

    def close(self) -> None:
        if self.producer is not None:
            self.producer.stop_evt.set()
            self.producer.join(30)
        if self.lag is not None:
            self.lag.close()  # before the broker stops: it waits for open connections


class DaemonExited(Exception):
    """The daemon ended by itself during the run: a failed check, not a failed run."""


def log_findings(path: Path) -> dict:
    """Log lines by level, the warnings and errors by message, and lines that are not JSON."""
    levels, messages, other = Counter(), Counter(), Counter()
    tracebacks = 0
    for line in path.read_text(errors="replace").splitlines():
        tracebacks += "Traceback" in line
        try:
            entry = json.loads(line)
            level = entry.get("level")
        except (ValueError, AttributeError):
            other[line[:120]] += 1
            continue
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            messages[f"{level} {entry.get('message', '')[:100]}"] += 1
    return {"levels": dict(levels), "by_message": messages.most_common(12), "not_json": other.most_common(5),
            "errors": levels["ERROR"] + levels["CRITICAL"], "tracebacks": tracebacks}


def judge(soak: Soak, failed_early: str | None) -> tuple[list[tuple[str, bool, str]], dict]:
    """The checks: (name, passed, what was measured against what), and the figures behind them."""
    a, samples = soak.args, [s for s in soak.samples if "scrape_error" not in s]
    p = soak.producer
    checks: list[tuple[str, bool, str]] = []
    feed_s = a.minutes * 60
    check_s = min(60.0, a.idle_timeout / 4)
    step = math.ceil(a.devices * a.churn * CHURN_STEP_S / 60.0)
    window = a.idle_timeout + check_s + CHURN_STEP_S
    bound = a.devices + step * (math.floor(window / CHURN_STEP_S) + 1)
    feed = [s for s in samples if s["phase"] == "feed"]
    half = [s for s in feed if s["t_min"] * 60 >= feed_s / 2]
    settled = (p.ended - p.started if p and p.ended and p.started else feed_s) + check_s + 10
    idle = [s for s in samples if s["phase"] == "idle" and s["t_min"] * 60 >= settled]

    peak_streams = max((s["streams_total"] for s in samples), default=0)
    peak_exported = max((s["exported_devices"] for s in samples), default=0)
    text = (f"peak streams {peak_streams:,}, exported devices {peak_exported:,}; at most {bound:,} "
            f"({a.devices:,} + {step} retired per {CHURN_STEP_S:g} s x {math.floor(window / CHURN_STEP_S) + 1} "
            f"steps in {window:g} s)")
    checks.append(("bounded", peak_streams <= bound and peak_exported <= bound, text))

    def series(s):
        return s["device_series"]

    sf, si = growth(half, series), growth(idle, series)
    idle_added = idle[-1]["device_series"] - idle[0]["device_series"] if len(idle) > 1 else 0
    ok = sf["n"] >= 2 and sf["growth"] <= SERIES_GROWTH * sf["level"] and idle_added <= 0
    text = (f"device series {sf['growth']:+,.0f} over the second half of the feed ({sf['per_min']:+.1f}/min; "
            f"limit {SERIES_GROWTH:.0%} of {sf['level']:,.0f}), {idle_added:+,} while idle (limit 0)")
    checks.append(("flat series", ok, text))

    rf, ri = growth(half, rss_mb), growth(idle, rss_mb)
    ok = (rf["n"] >= 2 and rf["growth"] <= a.max_rss_growth * rf["level"]
          and (ri["n"] < 2 or ri["growth"] <= a.max_rss_growth * rf["level"]))
    idle_text = f"{ri['growth']:+.1f} MB while idle" if ri["n"] >= 2 else "idle not measured (too few samples)"
    text = (f"daemon RSS {rf['growth']:+.1f} MB over the second half of the feed ({rf['per_min']:+.2f} MB/min), "
            f"{idle_text}; limit {a.max_rss_growth:.0%} of {rf['level']:.0f} MB = "
            f"{a.max_rss_growth * rf['level']:.0f} MB each")
    checks.append(("flat memory", ok, text))

    last = samples[-1] if samples else {}
    owed = dict(p.reasons) if p else {}
    got = last.get("bad", {})
    wrong = {r: (got.get(r, 0), owed.get(r, 0)) for r in set(got) | set(owed) if got.get(r, 0) != owed.get(r, 0)}
    readings_ok = last.get("readings_total") == (p.sent["reading"] if p else None)
    lag_ok = last.get("lag") == 0 and last.get("committed_lag") == 0
    text = (f"readings counted {last.get('readings_total', 0):,} of {p.sent['reading'] if p else 0:,} sent; "
            f"bad records {last.get('bad_total', 0):,} of {sum(owed.values()):,} owed"
            + (f", wrong (counted, owed): {wrong}" if wrong else " (each reason exact)")
            + f"; lag at the end {last.get('lag')} (daemon), {last.get('committed_lag')} (committed)")
    checks.append(("accounted", readings_ok and not wrong and lag_ok, text))

    logs = log_findings(soak.log_path)
    clean = logs["errors"] == 0 and logs["tracebacks"] == 0 and soak.exit_code == 0 and not failed_early
    text = (f"{logs['errors']} ERROR lines, {logs['tracebacks']} tracebacks in the log; exit code "
            f"{soak.exit_code} on SIGTERM" + (f"; {failed_early}" if failed_early else ""))
    checks.append(("clean", clean, text))

    bf, bi = growth(half, broker_mb), growth(idle, broker_mb)
    feeding = p.ended - p.started if p and p.ended and p.started else feed_s
    cpu = [s for s in feed if "cpu_s" in s]
    figures = {
        "bound": bound, "settled_s": settled, "idle_check_s": check_s,
        "daemon_rss": {"second_half": rf, "idle": ri, "peak_hwm_mb": max((s.get("VmHWM", 0) for s in samples),
                                                                         default=0) / 1024},
        "broker_rss": {"second_half": bf, "idle": bi, "peak_mb": max((s.get("broker_hwm_kb") or 0 for s in samples),
                                                                     default=0) / 1024},
        "device_series": {"second_half": sf, "idle": si, "idle_added": idle_added},
        "sent": dict(p.sent) if p else {}, "ids": p.ids if p else 0, "bad_owed": owed,
        "rate_achieved": sum(p.sent.values()) / feeding if p and feeding else 0,
        "daemon_cpu_feed": (cpu[-1]["cpu_s"] - cpu[0]["cpu_s"]) / ((cpu[-1]["t_min"] - cpu[0]["t_min"]) * 60)
        if len(cpu) > 1 else None,
        "log": logs,
    }
    return checks, figures


def thinned(samples: list[dict], rows: int = 12) -> list[dict]:
    """About ``rows`` samples, evenly spread, always with the first, the last and the last fed."""
    if len(samples) <= rows:
        return samples
    keep = {round(i * (len(samples) - 1) / (rows - 1)) for i in range(rows)}
    keep |= {i for i, s in enumerate(samples) if s["phase"] == "feed" and (i + 1 == len(samples)
                                                                         or samples[i + 1]["phase"] == "idle")}
    return [samples[i] for i in sorted(keep)]


def report(soak: Soak, checks, figures) -> None:
    print("\n" + Soak.HEADER)
    for s in thinned(soak.samples):
        print(Soak.row(s) if "scrape_error" not in s else f"{s['t_min']:6.2f} {s['phase']:>5} scrape failed")
    d, b, ser = figures["daemon_rss"], figures["broker_rss"], figures["device_series"]

    def mbm(g):
        return f"{g['per_min']:+6.2f} MB/min" if g["n"] >= 2 else "   (too few samples)"

    print(f"\nslopes over the second half of the feed ({d['second_half']['n']} samples) | idle, from "
          f"{figures['settled_s'] / 60:.1f} min ({d['idle']['n']} samples):")
    print(f"  daemon RSS     {mbm(d['second_half'])} | {mbm(d['idle'])}   (peak VmHWM {d['peak_hwm_mb']:.0f} MB)")
    print(f"  broker RSS     {mbm(b['second_half'])} | {mbm(b['idle'])}   (peak {b['peak_mb']:.0f} MB; the broker "
          "keeps every record in memory: its growth is not the daemon's)")
    idle_ser = f"{ser['idle']['per_min']:+.1f}/min" if ser["idle"]["n"] >= 2 else "-"
    print(f"  device series  {ser['second_half']['per_min']:+6.1f}/min    | {idle_ser}")
    sent = figures["sent"]
    cpu = figures["daemon_cpu_feed"]
    print(f"\nsent {sum(sent.values()):,} messages ({figures['rate_achieved']:,.0f}/s on average, the ramp included): "
          f"{sent.get('reading', 0):,} "
          f"readings, {sent.get('bad', 0):,} bad, {sent.get('duplicate', 0):,} duplicates; {figures['ids']:,} device "
          f"ids in all" + (f"; daemon CPU while fed {cpu:.0%} of a core" if cpu is not None else ""))
    others = [(m, n) for m, n in figures["log"]["by_message"] if "bad record" not in m]
    if others:
        print("daemon log, warnings and errors other than bad records: "
              + "; ".join(f"{m} x{n}" for m, n in others[:6]))
    print()
    for name, ok, text in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {text}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run, ~3 minutes: 2 min fed, 0.75 idle, --ramp 15, --idle-timeout 15, "
                         "--checkpoint-interval 10, --sample 10; those options still override it")
    ap.add_argument("--minutes", type=float, help="minutes of input (default 10; 2 with --quick)")
    ap.add_argument("--idle-minutes", type=float,
                    help="minutes without input after it (default 2; 0.75 with --quick)")
    ap.add_argument("--rate", type=float, default=1500, help="messages per second (default 1500)")
    ap.add_argument("--devices", type=int, default=1000, help="devices sending at any time (default 1000)")
    ap.add_argument("--churn", type=float, default=0.2,
                    help="fraction of the devices replaced by new ids per minute, in steps every 10 s (default 0.2)")
    ap.add_argument("--ramp", type=float,
                    help="seconds over which the devices join at the start, evenly (default 60; 15 with --quick); "
                         "0: all at once, a cold start whose adaptation burst sets the RSS for the rest of the run")
    ap.add_argument("--idle-timeout", type=float,
                    help="the daemon's detector.idle_timeout_s, > 0 (default 60; 15 with --quick)")
    ap.add_argument("--checkpoint-interval", type=float,
                    help="the daemon's state.checkpoint_interval_s (default 30, the daemon's own; 10 with --quick)")
    ap.add_argument("--sample", type=float, help="seconds between samples (default 30; 10 with --quick)")
    ap.add_argument("--max-rss-growth", type=float, default=RSS_GROWTH,
                    help="most the daemon's RSS may grow over the second half of the feed, and while idle, as a "
                         f"fraction of its level at the start of that half (default {RSS_GROWTH})")
    ap.add_argument("--no-scores", action="store_true",
                    help="no scores topic (one record per reading): less for the broker to hold")
    ap.add_argument("--seed", type=int, default=1, help="seed of the churn, values and bad messages (default 1)")
    ap.add_argument("--out", type=Path, help="folder for samples.jsonl, daemon.log and summary.json (default: a new "
                    "temporary folder)")
    args = ap.parse_args()
    for name, quick, default in (("minutes", 2, 10), ("idle_minutes", 0.75, 2), ("ramp", 15, 60),
                                 ("idle_timeout", 15, 60), ("checkpoint_interval", 10, 30), ("sample", 10, 30)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if (args.minutes <= 0 or args.idle_minutes <= 0 or args.idle_timeout <= 0 or args.sample <= 0
            or args.rate <= 0 or args.devices < 1 or not 0 <= args.churn <= 6 or args.checkpoint_interval <= 0):
        ap.error("--minutes, --rate, --sample, --idle-timeout and --checkpoint-interval must be > 0, "
                 "--idle-minutes > 0, --devices >= 1 and --churn 0 to 6")
    if args.minutes * 60 / 2 < 2 * args.sample:
        ap.error("the second half of the feed needs at least two samples: raise --minutes or lower --sample")
    if not 0 <= args.ramp <= args.minutes * 60 / 2:
        ap.error("--ramp must be 0 to half the feed (--minutes x 30 s)")
    # the second half of the feed must be steady: every device joined and past its warm-up, and the
    # first retired devices forgotten; the idle phase must hold a checkpoint (the committed offsets
    # reach the end) and two samples after it settled
    check_s = min(60.0, args.idle_timeout / 4)
    steady = max(args.ramp + WARMUP * args.devices / args.rate, CHURN_STEP_S + args.idle_timeout + check_s) + 10
    if args.minutes * 60 / 2 < steady:
        ap.error(f"the second half of the feed would begin before the run is steady (~{steady:.0f} s: the ramp and "
                 "the warm-up, or the first retired devices forgotten): raise --minutes or lower --ramp, "
                 "--idle-timeout")
    if args.idle_minutes * 60 < max(check_s + 10 + 2 * args.sample, args.checkpoint_interval + 10):
        ap.error(f"--idle-minutes must cover a checkpoint interval + 10 s and two samples from {check_s + 10:g} s "
                 f"(at least {max(check_s + 10 + 2 * args.sample, args.checkpoint_interval + 10) / 60:.2f} here)")
    out = args.out or Path(tempfile.mkdtemp(prefix="forewarn-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    # a SIGTERM to this script unwinds through the cleanup below, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    started = time.monotonic()
    failed_early = None
    try:
        with EmbeddedBroker() as broker:
            soak = Soak(args, broker, out)
            try:
                soak.run()
            except DaemonExited as exc:
                failed_early = str(exc)
                say(failed_early)
            finally:
                kill_children()
                soak.close()
    except KeyboardInterrupt:
        kill_children()
        say("interrupted")
        return 130
    except Exception:  # noqa: BLE001  the run failed, not a check: say so apart from the verdict
        kill_children()
        traceback.print_exc()
        say("the run itself failed (exit code 2)")
        return 2
    checks, figures = judge(soak, failed_early)
    report(soak, checks, figures)
    failed = [name for name, ok, _ in checks if not ok]
    (out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "checks": checks, "figures": figures}, indent=1, default=str))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f" (failed: {', '.join(failed)})" if failed else "")
          + f"; {time.monotonic() - started:.0f} s; peak RSS {own:.0f} MiB here; samples, daemon log and "
          f"summary.json in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
