"""Chaos run: SIGKILL Forewarn daemons at chosen moments, then check the crash-safety claims.

    python benchmarks/chaos.py [--quick] [--devices 200] [--group-devices 120] [--readings 600]
                               [--phase 1|2|both] [--seed 1] [--out DIR]

One embedded Tansu broker; real daemon processes (``python -m monitor.cli run``,
changelog state store, a checkpoint every 2 s).

- Phase 1: one instance, SIGKILLed 11 times at chosen moments (during the
  warm-up, during adaptation, twice mid-checkpoint, right after its partitions
  were assigned, just after the restore, right after an offset commit, during
  a clean stop, at random while readings arrive), restarted each time, then
  stopped with SIGTERM once every reading is committed.
- Phase 2: two instances, A and B, in one consumer group; A is SIGKILLed 5
  times (during adaptation, while restoring, at random, mid-checkpoint, just
  after the restore), and B, which keeps running, takes A's partitions each
  time before A comes back.

Every daemon life writes its scores to a topic of its own, so each score is
attributed to the life that made it.  Checked (each failure is a violation):

1. every published reading is scored at least once, by a score naming it;
2. after every kill and at the end, the group's committed offsets are never
   ahead of the scores: every input offset below them has a score record;
3. no reading is jumped over: in the order scores were written, a device's
   timestamp never passes the newest one scored for it by more than 1;
4. no device re-warms: no warming score (score null) after the warm-up, no
   timestamp scored both warming and live, and at each restore the devices
   whose latest snapshot was live come back live (and as many as the
   changelog holds);
5. every snapshot holds what its covered offset says (its last timestamp is
   its device's newest reading below that offset);
6. no valid reading is dead-lettered;
7. no ERROR or traceback in any daemon log, every SIGTERM exits 0, and the
   final committed offsets equal the readings published.

Prints a line per publish, start, kill and stop while it runs, then a table
per phase (readings, score records, duplicates, forward skips, gaps, dead
letters, re-warms, kills, violations) and each violation.  Exits 0 with no
violation, 1 with any, 2 if the run itself failed.  Daemon logs and
results.json go to --out (a new temporary folder by default).  ``--quick``
(60 + 40 devices, 200 readings each, 4 + 2 kills) takes 75-85 s on 2 cores,
the default size 3-4 minutes; most of it is the daemons' start-up (~4 s each).
"""
from __future__ import annotations

import argparse
import bisect
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
from collections import Counter, defaultdict
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.errors import KafkaError  # noqa: E402

from benchmarks.children import CHILDREN, kill_children, say  # noqa: E402
from connectors.tansu import EmbeddedBroker, free_port  # noqa: E402
from monitor.checkpoint import Initialization  # noqa: E402
from monitor.state import StateCodec  # noqa: E402

WARMUP = 32          # readings before a device goes live (the default 256 would make phases minutes long)
PARTITIONS = 4
CHECKPOINT_S = 2.0   # often, so kills land between, during and right after checkpoints

DAEMON_ENV = {
    "FOREWARN_DETECTOR_WARMUP": str(WARMUP),
    "FOREWARN_STATE_STORE": "changelog",
    "FOREWARN_STATE_CHECKPOINT_INTERVAL_S": str(CHECKPOINT_S),
    # 10 snapshots per loop turn spread a round over many turns, so a kill can land between a
    # round's acknowledged writes and its offset commit
    "FOREWARN_STATE_CHECKPOINT_BATCH": "10",
    # a short session, so a killed member's partitions move within seconds; the poll interval
    # (also the rebalance timeout) leaves room for a batch that adapts on a loaded 2-core machine,
    # which would otherwise lose its partitions and muddy the phase
    "FOREWARN_KAFKA_SESSION_TIMEOUT_MS": "3000",
    "FOREWARN_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    "FOREWARN_KAFKA_MAX_POLL_INTERVAL_MS": "10000",
    "FOREWARN_KAFKA_MAX_POLL_RECORDS": "500",
    "FOREWARN_KAFKA_POLL_TIMEOUT_MS": "200",
    "FOREWARN_METRICS_HOST": "127.0.0.1",
    "FOREWARN_LOG_FORMAT": "text",
    "FOREWARN_LOG_LEVEL": "DEBUG",  # the kill triggers wait for its "batch" and "checkpoint" lines
}



def reading_value(device: int, ts: int) -> float:
    return round(2.0 * math.sin(ts / 7.0 + device) + ((ts * (device + 1)) % 13) / 10.0, 4)


def device_name(i: int) -> str:
    return f"dev{i:03d}"


def log_time(line: str) -> float | None:
    """Unix time of a daemon log line ("2026-12-07 08:01:10,680 INFO ...")."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def source_of(record: dict) -> tuple[int, int]:
    """(partition, offset) of the input reading a score or dead letter names ("topic/3@1042")."""
    partition, offset = record["source"].rsplit("/", 1)[1].split("@")
    return int(partition), int(offset)


class GroupOffsets:
    """The group's committed offsets and topics' end offsets, through long-lived clients."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.group = group
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.input = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def committed(self, partitions=range(PARTITIONS)) -> dict[int, int]:
        tps = [self.input[p] for p in partitions]
        got = self.admin.list_group_offsets({self.group: tps})[self.group]
        return {tp.partition: max(got[tp].offset, 0) if tp in got else 0 for tp in tps}

    def ends(self, topic: str, partitions=range(PARTITIONS)) -> dict[int, int]:
        """End offsets as the broker reports them: Tansu's lag up to a record batch behind."""
        try:
            got = self.consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        except KafkaError:  # the changelog is made on the first assignment: nothing written yet
            return {p: 0 for p in partitions}
        return {tp.partition: end for tp, end in got.items()}

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()


class Score(NamedTuple):
    """One score record, compact (a phase holds hundreds of thousands); sorts in write order."""

    written_ms: int      # the record's timestamp: when its life sent it
    life: int            # index of the life that wrote it
    offset: int          # on that life's scores topic
    device: str
    ts: float
    live: bool           # a score; a warming reading's is null
    partition: int       # the input reading it names
    source_offset: int

    @classmethod
    def of(cls, record, life: int) -> Score:
        s = json.loads(record.value)
        return cls(record.timestamp, life, record.offset, s["device"], float(s["ts"]), s["score"] is not None,
                   *source_of(s))


class TopicReader:
    """Reads topics from the beginning, incrementally: each ``read`` returns what ``decode`` made
    of every record so far (``decode`` takes the ConsumerRecord; the same one on every read)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.consumers: dict[str, KafkaConsumer] = {}
        self.records: dict[str, list] = defaultdict(list)

    def read(self, topic: str, decode, partitions: int = 1, timeout: float = 60.0) -> list:
        consumer = self.consumers.get(topic)
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        if consumer is None:
            consumer = self.consumers[topic] = KafkaConsumer(
                bootstrap_servers=self.bootstrap, enable_auto_commit=False, max_poll_records=20_000,
                max_partition_fetch_bytes=64 * 2**20, fetch_max_bytes=128 * 2**20)
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
        started_ms = time.time() * 1000
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            records = [r for rs in batch.values() for r in rs]
            self.records[topic].extend(decode(r) for r in records)
            reached = all(consumer.position(tp) >= ends[tp] for tp in tps)
            # Tansu reports an end offset up to a record batch short, so reaching it is not enough:
            # read on until a poll comes back empty or reaches records written after this read began
            if reached and (not records or records[-1].timestamp > started_ms):
                break
        else:
            raise RuntimeError(f"could not read {topic} to its end within {timeout} s")
        return self.records[topic]

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()


class Burst(threading.Thread):
    """A publish on a thread of its own, so a kill can land while readings arrive; ``join``
    raises what the publish raised."""

    def __init__(self, publish, lo: int, hi: int) -> None:
        super().__init__(daemon=True)  # an interrupted run does not wait for it
        self.publish, self.lo, self.hi = publish, lo, hi
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.publish(self.lo, self.hi)
        except BaseException as exc:  # noqa: BLE001  re-raised on the main thread by join
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise RuntimeError(f"publishing ts [{self.lo}, {self.hi}) failed") from self.error


class Life:
    """One daemon process: its log, its own scores topic, and how it ended."""

    def __init__(self, phase: Phase, name: str, instance: str) -> None:
        self.name, self.instance, self.index = name, instance, len(phase.lives)
        self.scores_topic = f"{phase.prefix}-scores-{name}"
        phase.broker.create_topics({self.scores_topic: 1})
        self.log = phase.out / f"{name}.log"
        self.log.unlink(missing_ok=True)
        env = {**os.environ, **DAEMON_ENV, "FOREWARN_KAFKA_BOOTSTRAP_SERVERS": phase.broker.bootstrap,
               "FOREWARN_KAFKA_TOPIC": phase.topic, "FOREWARN_KAFKA_GROUP_ID": phase.group,
               "FOREWARN_KAFKA_SCORES_TOPIC": self.scores_topic, "FOREWARN_KAFKA_DEAD_LETTER_TOPIC": phase.dead,
               "FOREWARN_METRICS_PORT": str(free_port())}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "--threads", "1", "run"],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        self.started = time.time()
        self.ended: float | None = None
        self.how = "running"
        self.rc: int | None = None
        self.kill_info: dict = {}
        self._text, self._read = "", 0
        say(f"start {name} (pid {self.proc.pid}, instance {instance})")

    def text(self) -> str:
        """The log so far (read incrementally: the triggers poll it every few ms)."""
        with open(self.log, "rb") as f:
            f.seek(self._read)
            more = f.read()
        self._read += len(more)
        self._text += more.decode(errors="replace")
        return self._text

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    def wait_log(self, pattern: str, more_than: int = 0, timeout: float = 90.0, poll: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pattern) > more_than:
                return True
            if self.proc.poll() is not None:
                say(f"  {self.name} exited (rc {self.proc.returncode}) while waiting for {pattern!r}")
                return False
            time.sleep(poll)
        say(f"  {self.name}: gave up waiting for {pattern!r}")
        return False

    def checkpoint_times(self) -> list[float]:
        return [t for t in (log_time(x) for x in self.text().splitlines() if "forewarn.daemon: checkpoint " in x) if t]

    def adapted(self) -> int:
        return sum(int(n) for n in re.findall(r"streams adapted streams=(\d+)", self.text()))

    def partitions(self) -> list[int]:
        """The partitions of its latest non-empty restore."""
        found = re.findall(r"state restored partitions=\[([\d, ]+)\]", self.text())
        return [int(p) for p in found[-1].split(",")] if found else []

    def kill(self, moment: str, on_target: bool = True, **extra) -> None:
        if self.proc.poll() is not None:  # it died before the kill: a problem of its own (check 7)
            self.ended, self.how, self.rc = time.time(), "exited", self.proc.returncode
            say(f"  {self.name} had exited by itself (exit code {self.rc}) before the kill {moment!r}")
            return
        checkpoints = self.checkpoint_times()
        self.kill_info = {"moment": moment, "on_target": on_target,
                          "seconds_since_last_checkpoint": round(time.time() - checkpoints[-1], 3) if checkpoints
                          else None, "checkpoints": len(checkpoints), "adapted": self.adapted(), **extra}
        self.proc.send_signal(signal.SIGKILL)
        self.rc = self.proc.wait(30)
        self.ended, self.how = time.time(), "SIGKILL"
        since = self.kill_info["seconds_since_last_checkpoint"]
        done = f"{len(checkpoints)} checkpoints, the last {since} s before" if checkpoints else "no checkpoint yet"
        say(f"KILL {self.name}: {moment}{'' if on_target else ' (moment missed: fallback)'}; {done}; "
            f"{self.kill_info['adapted']} streams adapted" + (f"; {extra}" if extra else ""))

    def term(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.rc = self.proc.wait(timeout)
        self.ended, self.how = time.time(), "SIGTERM"
        say(f"TERM {self.name}: exit code {self.rc}")
        return self.rc


class Phase:
    """One phase: an input topic and a consumer group, the daemon lives on them, and the checks."""

    def __init__(self, name: str, broker: EmbeddedBroker, out: Path, prefix: str, devices: int,
                 readings: int) -> None:
        self.name, self.broker, self.out, self.prefix = name, broker, out, prefix
        self.devices, self.readings = devices, readings
        self.topic, self.group, self.dead = f"{prefix}-in", f"{prefix}-group", f"{prefix}-dead"
        self.changelog = f"{self.group}-state"
        broker.create_topics({self.topic: PARTITIONS, self.dead: 1})
        self.offsets = GroupOffsets(broker.bootstrap, self.group, self.topic)
        self.reader = TopicReader(broker.bootstrap)
        self.lives: list[Life] = []
        self.published = 0
        self.commit_checks: list[dict] = []
        self.violations: list[str] = []

    def close(self) -> None:
        self.reader.close()
        self.offsets.close()

    def life(self, name: str, instance: str) -> Life:
        life = Life(self, name, instance)
        self.lives.append(life)
        return life

    def scores(self, life: Life) -> list[Score]:
        return self.reader.read(life.scores_topic, lambda r: Score.of(r, life.index))

    def publish(self, lo: int, hi: int) -> None:
        """Readings of every device for timestamps [lo, hi), keyed by device."""
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all", linger_ms=5)
        try:
            for ts in range(lo, hi):
                for i in range(self.devices):
                    body = {"device": device_name(i), "ts": ts, "value": reading_value(i, ts)}
                    producer.send(self.topic, key=device_name(i).encode(), value=json.dumps(body).encode())
            producer.flush()
        finally:
            producer.close()
        n = (hi - lo) * self.devices
        self.published += n
        say(f"published ts [{lo}, {hi}) of {self.devices} devices: {n:,} readings ({self.published:,} in all)")

    def publish_async(self, lo: int, hi: int) -> Burst:
        return Burst(self.publish, lo, hi)

    # ---- kill triggers ----

    def kill_mid_checkpoint(self, life: Life, timeout: float, kill=None) -> None:
        """Kill (``kill``, by default ``life.kill``) once a checkpoint's snapshots reach the
        changelog and before its offsets are committed: the changelog's end moved on, the committed
        offsets (read after it) did not.  Only the partitions the life holds count: the other
        instance checkpoints too."""
        kill = kill or life.kill
        parts = life.partitions() or list(range(PARTITIONS))
        base_committed = self.offsets.committed(parts)
        base_end = sum(self.offsets.ends(self.changelog, parts).values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and life.proc.poll() is None:
            end = sum(self.offsets.ends(self.changelog, parts).values())
            committed = self.offsets.committed(parts)
            if committed != base_committed:  # a checkpoint finished in between: start over from it
                base_committed, base_end = committed, end
            elif end > base_end:
                kill("mid-checkpoint: snapshots on the changelog, offsets not yet committed",
                     snapshots_this_round=end - base_end, committed=committed)
                return
            time.sleep(0.01)
        kill("mid-checkpoint", on_target=False)

    def kill_after_commit(self, life: Life, timeout: float, kill=None) -> None:
        """Kill (``kill``, by default ``life.kill``) as soon as the committed offsets move on."""
        kill = kill or life.kill
        base = self.offsets.committed()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and life.proc.poll() is None:
            committed = self.offsets.committed()
            if sum(committed.values()) > sum(base.values()):
                kill("right after an offset commit", committed=committed)
                return
            time.sleep(0.01)
        kill("right after an offset commit", on_target=False)

    def wait_all_committed(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(self.offsets.committed().values()) >= self.published:
                return
            time.sleep(0.5)
        say(f"  not all committed within {timeout} s: {self.offsets.committed()} of {self.published:,}")

    # ---- checks ----

    def check_commits(self, when: str) -> None:
        """Check 2: the committed offsets (read first) against every score written so far (read after)."""
        committed = self.offsets.committed()
        scored: dict[int, set[int]] = defaultdict(set)
        for life in self.lives:
            for score in self.scores(life):
                scored[score.partition].add(score.source_offset)
        ahead = {}
        for p, c in committed.items():
            unscored = [o for o in range(c) if o not in scored[p]]
            if unscored:
                ahead[p] = {"committed": c, "unscored_below": len(unscored), "first": unscored[:5]}
        self.commit_checks.append({"when": when, "committed": committed, "ahead": ahead})
        if ahead:
            self.violations.append(f"committed offsets ahead of the scores {when}: {ahead}")
            say(f"  VIOLATION: committed offsets ahead of the scores {when}: {ahead}")

    def analyse(self) -> dict:
        """Every check on the whole phase, once its daemons have stopped."""
        say(f"checking {self.name} ...")
        res: dict = {"topic": self.topic, "devices": self.devices, "readings_per_device": self.readings,
                     "published": self.published}
        def reading(r) -> tuple[tuple[int, int], tuple[str, float]]:
            body = json.loads(r.value)
            return (r.partition, r.offset), (body["device"], float(body["ts"]))

        reading_at = dict(self.reader.read(self.topic, reading, PARTITIONS))  # (partition, offset) -> (device, ts)
        res["input_records"] = len(reading_at)
        published = {(device_name(i), float(t)) for i in range(self.devices) for t in range(self.readings)}

        scores = sorted(s for life in self.lives for s in self.scores(life))  # in the order written
        misnamed = [s for s in scores if reading_at.get((s.partition, s.source_offset)) != (s.device, s.ts)]
        if misnamed:
            self.violations.append(f"{len(misnamed)} scores name a source that is not their reading, e.g. "
                                   f"{misnamed[:3]}")
        copies = Counter((s.device, s.ts) for s in scores)
        res["score_records"] = len(scores)
        res["distinct_scored"] = len(copies)
        res["duplicates"] = len(scores) - len(copies)
        res["max_copies"] = max(copies.values(), default=0)

        # 1. coverage
        missing = sorted(published - set(copies))
        res["missing"] = len(missing)
        res["unexpected"] = sorted(set(copies) - published)[:20]
        if missing:
            self.violations.append(f"{len(missing)} published readings never scored, e.g. {missing[:10]}")
        if res["input_records"] != self.published:
            self.violations.append(f"the input topic holds {res['input_records']} readings, {self.published} "
                                   "were published")

        # 6. dead letters: none of these readings is invalid
        dead = self.reader.read(self.dead, lambda r: json.loads(r.value))
        res["dead_letters"] = len(dead)
        if dead:
            reasons = Counter(d["reason"] for d in dead)
            res["dead_letters_by_reason"] = dict(reasons)
            self.violations.append(f"{len(dead)} valid readings dead-lettered ({dict(reasons)}), e.g. {dead[0]}")

        # 3. forward skips, over all lives in write order; and gaps within one life, which are
        # expected only where that life lost a device and got it back (phase 2's survivor)
        skips, gaps = [], []
        newest: dict[str, float] = {}
        last_in_life: dict[tuple[int, str], float] = {}
        for s in scores:
            top = newest.get(s.device, -1.0)
            if s.ts > top + 1:
                skips.append({"device": s.device, "ts": s.ts, "newest_before": top, "life": self.lives[s.life].name,
                              "source": f"{s.partition}@{s.source_offset}"})
            newest[s.device] = max(top, s.ts)
            prev = last_in_life.get((s.life, s.device))
            if prev is not None and s.ts > prev + 1:
                gaps.append({"device": s.device, "life": self.lives[s.life].name, "after_ts": prev, "ts": s.ts})
            last_in_life[(s.life, s.device)] = s.ts
        several_restores = {life.name for life in self.lives if life.count(r"state restored partitions=\[\d") > 1}
        res["forward_skips"] = len(skips)
        res["forward_skip_examples"] = skips[:10]
        res["gaps_within_a_life"] = len(gaps)
        res["gaps_in_lives_with_one_restore"] = sum(1 for g in gaps if g["life"] not in several_restores)
        res["gap_examples"] = gaps[:10]
        if skips:
            self.violations.append(f"{len(skips)} readings jumped over, e.g. {skips[:3]}")

        # 4. re-warms: a warming score after the warm-up, or a ts scored both warming and live
        warming: dict[str, set] = defaultdict(set)
        live: dict[str, set] = defaultdict(set)
        for s in scores:
            (live if s.live else warming)[s.device].add(s.ts)
        rewarmed = {d: sorted(t for t in ts if t >= WARMUP)[:5] for d, ts in warming.items() if max(ts) >= WARMUP}
        both = {d: sorted(warming[d] & live[d])[:5] for d in warming if warming[d] & live[d]}
        res["rewarmed_devices"] = len(rewarmed)
        res["rewarmed_examples"] = dict(list(rewarmed.items())[:10])
        res["ts_scored_warming_and_live"] = len(both)
        res["never_live"] = sorted({d for d, _ in published} - {d for d, ts in live.items() if ts})[:10]
        res["adapted_by_life"] = {life.name: n for life in self.lives if (n := life.adapted())}
        if rewarmed:
            self.violations.append(f"{len(rewarmed)} devices re-warmed (warming scores at ts >= {WARMUP}): "
                                   f"{dict(list(rewarmed.items())[:5])}")
        if both:
            self.violations.append(f"{len(both)} devices have a ts scored both warming and live: "
                                   f"{dict(list(both.items())[:5])}")
        res.update(self._check_changelog(scores, reading_at))

        # 7. logs, exit codes, the final commit
        problems = []
        warnings: Counter = Counter()
        for life in self.lives:
            text = life.text()
            for line in text.splitlines():
                if " ERROR " in line or " CRITICAL " in line:
                    problems.append(f"{life.name}: {line[:300]}")
                elif " WARNING " in line:
                    warnings[re.sub(r"^\S+ \S+ WARNING ", "", line)[:140]] += 1
            if "Traceback" in text:
                problems.append(f"{life.name}: " + text[text.index("Traceback"):][:800])
            if life.how == "SIGTERM" and life.rc != 0:
                problems.append(f"{life.name}: exit code {life.rc} after SIGTERM")
            if life.how == "exited":
                problems.append(f"{life.name}: exited by itself (exit code {life.rc}) before it was killed")
        res["log_problems"] = problems
        res["log_warnings"] = dict(warnings.most_common(8))
        if problems:
            self.violations.append(f"{len(problems)} log problems: {problems[:3]}")
        res["final_committed"] = self.offsets.committed()
        if sum(res["final_committed"].values()) != self.published:
            self.violations.append(f"final committed offsets {res['final_committed']} do not add up to the "
                                   f"{self.published} readings published")

        res["kills"] = sum(1 for life in self.lives if life.how == "SIGKILL")
        res["kills_on_target"] = sum(1 for life in self.lives if life.kill_info.get("on_target"))
        per_life = []
        for life in self.lives:
            mine = [s for s in scores if s.life == life.index]
            entry = {"life": life.name, "instance": life.instance, "how": life.how, "rc": life.rc,
                     "seconds": round((life.ended or time.time()) - life.started, 1), "score_records": len(mine),
                     **life.kill_info}
            checkpoints = life.checkpoint_times()
            if life.how == "SIGKILL":  # what the next owner scores again
                entry["scored_after_last_checkpoint"] = sum(
                    1 for s in mine if not checkpoints or s.written_ms / 1000 > checkpoints[-1])
            per_life.append(entry)
        res["lives"] = per_life
        res["commit_checks"] = self.commit_checks
        res["violations"] = self.violations
        return res

    def _check_changelog(self, scores: list[Score], reading_at: dict) -> dict:
        """Checks 5 and 4's restore part, from every snapshot ever written to the changelog."""
        codec = StateCodec(Initialization.default())

        def snapshot(r) -> tuple:
            """(write time ms, changelog partition, device, stage or None for a tombstone, offset covered, last ts)"""
            if r.value is None:
                return r.timestamp, r.partition, r.key.decode(), None, None, None
            state = codec.decode(r.value)
            stream = state.streams[0]  # one channel per device here
            return r.timestamp, r.partition, state.device, stream.stage, state.offset, stream.last_ts

        snapshots = self.reader.read(self.changelog, snapshot, PARTITIONS)
        out = {"changelog_records": len(snapshots), "changelog_tombstones": sum(1 for s in snapshots if s[3] is None),
               "changelog_live_snapshots": sum(1 for s in snapshots if s[3] == "live")}

        # 5. each snapshot's last ts is its device's newest reading below the offset it covers
        offsets_of: dict[str, list[tuple[int, float]]] = defaultdict(list)
        home: dict[str, int] = {}
        for (p, off), (dev, ts) in reading_at.items():
            offsets_of[dev].append((off, ts))
            home[dev] = p
        for readings in offsets_of.values():
            readings.sort()
        inconsistent, uncovered = [], 0
        for _, p, dev, stage, covers, last_ts in snapshots:
            if stage is None:
                continue
            if covers < 0:  # saved after a restore that took its partition for remade: skips by ts, not offset
                uncovered += 1
                continue
            readings = offsets_of[dev]
            i = bisect.bisect_left(readings, (covers, -math.inf))
            newest_below = readings[i - 1][1] if i else None
            if p != home[dev] or newest_below != last_ts:
                inconsistent.append({"device": dev, "changelog_partition": p, "covers_offset": covers,
                                     "stage": stage, "last_ts": last_ts, "newest_ts_below_offset": newest_below})
        out["snapshots_inconsistent"] = len(inconsistent)
        out["snapshots_inconsistent_examples"] = inconsistent[:10]
        out["snapshots_covering_no_offset"] = uncovered
        if inconsistent:
            self.violations.append(f"{len(inconsistent)} snapshots disagree with the offset they cover: "
                                   f"{inconsistent[:3]}")

        # 4 (restores): at each restore, the snapshots that were on the changelog when the partitions
        # were assigned; the devices whose latest one was live must score no warming reading after it
        by_partition: dict[int, list] = defaultdict(list)
        for s in snapshots:
            by_partition[s[1]].append(s)
        restores = []  # (life index, assigned at, restored at, partitions, devices it logged)
        for li, life in enumerate(self.lives):
            assigned_at = None
            for line in life.text().splitlines():
                if "forewarn.daemon: partitions assigned" in line:
                    assigned_at = log_time(line)
                m = re.search(r"forewarn.daemon: state restored partitions=\[([\d, ]+)\] devices=(\d+)", line)
                if m:
                    restores.append((li, assigned_at, log_time(line), [int(x) for x in m.group(1).split(",")],
                                     int(m.group(2))))
        rows, rewarmed = [], []
        for k, (li, assigned_at, restored_at, parts, logged) in enumerate(restores):
            later = [r[2] for r in restores[k + 1:] if r[0] == li]
            until = later[0] if later else (self.lives[li].ended or time.time())
            latest = {}
            for p in parts:
                for s in by_partition[p]:
                    if s[0] / 1000 < assigned_at:
                        latest[s[2]] = s
            present = {d for d, s in latest.items() if s[3] is not None}
            live = {d for d, s in latest.items() if s[3] == "live"}
            warming_after = {s.device for s in scores
                             if s.life == li and restored_at - 0.001 <= s.written_ms / 1000 < until + 0.5 and not s.live}
            bad = sorted(live & warming_after)
            rows.append({"life": self.lives[li].name, "partitions": parts, "devices_logged": logged,
                         "snapshots_present": len(present), "live_snapshots": len(live),
                         "rewarmed_despite_live_snapshot": bad[:10]})
            if logged != len(present):
                self.violations.append(f"{self.lives[li].name}: a restore of partitions {parts} logged {logged} "
                                       f"devices, the changelog held {len(present)}")
            rewarmed += [(self.lives[li].name, d) for d in bad]
        out["restores"] = rows
        out["rewarmed_despite_live_snapshot"] = len(rewarmed)
        if rewarmed:
            self.violations.append(f"{len(rewarmed)} devices re-warmed although a live snapshot was saved: "
                                   f"{rewarmed[:5]}")
        return out


def cut(readings: int, at: int) -> int:
    """A burst boundary, ``at`` of a 600-reading run, scaled to ``readings`` (after the warm-up)."""
    return max(WARMUP + 8, round(at * readings / 600))


def phase_one(phase: Phase, rng: random.Random, quick: bool) -> None:
    """One instance, SIGKILLed 11 times (4 with --quick), then stopped cleanly.  A kill whose
    moment was not reached (the wait before it timed out) is counted apart as off target."""
    say(f"=== {phase.name}: one instance, SIGKILLed and restarted ===")
    r = phase.readings
    bursts = [0, WARMUP + 8, cut(r, 150), cut(r, 280), cut(r, 400), cut(r, 500), r]
    lives = iter(range(1, 100))

    def start() -> Life:
        return phase.life(f"p1-L{next(lives):02d}", "solo")

    def kill(life: Life, moment: str, on_target: bool = True, **extra) -> None:
        life.kill(moment, on_target, **extra)
        phase.check_commits(f"after killing {life.name}")

    phase.publish(bursts[0], bursts[1])  # the warm-up and a few live readings, daemon down

    if not quick:
        life = start()
        hit = life.wait_log(r"state restored") and life.wait_log(r"DEBUG forewarn.daemon: batch ")
        time.sleep(rng.uniform(0.1, 0.5))
        kill(life, "during the warm-up", hit and not life.adapted())

    life = start()
    kill(life, "during adaptation (right after the first 'streams adapted')",
         life.wait_log(r"streams adapted", timeout=120, poll=0.005))

    phase.publish(bursts[1], bursts[2])  # while down: the next life has a backlog to checkpoint through
    life = start()
    life.wait_log(r"state restored")
    phase.kill_mid_checkpoint(life, timeout=30, kill=partial(kill, life))

    if not quick:
        life = start()
        hit = life.wait_log(r"partitions assigned", poll=0.005)
        time.sleep(rng.uniform(0.0, 0.08))
        kill(life, "right after 'partitions assigned' (restoring)", hit and not life.count("state restored"))

    phase.publish(bursts[2], bursts[3])
    if not quick:
        life = start()
        hit = life.wait_log(r"state restored", poll=0.005)
        time.sleep(0.3)
        kill(life, "0.3 s after 'state restored' (re-delivered readings replaying)", hit)

    life = start()
    hit = life.wait_log(r"state restored")
    burst = phase.publish_async(bursts[3], bursts[4])
    time.sleep(rng.uniform(1.0, 4.0))
    kill(life, "at random while a burst arrives", hit)
    burst.join()

    if not quick:
        life = start()
        life.wait_log(r"state restored")
        phase.kill_mid_checkpoint(life, timeout=30, kill=partial(kill, life))

        life = start()
        life.wait_log(r"state restored")
        phase.kill_after_commit(life, timeout=30, kill=partial(kill, life))

    phase.publish(bursts[4], bursts[5])
    life = start()
    life.wait_log(r"state restored")
    life.wait_log(r"DEBUG forewarn.daemon: batch ", more_than=3)
    life.proc.send_signal(signal.SIGTERM)
    hit = life.wait_log(r"stopping: finishing", poll=0.002, timeout=20)
    time.sleep(rng.uniform(0.0, 0.1))
    kill(life, "SIGTERM, then SIGKILL during its final checkpoint", hit and not life.count("forewarn.daemon: stopped"),
         reached=[s for s in ("closing consumer", "partitions revoked") if s in life.text()])

    phase.publish(bursts[5], bursts[6])
    if not quick:
        life = start()
        hit = life.wait_log(r"state restored")
        time.sleep(rng.uniform(0.5, 3.0))
        kill(life, "at random in the last burst", hit)

        life = start()
        kill(life, "at once on 'state restored'", life.wait_log(r"state restored", poll=0.002))

    life = start()  # the clean finish
    phase.wait_all_committed()
    life.term()
    phase.check_commits("after the final SIGTERM")


def phase_two(phase: Phase, rng: random.Random, quick: bool) -> None:
    """Two instances in one group; A SIGKILLed 5 times (2 with --quick) while B keeps running."""
    say(f"=== {phase.name}: two instances in one group, one SIGKILLed repeatedly ===")
    r = phase.readings
    bursts = [0, WARMUP + 8, cut(r, 200), cut(r, 400), r]
    lives = iter(range(1, 100))
    assigned = r"state restored partitions=\[\d"  # a restore of some partitions, not of none

    def start_a() -> Life:
        return phase.life(f"p2-A{next(lives)}", "A")

    def kill_a(moment: str, on_target: bool = True, **extra) -> None:
        """Kill A, check the commits, and wait for B's rebalance: B then holds every partition,
        and A's next life restores them from B's snapshots."""
        a.kill(moment, on_target, **extra)
        restores = b.count("state restored")  # B's takeover comes a session timeout (3 s) later
        phase.check_commits(f"after killing {a.name}")
        b.wait_log(r"state restored", more_than=restores, timeout=60)

    phase.publish(bursts[0], bursts[1])
    b = phase.life("p2-B", "B")
    a = start_a()
    a.wait_log(r"state restored")
    b.wait_log(r"state restored")
    kill_a("A during adaptation", a.wait_log(r"streams adapted", timeout=60, poll=0.005))

    burst = phase.publish_async(bursts[1], bursts[2])  # while A is away
    if not quick:
        time.sleep(rng.uniform(0.5, 2.0))
        a = start_a()
        hit = a.wait_log(r"partitions assigned partitions=\[\d", poll=0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        kill_a("A right after its partitions were assigned (restoring)", hit and not a.count(assigned))
    burst.join()

    if quick:
        phase.publish(bursts[2], bursts[3])
    else:
        a = start_a()
        hit = a.wait_log(assigned)
        burst = phase.publish_async(bursts[2], bursts[3])
        time.sleep(rng.uniform(1.0, 3.0))
        kill_a("A at random while a burst arrives", hit)
        burst.join()

    a = start_a()
    a.wait_log(assigned)
    burst = phase.publish_async(bursts[3], bursts[4])
    phase.kill_mid_checkpoint(a, timeout=20, kill=kill_a)
    burst.join()

    if not quick:
        a = start_a()
        hit = a.wait_log(assigned, poll=0.002)
        time.sleep(0.2)
        kill_a("A 0.2 s after 'state restored'", hit)

    a = start_a()  # the clean finish
    a.wait_log(assigned)
    phase.wait_all_committed()
    a.term()
    b.term()
    phase.check_commits("after the final SIGTERMs")


SUMMARY_ROWS = [  # (label, key in the phase's results)
    ("readings published", "published"),
    ("score records", "score_records"),
    ("readings never scored", "missing"),
    ("duplicates (scored again after a kill)", "duplicates"),
    ("most copies of one reading", "max_copies"),
    ("readings jumped over (forward skips)", "forward_skips"),
    ("gaps within one life (device lost and regained)", "gaps_within_a_life"),
    ("dead letters", "dead_letters"),
    ("devices re-warmed", "rewarmed_devices"),
    ("re-warmed despite a live snapshot", "rewarmed_despite_live_snapshot"),
    ("snapshots disagreeing with their offset", "snapshots_inconsistent"),
    ("kills (SIGKILL)", "kills"),
    ("kills that hit the moment aimed at", "kills_on_target"),
]


def print_summary(results: dict[str, dict]) -> None:
    names = list(results)
    width = max(len(label) for label, _ in SUMMARY_ROWS) + 2
    print("\n" + "".ljust(width) + "".join(f"{n:>12}" for n in names))
    for label, key in SUMMARY_ROWS:
        print(label.ljust(width) + "".join(f"{results[n].get(key, 0):>12,}" for n in names))
    print("violations".ljust(width) + "".join(f"{len(results[n]['violations']):>12,}" for n in names))
    for n in names:
        for v in results[n]["violations"]:
            print(f"VIOLATION ({n}): {v[:1000]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smaller run: 60 + 40 devices, 200 readings each, 4 + 2 kills (75-85 s on 2 cores); "
                         "--devices, --group-devices and --readings still override its sizes")
    ap.add_argument("--devices", type=int, help="devices in phase 1 (default 200; 60 with --quick)")
    ap.add_argument("--group-devices", type=int, help="devices in phase 2 (default 120; 40 with --quick)")
    ap.add_argument("--readings", type=int, help="readings per device, one per timestamp 0, 1, ... "
                    f"(default 600; 200 with --quick; at least {WARMUP + 8})")
    ap.add_argument("--phase", choices=("1", "2", "both"), default="both", help="which phases to run (default both)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random kill moments (default 1)")
    ap.add_argument("--out", type=Path, help="folder for the daemon logs and results.json (default: a new "
                    "temporary folder)")
    args = ap.parse_args()
    def size(given: int | None, quick: int, default: int) -> int:
        return given if given is not None else quick if args.quick else default

    devices, group_devices = size(args.devices, 60, 200), size(args.group_devices, 40, 120)
    readings = size(args.readings, 200, 600)
    if readings < WARMUP + 8 or min(devices, group_devices) < 1 or max(devices, group_devices) > 1000:
        ap.error(f"--readings must be at least {WARMUP + 8}, and the device counts 1 to 1000")
    out = args.out or Path(tempfile.mkdtemp(prefix="forewarn-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # a SIGTERM to this script unwinds through the cleanup below, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    results: dict[str, dict] = {}
    phases: list[Phase] = []
    started = time.monotonic()
    try:
        with EmbeddedBroker() as broker:
            say(f"broker pid {broker.process.pid} on {broker.bootstrap}; logs in {out}")
            try:
                plan = [("phase 1", "chaos1", devices, phase_one), ("phase 2", "chaos2", group_devices, phase_two)]
                for label, prefix, n, run in plan:
                    if args.phase not in ("both", label[-1]):
                        continue
                    phase = Phase(label, broker, out, prefix, n, readings)
                    phases.append(phase)
                    run(phase, rng, args.quick)
                    results[label] = phase.analyse()
            finally:
                kill_children()
                for phase in phases:
                    phase.close()  # before the broker stops: it waits for open connections
    except KeyboardInterrupt:
        kill_children()
        say("interrupted")
        return 130
    except Exception:  # noqa: BLE001  the run failed, not a check: say so apart from violations
        kill_children()
        traceback.print_exc()
        say("the run itself failed (exit code 2)")
        return 2
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_summary(results)
    total = sum(len(res["violations"]) for res in results.values())
    # ru_maxrss is in KiB on Linux; for the children, the largest one reaped (a daemon or the broker)
    own, child = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"\n{total} violations; {time.monotonic() - started:.0f} s; peak RSS {own:.0f} MiB here, {child:.0f} MiB "
          f"in the largest daemon or broker; details in {out / 'results.json'}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
