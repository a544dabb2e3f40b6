"""Durable device state against the real broker: devices survive restarts, moves and corrupt records."""
from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time

import pytest
from kafka import TopicPartition

from connectors.state_store import LocalStore, _newest
from connectors.tansu import free_port
from monitor.checkpoint import Initialization
from monitor.readings import Reading
from monitor.state import StateCodec
from tests.kafka_support import (assert_warmed_once, committed_offsets, http_get, metric_value, publish, read_topic,
                                 start_daemon, wait_for)

DEVICES = 8
WARMUP = "64"


def _messages(ts_range) -> list[tuple[bytes, bytes]]:
    return [(f"d{d}".encode(), json.dumps({"device": f"d{d}", "ts": t, "value": (t * (d + 1)) % 17 / 3.0}).encode())
            for t in ts_range for d in range(DEVICES)]


def _env(broker, topic, group, port, scores_topic, **extra) -> dict[str, str]:
    return {"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": topic,
            "FOREWARN_KAFKA_GROUP_ID": group, "FOREWARN_METRICS_HOST": "127.0.0.1",
            "FOREWARN_METRICS_PORT": str(port), "FOREWARN_KAFKA_SCORES_TOPIC": scores_topic,
            "FOREWARN_DETECTOR_WARMUP": WARMUP, "FOREWARN_STATE_CHECKPOINT_INTERVAL_S": "1",
            # checkpoints spread over several loop turns, so rebalances and kills land mid-way
            "FOREWARN_STATE_CHECKPOINT_BATCH": "3", **extra}


def _all_committed(broker, group, topic, n):
    return lambda: sum(committed_offsets(broker.bootstrap, group, topic).values()) == n


def test_two_instances_stop_one_its_devices_continue_live_on_the_other(broker, tmp_path):
    topic, scores, group = "pair-sensors", "pair-scores", "pair"
    broker.create_topics({topic: 2, scores: 1})
    ports = free_port(), free_port()
    a = start_daemon(_env(broker, topic, group, ports[0], scores), tmp_path / "a.log")
    b = start_daemon(_env(broker, topic, group, ports[1], scores), tmp_path / "b.log")
    try:
        # both in the group before the readings: a started seconds before b could take them all
        wait_for(lambda: all("partitions assigned" in (tmp_path / f"{x}.log").read_text() for x in "ab"), 180,
                 what="both instances to join")
        publish(broker.bootstrap, topic, _messages(range(300)))
        wait_for(_all_committed(broker, group, topic, 300 * DEVICES), 180, what="both instances to process")
        a.send_signal(signal.SIGTERM)
        assert a.wait(60) == 0
        publish(broker.bootstrap, topic, _messages(range(300, 600)))
        wait_for(_all_committed(broker, group, topic, 600 * DEVICES), 180, what="the survivor to take over")
        _, text = http_get(f"http://127.0.0.1:{ports[1]}/metrics")
        restored = metric_value(text, "forewarn_restored_streams_total")
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
    scored = read_topic(broker.bootstrap, scores)
    assert {(s["device"], s["ts"]) for s in scored} == {(f"d{d}", float(t)) for t in range(600) for d in range(DEVICES)}
    assert_warmed_once(scored)  # the moved devices continued live, no second warm-up
    assert restored and restored > 0


def test_corrupt_state_record_rewarms_that_device_alone(broker, tmp_path):
    topic, scores, group = "corrupt-sensors", "corrupt-scores", "corrupt"
    broker.create_topics({topic: 1, scores: 1})
    port = free_port()
    store = tmp_path / "state.db"
    env = _env(broker, topic, group, port, scores, FOREWARN_STATE_STORE="local", FOREWARN_STATE_LOCAL_PATH=str(store))
    first = start_daemon(env, tmp_path / "first.log")
    try:
        publish(broker.bootstrap, topic, _messages(range(200)))
        wait_for(_all_committed(broker, group, topic, 200 * DEVICES), 180, what="the first run")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    db = sqlite3.connect(store)
    assert db.execute("SELECT count(*) FROM state").fetchone()[0] == DEVICES
    good = db.execute("SELECT data FROM state WHERE device = 'd1'").fetchone()[0]
    assert StateCodec(Initialization.default()).decode(bytes(good)).device == "d1"
    db.execute("UPDATE state SET data = ? WHERE device = 'd0'", (good[:40] + b"garbage" + good[47:],))
    db.commit()
    db.close()
    second = start_daemon(env, tmp_path / "second.log")
    try:
        publish(broker.bootstrap, topic, _messages(range(200, 400)))
        wait_for(_all_committed(broker, group, topic, 400 * DEVICES), 180, what="the second run")
        _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    assert metric_value(text, "forewarn_state_restore_failures_total") == 1.0
    assert metric_value(text, "forewarn_restored_streams_total") >= DEVICES - 1  # a rebalance restores again
    log = (tmp_path / "second.log").read_text()
    assert "device state not restored" in log and "checksum mismatch" in log
    scored = read_topic(broker.bootstrap, scores)
    assert_warmed_once([s for s in scored if s["device"] != "d0"])
    d0_after = [s for s in scored if s["device"] == "d0" and s["ts"] >= 200]
    assert any(s["score"] is None for s in d0_after), "d0 should have re-warmed"
    assert all(s["score"] is not None for s in d0_after if s["ts"] >= 200 + int(WARMUP))


def test_a_batch_that_fails_mid_way_is_replayed_whole_after_restart(broker, tmp_path):
    """An unexpected error inside a batch ends the daemon; the devices' in-memory state
    has already seen part of that batch, so it must not be saved on the way out, or the
    replayed readings would be refused as out-of-order timestamps instead of scored."""
    import threading

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "fail-sensors", "fail-scores", "fail"
    broker.create_topics({topic: 1, scores: 1})
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores, FOREWARN_STATE_STORE="local",
                                FOREWARN_STATE_LOCAL_PATH=str(tmp_path / "state.db"),
                                FOREWARN_KAFKA_MAX_POLL_RECORDS="100")}

    def run_daemon(daemon: Daemon) -> list:
        errors = []

        def target():
            try:
                daemon.run()
            except Exception as exc:  # noqa: BLE001  (what the daemon died of, checked below)
                errors.append(exc)
        thread = threading.Thread(target=target)
        thread.start()
        return [thread, errors]

    publish(broker.bootstrap, topic, _messages(range(200)))
    first = Daemon(Config.load(environ=env))
    observe, calls = first.pipeline.fleet.observe, []

    def failing_observe(rows, values):  # a live batch fails part-way through its rounds
        calls.append(1)
        if len(calls) == 40:
            raise RuntimeError("simulated failure inside a batch")
        return observe(rows, values)
    first.pipeline.fleet.observe = failing_observe
    thread, errors = run_daemon(first)
    thread.join(120)
    first.stop()
    assert errors and "simulated failure" in str(errors[0])
    assert 0 < sum(committed_offsets(broker.bootstrap, group, topic).values()) < 200 * DEVICES

    second = Daemon(Config.load(environ=env))
    thread, errors = run_daemon(second)
    try:
        wait_for(_all_committed(broker, group, topic, 200 * DEVICES), 180, what="the restarted daemon")
    finally:
        second.stop()
        thread.join(60)
    assert not errors
    scored = read_topic(broker.bootstrap, scores)
    assert {(s["device"], s["ts"]) for s in scored} == {(f"d{d}", float(t)) for t in range(200) for d in range(DEVICES)}
    assert not second.pipeline.bad_counts, "re-delivered readings were refused"


def test_a_clean_stop_saves_every_device_before_it_commits(broker, tmp_path):
    """No periodic checkpoint comes in time: the one made on the way out must write the
    devices' state before committing the offsets it covers, or a restart would restore
    older state and never replay the readings in between."""
    import threading

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "stop-sensors", "stop-scores", "stop"
    broker.create_topics({topic: 1, scores: 1})
    db = tmp_path / "state.db"
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores, FOREWARN_STATE_STORE="local",
                                FOREWARN_STATE_LOCAL_PATH=str(db), FOREWARN_STATE_CHECKPOINT_INTERVAL_S="3600")}
    publish(broker.bootstrap, topic, _messages(range(120)))
    daemon = Daemon(Config.load(environ=env))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: daemon.records == 120 * DEVICES, 120, what="the daemon to process everything")
    finally:
        daemon.stop()
        thread.join(60)
    assert sum(committed_offsets(broker.bootstrap, group, topic).values()) == 120 * DEVICES
    codec = StateCodec(Initialization.default())
    with sqlite3.connect(db) as conn:
        saved = {device: codec.decode(bytes(data)) for device, data in conn.execute("SELECT device, data FROM state")}
    assert sorted(saved) == [f"d{d}" for d in range(DEVICES)]
    assert {s.last_ts for state in saved.values() for s in state.streams} == {119.0}


def test_a_partition_kept_through_a_rebalance_replays_what_its_unsaved_devices_missed(broker, tmp_path):
    """kafka-python keeps the fetch position of a partition that stays with a member across a
    rebalance.  When its devices' state could not all be saved on revoke (a large fleet runs
    out of time), they restore from the last checkpoint: the daemon must go back to the
    committed offset, or the readings since that checkpoint would never reach their state."""
    import threading
    import time

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "kept-sensors", "kept-scores", "kept"
    broker.create_topics({topic: 2, scores: 1})
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores)}
    a, b = Daemon(Config.load(environ=env)), Daemon(Config.load(environ=env))
    a._save_on_revoke = lambda devices: None  # every write on revoke cut short
    threads = [threading.Thread(target=a.run)]
    threads[0].start()
    try:
        publish(broker.bootstrap, topic, _messages(range(100)))
        wait_for(_all_committed(broker, group, topic, 100 * DEVICES), 120, what="the first checkpoint")
        a._last_checkpoint = time.monotonic() + 3600  # no checkpoint from here on
        publish(broker.bootstrap, topic, _messages(range(100, 200)))
        wait_for(lambda: a.records == 200 * DEVICES, 60, what="the readings after the checkpoint")
        threads.append(threading.Thread(target=b.run))
        threads[1].start()
        wait_for(lambda: b._assigned and not b._to_restore and a._assigned and not a._to_restore
                 and len(a._assigned) + len(b._assigned) == 2, 120, what="the rebalance and restores")

        def kept_devices_caught_up():
            held = [s.last_ts for stream in a.pipeline._devices.values() for s in stream]
            return held and set(held) == {199.0}
        wait_for(kept_devices_caught_up, 60, what="the kept partition's devices to replay 100..199")
    finally:
        for daemon in (a, b):
            daemon.stop()
        for thread in threads:
            thread.join(60)
    assert not a.pipeline.bad_counts  # the replayed readings were scored, not refused as out of order


def test_the_changelog_follows_the_input_partitions_or_says_what_to_do(broker):
    """Snapshots of input partition p go to changelog partition p: a changelog made for
    fewer partitions (an input topic that grew, or did not exist yet) must be grown or
    refused with a reason, not fail every checkpoint and restore with a KeyError."""
    import pytest

    from connectors.state_store import ChangelogStore, StoreError
    from monitor.config import KafkaConfig
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap)
    fresh = ChangelogStore(cfg, "three-state")
    fresh.ensure_partitions(3)
    fresh.put(2, "d2", b"state of d2")
    fresh.flush()
    assert fresh.load([2]) == [(2, "d2", b"state of d2")]
    broker.create_topics({"one-state": 1})
    small = ChangelogStore(cfg, "one-state")
    small.ensure_partitions(1)
    with pytest.raises(StoreError, match=r"has 1 partition\(s\) but the input topic has 2.*--partitions 2"):
        small.ensure_partitions(2)  # Tansu cannot add partitions, so this one is refused
    for store in (fresh, small):
        store.close()


def test_a_changelog_that_is_not_compacted_is_named_in_a_warning(broker, forewarn_logs):
    """A changelog made beforehand with cleanup.policy=delete loses the snapshots of devices
    quiet past its retention: the store says so at start, and not for a compacted one."""
    from kafka.admin import NewTopic

    from connectors.kafka import admin_client
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap)
    admin = admin_client(cfg, 10_000)
    admin.create_topics([NewTopic(name, 1, -1, topic_configs={"cleanup.policy": policy})
                         for name, policy in (("deleting-state", "delete"), ("compacted-state", "compact,delete"))])
    admin.close()
    for name in ("deleting-state", "compacted-state", "new-state"):
        store = ChangelogStore(cfg, name)
        store.ensure_partitions(1)
        store.close()
    warned = [r for r in forewarn_logs if r.getMessage().startswith("changelog topic is not compacted")]
    assert [r.fields["topic"] for r in warned] == ["deleting-state"]
    assert warned[0].fields["cleanup_policy"] == "delete"
    assert "cleanup.policy=compact" in warned[0].getMessage()


def test_a_snapshot_too_large_for_the_changelog_replaces_the_older_one_with_a_tombstone(broker):
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "big-state", max_snapshot_bytes=2**16)
    store.ensure_partitions(1)
    store.put(0, "many-channels", b"x" * 1000)
    store.put(0, "other", b"y")
    store.flush()
    assert store.take_dropped() == []
    store.put(0, "many-channels", b"x" * (2**16 + 1))  # refused before the broker sees it
    store.flush()
    assert store.take_dropped() == [("many-channels", 2**16 + 1)] and store.take_dropped() == []
    assert store.load([0]) == [(0, "other", b"y")]  # the stale snapshot is not restored either
    store.close()


def test_a_device_too_large_to_checkpoint_does_not_stop_the_checkpoints_of_the_others(broker, tmp_path):
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    topic, scores, group = "wide-sensors", "wide-scores", "wide"
    broker.create_topics({topic: 1, scores: 1})
    port = free_port()
    wide = [(b"wide", json.dumps({"device": "wide", "ts": t, "values": {f"c{c}": (t * c) % 7 / 2.0
                                                                          for c in range(12)}}).encode())
            for t in range(100)]
    env = _env(broker, topic, group, port, scores, FOREWARN_STATE_MAX_SNAPSHOT_BYTES="65536")
    daemon = start_daemon(env, tmp_path / "wide.log")
    try:
        publish(broker.bootstrap, topic, _messages(range(100)) + wide)
        wait_for(_all_committed(broker, group, topic, 100 * DEVICES + 100), 180, what="offsets to be committed")
        _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert metric_value(text, "forewarn_state_snapshots_dropped_total") >= 1
    assert "device snapshot too large for the changelog" in (tmp_path / "wide.log").read_text()
    store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), f"{group}-state")
    saved = {device for _, device, _ in store.load([0])}
    store.close()
    assert saved == {f"d{d}" for d in range(DEVICES)}  # 12 live channels (~110 KB) would not fit


def test_a_daemon_whose_changelog_has_too_few_partitions_exits_saying_what_to_do(broker, tmp_path):
    topic, group = "grown-sensors", "grown"
    broker.create_topics({topic: 2, f"{group}-state": 1})  # as if the input topic had grown since
    daemon = start_daemon(_env(broker, topic, group, free_port(), ""), tmp_path / "grown.log")
    try:
        assert daemon.wait(120) == 2
    finally:
        if daemon.poll() is None:
            daemon.kill()
    log = (tmp_path / "grown.log").read_text()
    assert "changelog topic 'grown-state' has 1 partition(s) but the input topic has 2" in log
    assert "Traceback" not in log


def test_devices_silent_for_the_idle_timeout_are_forgotten_with_their_state_and_rewarm_on_return(broker, tmp_path):
    import threading

    from kafka import KafkaProducer
    from prometheus_client import CollectorRegistry, generate_latest

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "idle-sensors", "idle-scores", "idle"
    broker.create_topics({topic: 1, scores: 1})
    store = tmp_path / "state.db"
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores, FOREWARN_STATE_STORE="local",
                                FOREWARN_STATE_LOCAL_PATH=str(store), FOREWARN_DETECTOR_IDLE_TIMEOUT_S="2")}
    registry = CollectorRegistry()
    daemon = Daemon(Config.load(environ=env), registry=registry)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    publish(broker.bootstrap, topic, _messages(range(100)))  # every device live (warm-up 64)
    wait_for(_all_committed(broker, group, topic, 100 * DEVICES), 180, what="the warm-up to be processed")
    stop = threading.Event()

    def d0_keeps_reporting():  # the instance keeps receiving: silence is d1..d7's alone
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        t = 100
        while not stop.is_set():
            producer.send(topic, key=b"d0", value=json.dumps({"device": "d0", "ts": t, "value": t % 5}).encode())
            producer.flush()
            t += 1
            stop.wait(0.2)
        producer.close()
    reporter = threading.Thread(target=d0_keeps_reporting)
    reporter.start()
    try:
        wait_for(lambda: daemon.pipeline.devices() == {"d0"}, 120, what="the silent devices to be forgotten")
        wait_for(lambda: {d for (d,) in sqlite3.connect(store).execute("SELECT device FROM state")} <= {"d0"},
                 120, what="their saved state to be deleted")
        stop.set()
        reporter.join(30)
        exported = generate_latest(registry).decode()
        assert 'device="d1"' not in exported and 'device="d0"' in exported
        assert metric_value(exported, "forewarn_devices_forgotten_total") == DEVICES - 1
        publish(broker.bootstrap, topic, [(b"d1", json.dumps({"device": "d1", "ts": 500 + t, "value": t % 3})
                                           .encode()) for t in range(3)])
        wait_for(lambda: "d1" in daemon.pipeline.devices(), 120, what="d1 to return")
    finally:
        stop.set()
        daemon.stop()
        thread.join(60)
    returned = [s for s in read_topic(broker.bootstrap, scores) if s["device"] == "d1" and s["ts"] >= 500]
    assert returned and all(s["score"] is None for s in returned)  # warming afresh, not the old model


class _RestoreSource:
    """What ``Daemon._restore_partitions`` asks of a source: every partition committed at one offset."""

    def __init__(self, committed: int, partitions: int) -> None:
        self.committed, self.partitions = committed, partitions

    def rewind(self, partitions):
        return {tp: self.committed for tp in partitions}

    def partitions_for_topic(self):
        return self.partitions

    def partitions_now(self, timeout_ms=2000):
        return self.partitions

    def resume(self, partitions):
        pass


def _idle_daemon(**env):
    from prometheus_client import CollectorRegistry

    from monitor.config import Config
    from monitor.daemon import Daemon
    return Daemon(Config.load(environ={"FOREWARN_STATE_STORE": "none", **env}), registry=CollectorRegistry())


def _restored_from(store, **env):
    """A fresh daemon that has restored partition 0 of topic "t" from ``store`` (committed at 40)."""
    from kafka import TopicPartition
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", **env)
    daemon.store = store
    daemon._assigned, daemon._to_restore = {TopicPartition("t", 0)}, {TopicPartition("t", 0)}
    daemon._restore_partitions(_RestoreSource(committed=40, partitions=1))
    return daemon


def test_a_restored_state_covers_readings_of_its_own_partition_only():
    """The input topic grew and device d's key moved from partition 0 to 1: one poll brings
    its new readings on 1 and re-delivered ones on 0.  Only the latter are covered by its
    state (offset 500 on partition 0), whatever their order in the batch."""
    from connectors.kafka import PolledBatch
    from monitor.readings import Reading
    daemon = _idle_daemon()
    daemon._covered["d"] = (0, 500)
    batch = PolledBatch()
    for partition, offsets, ts0 in ((1, range(10, 15), 100), (0, range(495, 505), 85)):
        for i, offset in enumerate(offsets):
            r = Reading("d", float(ts0 + i), {"v": 1.0})
            batch.readings.append(r)
            batch.offset_of[id(r)] = (partition, offset)
            batch.partition_of["d"] = partition
    kept = daemon._skip_covered(batch)
    assert [(batch.offset_of[id(r)]) for r in kept] == [(1, o) for o in range(10, 15)] + [(0, o) for o in range(500, 505)]
    assert "d" not in daemon._covered and daemon._old_home == {"d": 0}


def test_idleness_is_measured_against_the_newest_record_so_a_silent_instance_forgets_nothing():
    daemon = _idle_daemon(FOREWARN_DETECTOR_IDLE_TIMEOUT_S="60")
    daemon._last_seen = {"quiet": 1000.0, "busy": 1100.0}
    daemon._newest_seen = 1050.0             # nothing has arrived since: however long that lasts
    daemon._forget_idle(60.0)
    assert set(daemon._last_seen) == {"quiet", "busy"}
    daemon._newest_seen = 1100.0             # others kept arriving for a minute past "quiet"'s last
    daemon._forget_idle(60.0)
    assert set(daemon._last_seen) == {"busy"}


def test_a_channel_quiet_past_the_idle_timeout_is_forgotten_and_its_device_saved_without_it():
    from monitor.readings import Reading
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", FOREWARN_DETECTOR_IDLE_TIMEOUT_S="0",
                          FOREWARN_DETECTOR_CHANNEL_IDLE_TIMEOUT_S="60")
    assert daemon._idle_check_s == 15.0                            # a quarter of the one timeout set
    daemon.pipeline.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3, "disk-0": 2.0}) for t in range(30)]
                         + [Reading("srv", float(t), {"cpu": 1.0 + t % 3, "disk-1": 2.0}) for t in range(30, 100)])
    daemon.pipeline.take_changed()
    daemon._last_seen, daemon._newest_seen = {"srv": 99.0}, 99.0
    daemon._forget_idle(60.0)
    assert set(daemon._last_seen) == {"srv"}                       # the device stays
    assert daemon.registry.get_sample_value("forewarn_channels_forgotten_total") == 1
    assert daemon.registry.get_sample_value("forewarn_streams", {"state": "live"}) == 2  # now, not at the next batch
    assert daemon.pipeline.take_changed() == {"srv"}                # written without it at the next checkpoint
    assert [s.channel for s in daemon.pipeline.export_devices(["srv"])[0].streams] == ["cpu", "disk-1"]


def test_a_moved_device_leaves_no_snapshot_on_its_old_partition(broker):
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    from monitor.readings import Reading
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "moved-state")
    store.ensure_partitions(2)
    daemon.pipeline.feed([Reading("d", float(t), {"v": t % 5}) for t in range(20)])
    daemon._partition_of["d"] = 0
    daemon._write_states(["d"])
    store.flush()
    assert [p for p, device, _ in store.load([0, 1]) if device == "d"] == [0]
    daemon._partition_of["d"], daemon._old_home["d"] = 1, 0   # its key now lands on partition 1
    flush = store.flush  # the store's own, for after the recording
    sent = _record_calls(store)
    daemon._pending = {("t", 1): 1}
    daemon.pipeline.feed([Reading("d", 20.0, {"v": 0.0})])      # changed: written at the checkpoint
    daemon._checkpoint_now(_CommittingSource())
    # the old copy's tombstone only once the new snapshot is acknowledged: a crash between
    # the two acknowledgements would otherwise leave the device no snapshot at all
    assert sent == [("put", 1, "d"), ("flush",), ("delete", 0, "d")]
    assert daemon._old_home == {}
    flush()
    assert store.load([0]) == [] and [p for p, _, _ in store.load([0, 1])] == [1]
    store.close()


def test_a_moved_device_saved_on_revoke_has_its_old_copy_deleted_after_its_new_snapshot(broker):
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    from monitor.readings import Reading
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "revoked-state")
    store.ensure_partitions(2)
    daemon.pipeline.feed([Reading("d", float(t), {"v": t % 5}) for t in range(20)])
    daemon._partition_of["d"], daemon._old_home["d"] = 1, 0
    sent = _record_calls(store)
    daemon._save_on_revoke({"d"})
    assert sent == [("put", 1, "d"), ("flush",), ("delete", 0, "d"), ("flush",)]
    assert [p for p, _, _ in store.load([0, 1])] == [1]
    store.close()


def _record_calls(store) -> list:
    """What ``store`` is asked to do, in order: ("put", partition, device), ("delete", ...), ("flush",)."""
    sent = []
    put, delete, flush = store.put, store.delete, store.flush
    store.put = lambda p, d, data: (sent.append(("put", p, d)), put(p, d, data))[1]
    store.delete = lambda p, d: (sent.append(("delete", p, d)), delete(p, d))[1]
    store.flush = lambda **kw: (sent.append(("flush",)), flush(**kw))[1]
    return sent


class _DictChangelog:
    """Keyed by (partition, device), as a compacted changelog is per partition; with
    ``full_once`` its next delete finds no room in the producer's buffer."""

    shared = True

    def __init__(self):
        self.data, self.full_once = {}, False

    def put(self, partition, device, data):
        self.data[(partition, device)] = data

    def delete(self, partition, device):
        if self.full_once:
            from kafka.errors import KafkaTimeoutError
            self.full_once = False
            raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
        self.data.pop((partition, device), None)

    def take_dropped(self):
        return []

    def flush(self, on_wait=None):
        pass


class _CommittingSource:
    def __init__(self):
        self.committed = []

    def commit(self, offsets):
        self.committed.append(offsets)

    def in_group(self):
        return True


def test_a_recreated_input_topic_is_scored_afresh_not_skipped_as_covered(broker, tmp_path):
    """Deleting the input topic deletes its committed offsets, and the topic made again
    numbers its records from 0: the states saved on the old one cover offsets the new one
    has not reached, and skipping what they cover would drop its readings unseen."""
    import logging
    import threading

    from kafka import KafkaAdminClient

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "again-sensors", "again-scores", "again"
    broker.create_topics({topic: 1, scores: 1})
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores, FOREWARN_STATE_STORE="local",
                                FOREWARN_STATE_LOCAL_PATH=str(tmp_path / "state.db"))}

    def run_until(records: int) -> None:
        daemon = Daemon(Config.load(environ=env))
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            wait_for(lambda: daemon.records == records, 120, what="the daemon to process everything")
        finally:
            daemon.stop()
            thread.join(60)

    publish(broker.bootstrap, topic, _messages(range(200)))
    run_until(200 * DEVICES)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    wait_for(lambda: not committed_offsets(broker.bootstrap, group, topic), 30, what="the topic to be deleted")
    broker.create_topics({topic: 1})
    # half the devices report on the new topic, then all: the silent half's states must not
    # come back covering the old topic's offsets once the new one has a committed offset
    half = [m for m in _messages(range(200, 260)) if int(m[0][1:]) < DEVICES // 2]
    publish(broker.bootstrap, topic, half)
    warnings: list[str] = []
    collect = logging.Handler(logging.WARNING)
    collect.emit = lambda record: warnings.append(record.getMessage())
    daemon_log = logging.getLogger("forewarn.daemon")  # its parent may not propagate (setup_logging)
    daemon_log.addHandler(collect)
    try:
        run_until(len(half))
    finally:
        daemon_log.removeHandler(collect)
    assert any("deleted and made again" in w for w in warnings)
    publish(broker.bootstrap, topic, _messages(range(260, 300)))
    run_until(40 * DEVICES)
    scored = read_topic(broker.bootstrap, scores)
    assert {(s["device"], s["ts"]) for s in scored} == \
        {(f"d{d}", float(t)) for d in range(DEVICES)
         for t in [*range(200), *(range(200, 260) if d < DEVICES // 2 else ()), *range(260, 300)]}
    assert_warmed_once(scored)  # the states were restored and continued, not re-warmed


def test_every_state_on_a_remade_partition_covers_nothing_and_is_written_again():
    """On an input partition without a committed offset, one state covering an offset past
    its end shows the topic was made again; a state covering less (a device that went quiet
    early) is from the old topic too.  A partition with a committed offset is left alone."""
    from kafka import TopicPartition

    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    daemon = _idle_daemon()
    feed = [Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in ("quiet", "busy", "other", "after")]
    daemon.pipeline.feed(feed)
    store = daemon.store = LocalStore(":memory:")
    # "after": saved covering no offset, as a state restored from a remade partition is saved
    # before a reading reaches it
    covered = {"quiet": 100, "busy": 5000, "other": 5000, "after": -1}
    states = daemon.pipeline.export_devices(covered, covered)
    for state, data in zip(states, daemon.codec.encode_many(states)):
        store.put(1 if state.device in ("other", "after") else 0, state.device, data)
    daemon.pipeline.drop_devices(set(covered))
    daemon.pipeline.take_changed()
    remade, kept = TopicPartition("t", 0), TopicPartition("t", 1)

    class Source:
        def rewind(self, partitions):
            return {remade: None, kept: 4000}

        def end_offsets(self, partitions):
            assert set(partitions) == {remade}  # a committed partition is not asked
            return {remade: 3000}

        def partitions_now(self, timeout_ms=2000):
            return 2

        def resume(self, partitions):
            pass

    daemon._to_restore = {remade, kept}
    daemon._restore_partitions(Source())
    assert daemon._covered == {"quiet": (0, -1), "busy": (0, -1), "other": (1, 5000)}
    assert daemon.pipeline.take_changed() == {"quiet", "busy"}
    assert daemon._seen_until == {"quiet": 19.0, "busy": 19.0, "after": 19.0}  # no offset to go by
    # read again from its start, what the states have seen is not rejected as out of order (an
    # end offset reported short, Tansu's, looks the same as a remade topic): it is skipped
    kept_readings = daemon._skip_covered(_batch("busy", 0, list(range(16)), ts0=10))
    assert [r.ts for r in kept_readings] == [20.0, 21.0, 22.0, 23.0, 24.0, 25.0]
    assert daemon.registry.get_sample_value("forewarn_redelivered_readings_total") == 10
    assert daemon._seen_until == {"quiet": 19.0, "after": 19.0}
    result = daemon.pipeline.feed(kept_readings)
    assert not result.bad and len(result.scores) == 6  # taken, in order (still warming here)
    # checkpointed now, with the partition read to offset 15: "busy" has read past its state and
    # covers that offset; "quiet" has not, and still covers none, or its next owner would take
    # the readings after 15 that its state has seen for new ones, and dead-letter them (chaos run)
    daemon._processed[0] = 15
    assert {s.device: s.offset for s in daemon._export(["quiet", "busy"])} == {"quiet": -1, "busy": 15}


def _batch(device, partition, offsets, ts0):
    from kafka import TopicPartition

    from connectors.kafka import PolledBatch
    from monitor.readings import Reading
    batch = PolledBatch()
    for i, offset in enumerate(offsets):
        r = Reading(device, float(ts0 + i), {"v": float(i % 5)}, ref=f"t/{partition}@{offset}")
        batch.readings.append(r)
        batch.offset_of[id(r)] = (partition, offset)
        batch.partition_of[device] = partition
        batch.records += 1
    batch.offsets[TopicPartition("t", partition)] = offsets[-1] + 1
    return batch


class _Sinks:
    def send_scores(self, scores):
        return 0

    def send_dead_letters(self, bad, key_of=None):
        return 0

    def flush(self, on_wait=None):
        pass


def test_a_checkpoint_stuck_on_a_full_buffer_is_finished_before_any_later_commit():
    """A snapshot write that finds no room in the producer's buffer leaves its round to be
    retried. A later checkpoint must not start a new round over it: the new one would commit
    offsets covering readings of a device the stuck round never wrote."""
    from kafka.errors import KafkaTimeoutError

    from connectors.state_store import LocalStore
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", FOREWARN_STATE_CHECKPOINT_INTERVAL_S="0")
    events = []

    class FullForA(LocalStore):
        def put(self, partition, device, data):
            if device == "a" and events.count("refused a") < 2:
                events.append("refused a")
                raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
            events.append(f"put {device}")
            super().put(partition, device, data)

    class Source:
        def commit(self, offsets):
            events.append(("commit", {tp.partition: o for tp, o in offsets.items()}))

        def in_group(self):
            return True

    daemon.store, source = FullForA(":memory:"), Source()
    daemon._process(_batch("a", 0, list(range(0, 10)), 0), source, _Sinks())   # interval 0: checkpoint
    daemon._process(_batch("b", 0, list(range(10, 20)), 0), source, _Sinks())
    assert not [e for e in events if e[0] == "commit"]  # a was refused twice: nothing committed
    daemon._process(_batch("b", 0, list(range(20, 30)), 10), source, _Sinks())
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert commits and events.index("put a") < commits[0]
    assert events[commits[-1]] == ("commit", {0: 30})


def test_an_idle_device_whose_tombstone_finds_no_room_is_forgotten_later_not_fatally():
    from kafka.errors import KafkaTimeoutError

    from connectors.state_store import LocalStore
    daemon = _idle_daemon()
    full = [True]

    class Store(LocalStore):
        def delete(self, partition, device):
            if full[0]:
                raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
            super().delete(partition, device)

    daemon.store = Store(":memory:")
    daemon._partition_of = {"quiet": 0, "busy": 0}
    daemon._last_seen, daemon._newest_seen = {"quiet": 1000.0, "busy": 1100.0}, 1100.0
    daemon._forget_idle(60.0)
    assert set(daemon._last_seen) == {"quiet", "busy"}  # kept for a later check
    full[0] = False
    daemon._forget_idle(60.0)
    assert set(daemon._last_seen) == {"busy"}


def test_a_restore_keeps_each_device_s_idle_clock():
    """The time of each device's newest record rides in its snapshot: restarts and rebalances
    more often than detector.idle_timeout_s must not keep a silent device forever."""
    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    saver.pipeline.feed([Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in ("quiet", "busy")])
    saver._partition_of = {"quiet": 0, "busy": 0}
    now = saver._newest_seen
    saver._last_seen = {"quiet": now - 100.0, "busy": now}
    saver._write_states(["quiet", "busy"])
    store.flush()

    restored = _restored_from(store)
    assert restored._last_seen["busy"] - restored._last_seen["quiet"] == pytest.approx(100.0, abs=0.01)
    # a sensor quiet since before the restart is exported as quiet, by the same clock
    last_reading = {d: restored.registry.get_sample_value("forewarn_device_last_reading_timestamp_seconds",
                                                          {"device": d}) for d in ("quiet", "busy")}
    assert last_reading["busy"] - last_reading["quiet"] == pytest.approx(100.0, abs=0.01)
    assert last_reading["busy"] == pytest.approx(time.time(), abs=60.0)
    assert restored.registry.get_sample_value("forewarn_anomaly_score", {"device": "busy"}) is None  # none yet
    restored._newest_seen = restored._last_seen["busy"]
    restored._forget_idle(60.0)
    assert set(restored._last_seen) == {"busy"}
    assert restored.registry.get_sample_value("forewarn_device_last_reading_timestamp_seconds",
                                              {"device": "quiet"}) is None


def test_a_state_saved_by_an_instance_whose_clock_was_fast_ages_no_other_device(forewarn_logs):
    """One snapshot's newest record stamped days ahead (its writer's clock was fast) used to be
    the newest the others were aged against: all of them were forgotten at the first idle check,
    their snapshots deleted, with nothing arriving at all."""
    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    devices = ("a", "b", "fast")
    saver.pipeline.feed([Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in devices])
    saver._partition_of = dict.fromkeys(devices, 0)
    now = time.monotonic()
    saver._last_seen = {"a": now, "b": now - 10.0, "fast": now + 8 * 86400.0}
    saver._write_states(list(devices))
    store.flush()

    restored = _restored_from(store, FOREWARN_DETECTOR_IDLE_TIMEOUT_S="60")
    assert restored._last_seen["a"] - restored._last_seen["b"] == pytest.approx(10.0, abs=0.01)
    assert restored._last_seen["fast"] == pytest.approx(restored._last_seen["a"], abs=0.01)  # taken as just seen
    assert any("clock was ahead" in r.getMessage() for r in forewarn_logs)
    restored._forget_idle(60.0)
    assert set(restored._last_seen) == set(devices)


def test_a_restore_past_max_streams_leaves_whole_devices_out_and_their_snapshots_kept(forewarn_logs):
    """A survivor taking over a failed peer's partitions near its cap used to restore a device
    without some of its channels, and its next snapshot saved it without them."""
    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    saver.pipeline.feed([Reading(d, float(t), {"temp": float(t % 7), "rpm": float(t % 5)})
                         for t in range(20) for d in ("p1", "p2")])
    saver._partition_of = {"p1": 0, "p2": 0}
    saver._write_states(["p1", "p2"])
    store.flush()

    restored = _restored_from(store, FOREWARN_DETECTOR_MAX_STREAMS="3")
    held = restored.pipeline.devices()
    assert len(held) == 1  # one device whole (2 streams); the other's 2 would pass the cap of 3
    (kept,), (left,) = held, {"p1", "p2"} - held
    assert sorted(channel for device, channel in restored.pipeline._streams if device == kept) == ["rpm", "temp"]
    assert left not in restored._partition_of and left not in restored._last_seen
    assert restored.registry.get_sample_value("forewarn_state_restore_failures_total") == 1
    assert any("max_streams" in r.getMessage() and r.levelno == logging.ERROR for r in forewarn_logs)
    restored._write_states(list(restored._partition_of))
    store.flush()
    assert {device for _, device, _ in store.load([0])} == {"p1", "p2"}  # the one left out is still saved


def test_a_remade_partition_is_found_by_the_state_of_a_device_left_out_too():
    """Only the state of a device left out (past max_streams) covered an offset past the new
    topic's end: the partition was not found remade, and the new topic's first readings of the
    device kept were skipped as re-deliveries."""
    from kafka import TopicPartition

    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.pipeline.feed([Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in ("quiet", "busy")])
    covered = {"quiet": 100, "busy": 5000}
    store = LocalStore(":memory:")
    states = saver.pipeline.export_devices(list(covered), covered)
    for state, data in zip(states, saver.codec.encode_many(states)):
        store.put(0, state.device, data)
    store.flush()
    tp = TopicPartition("t", 0)

    class Remade(_RestoreSource):  # no committed offset, and an end short of what "busy" covers
        def rewind(self, partitions):
            return {tp: None}

        def end_offsets(self, partitions):
            return {tp: 3000}

    for keep in ("quiet", "busy"):  # the cap of one device keeps either, by the order of the store's rows
        daemon = _idle_daemon(FOREWARN_DETECTOR_MAX_STREAMS="1", FOREWARN_DETECTOR_WARMUP="16")
        daemon.store = store
        daemon._assigned, daemon._to_restore = {tp}, {tp}
        daemon.pipeline.import_devices = _keeping_only(keep, daemon.pipeline.import_devices)
        daemon._restore_partitions(Remade(committed=0, partitions=1))
        (held,) = daemon.pipeline.devices()
        assert held == keep
        assert daemon._covered == {held: (0, -1)}  # covers nothing of the new topic
        kept = daemon._skip_covered(_batch(held, 0, range(16), ts0=1000))
        assert len(kept) == 16


def _keeping_only(device, import_devices):
    def only(states):
        return import_devices([s for s in states if s.device == device])
    return only


def test_a_device_whose_state_is_not_finite_is_saved_as_a_tombstone_and_the_others_still_saved():
    """json refuses NaN: one such device used to fail the whole checkpoint and stop the daemon,
    at every restart."""
    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = LocalStore(":memory:")
    daemon.pipeline.feed([Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in ("good", "bad")])
    daemon._partition_of = {"good": 0, "bad": 0}
    daemon._write_states(["good", "bad"])
    store.flush()
    row = daemon.pipeline._streams[("bad", "v")].row
    daemon.pipeline.fleet._h[:, row] = float("nan")
    daemon._write_states(["good", "bad"])
    store.flush()
    assert {device for _, device, _ in store.load([0])} == {"good"}  # no older snapshot of "bad" either
    assert daemon.registry.get_sample_value("forewarn_state_snapshots_dropped_total") == 1


def test_a_state_stamped_far_ahead_is_restored_taking_its_next_reading_as_its_first():
    """A snapshot saved before kafka.max_timestamp_ahead_s existed may hold a newest reading
    years ahead: kept, the device's later readings would be refused or skipped until then."""
    from connectors.kafka import PolledBatch
    from connectors.state_store import LocalStore
    from monitor.readings import Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    future = time.time() + 10 * 365 * 86400
    saver.pipeline.feed([Reading(d, float(t), {"v": float(t % 7)}) for t in range(20) for d in ("skewed", "fine")])
    saver.pipeline.feed([Reading("skewed", future, {"v": 1.0})])  # taken, as before the limit
    saver._partition_of = {"skewed": 0, "fine": 0}
    saver._write_states(["skewed", "fine"])
    store.flush()

    restored = _restored_from(store)
    assert "skewed" not in restored._seen_until  # saved covering no offset: nothing newer would pass
    batch = PolledBatch([Reading(d, 20.0, {"v": 3.0}) for d in ("skewed", "fine")])
    scores = restored.pipeline.feed(restored._skip_covered(batch)).scores
    assert sorted(s.device for s in scores) == ["fine", "skewed"]  # both scored, neither out of order
    believed = _restored_from(store, FOREWARN_KAFKA_MAX_TIMESTAMP_AHEAD_S="0")
    assert believed._seen_until["skewed"] == future  # with no limit, the state is believed


def test_a_live_device_whose_key_moves_has_its_old_snapshot_deleted(broker):
    """Not only a device restored here (``_skip_covered``): one live here all along too."""
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "live-moved-state")
    try:
        store.ensure_partitions(2)
        daemon._process(_batch("d", 0, list(range(0, 40)), 0), None, _Sinks())     # live on partition 0
        daemon._write_states(daemon.pipeline.take_changed())
        store.flush()
        daemon._process(_batch("d", 1, list(range(0, 40)), 40), None, _Sinks())    # the topic grew: now on 1
        daemon._write_states(daemon.pipeline.take_changed())
        store.flush()
        daemon._delete_old_copies()  # once the new snapshot is acknowledged, as a checkpoint does
        store.flush()
        assert store.load([0]) == [] and [p for p, _, _ in store.load([0, 1])] == [1]
    finally:
        store.close()


def test_the_changelog_s_new_partitions_are_known_to_its_producer_before_a_write(broker):
    """kafka-python's producer answers from a metadata cache refreshed every 5 minutes: after
    the changelog grew, the first snapshot for a new partition raised until then."""

    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "grown-state")
    try:
        store.ensure_partitions(1)
        store.put(0, "d0", b"x")
        store.flush()
        # the input topic grew to 2 partitions. Tansu cannot add partitions, so the changelog is
        # made again with 2 under the store; on Kafka, ensure_partitions grows it itself
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.delete_topics(["grown-state"])
        wait_for(lambda: "grown-state" not in admin.list_topics(), 30, what="the changelog's deletion")
        admin.create_topics([NewTopic("grown-state", 2, -1)])
        admin.close()
        store.ensure_partitions(2)
        store.put(1, "d1", b"y")
        store.flush()
        assert store.load([1]) == [(1, "d1", b"y")]
    finally:
        store.close()


def test_a_restore_that_stalls_mid_read_is_retried_not_fatal(broker, monkeypatch):
    """Retriable, as every other broker failure of a restore: the partitions stay paused."""
    from dataclasses import replace

    import connectors.state_store as state_store
    from monitor.config import KafkaConfig
    store = state_store.ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "stalled-state")
    try:
        store.ensure_partitions(1)
        store.put(0, "d", b"x")
        store.flush()
        store.cfg = replace(store.cfg, delivery_timeout_ms=1000)  # how long a restore may make no progress

        class Stalled(state_store.KafkaConsumer):
            def poll(self, *args, **kwargs):  # end offsets answered, then the broker went quiet
                return {}
        monkeypatch.setattr(state_store, "KafkaConsumer", Stalled)
        with pytest.raises(state_store.KafkaTimeoutError) as raised:
            store.load([0])
        assert raised.value.retriable
    finally:
        store.close()


def test_a_moved_device_whose_tombstone_finds_no_room_still_gets_it_when_retried():
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = _DictChangelog()
    daemon._process(_batch("d", 0, list(range(0, 40)), 0), None, _Sinks())
    daemon._write_states(daemon.pipeline.take_changed())
    daemon._process(_batch("d", 1, list(range(0, 40)), 40), None, _Sinks())   # its key moved to partition 1
    daemon._write_states(["d"])
    assert set(store.data) == {(0, "d"), (1, "d")}  # the old copy stays until the new one is acknowledged
    store.full_once = True
    daemon._delete_old_copies()  # after that flush: no room, so it is sent after the next one
    assert set(store.data) == {(0, "d"), (1, "d")}
    daemon._delete_old_copies()
    assert set(store.data) == {(1, "d")}


def test_a_wait_for_the_changelog_s_partitions_given_up_is_done_again_on_the_retry(monkeypatch):
    from kafka.errors import KafkaTimeoutError

    import connectors.state_store as state_store

    class Admin:
        def describe_topics(self, topics):
            return [{"error_code": 0, "partitions": [{}, {}]}]

        def close(self):
            pass

    class Producer:  # its metadata cache still says one partition
        def partitions_for(self, topic):
            return {0}

    monkeypatch.setattr(state_store, "admin_client", lambda cfg, timeout_ms=30_000: Admin())
    monkeypatch.setattr(state_store.ChangelogStore, "MAX_BLOCK_MS", 300)
    store = state_store.ChangelogStore.__new__(state_store.ChangelogStore)
    store.cfg, store.topic, store._partitions, store.producer = None, "t-state", 1, Producer()
    for _ in range(2):
        with pytest.raises(KafkaTimeoutError):
            store.ensure_partitions(2)


def test_a_member_dropped_during_a_long_batch_writes_no_state_until_it_rejoins(broker):
    """A batch that outlasts kafka.max_poll_interval_ms (a slow adaptation, a paused VM) gets the
    member dropped from the group while it works; the partitions' next owner may checkpoint at
    once. Snapshots written after the batch, before the next poll, would land after the new
    owner's and be restored: device state going back by everything in between."""
    import threading
    import time

    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = "zombie-sensors", "zombie-scores", "zombie"
    broker.create_topics({topic: 1, scores: 1})
    env = {**FAST_GROUP, **_env(broker, topic, group, 0, scores, FOREWARN_KAFKA_MAX_POLL_RECORDS="100")}
    daemon = Daemon(Config.load(environ=env))
    events: list[tuple[str, float]] = []
    feed, write, on_assign = daemon.pipeline.feed, daemon._write_states, daemon._on_assign

    def stalling_feed(readings):
        if any(r.ts == 150 for r in readings) and not any(e == "stall over" for e, _ in events):
            time.sleep(6.0)  # twice the rebalance timeout of FAST_GROUP
            events.append(("stall over", time.monotonic()))
        return feed(readings)

    def recording_write(devices):
        events.append(("write", time.monotonic()))
        return write(devices)

    def recording_assign(partitions):
        events.append(("assigned", time.monotonic()))
        return on_assign(partitions)

    daemon.pipeline.feed, daemon._write_states, daemon._on_assign = stalling_feed, recording_write, recording_assign
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        publish(broker.bootstrap, topic, _messages(range(200)))
        wait_for(_all_committed(broker, group, topic, 200 * DEVICES), 120, what="everything committed")
    finally:
        daemon.stop()
        thread.join(60)
    names = [e for e, _ in events]
    after_stall = names[names.index("stall over") + 1:]
    assert "write" in after_stall and "assigned" in after_stall  # it did rejoin and checkpoint again
    assert after_stall.index("assigned") < after_stall.index("write"), names


def test_a_local_store_in_a_group_of_several_says_so():
    """The local file is this instance's alone: a device moving to another member re-warms there
    and, when it comes back, restores the stale snapshot left here. Nothing said so."""
    import logging

    from kafka import TopicPartition

    from connectors.state_store import LocalStore

    class Errors(logging.Handler):  # on the logger itself: the CLI's set-up stops propagation to caplog
        def __init__(self):
            super().__init__(logging.ERROR)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def restore(assigned):
        daemon = _idle_daemon()
        daemon.store = LocalStore(":memory:")
        daemon._assigned = {TopicPartition("t", p) for p in assigned}
        daemon._to_restore = set(daemon._assigned)
        errors, logger = Errors(), logging.getLogger("forewarn.daemon")
        logger.addHandler(errors)
        try:
            daemon._restore_partitions(_RestoreSource(committed=0, partitions=4))
        finally:
            logger.removeHandler(errors)
        return errors.messages

    assert restore(range(4)) == []
    (message,) = restore([0, 2])
    assert message.startswith("state.store = local keeps device state in this instance's file")


def test_a_member_paused_past_its_session_is_out_of_the_group_by_its_own_clocks():
    """After a pause (a frozen VM, SIGSTOP) kafka-python finds the coordinator again and resets its
    heartbeat timers before a heartbeat tells it the group dropped it: its own timeout checks then
    read fresh. The member's own clocks, the last heartbeat answered and the last poll, do not."""
    import time
    from types import SimpleNamespace

    from connectors.kafka import KafkaSource
    from monitor.config import KafkaConfig

    now = time.monotonic()
    heartbeat = SimpleNamespace(last_receive=now - 20.0, last_reset=now,
                                session_timeout_expired=lambda: False, poll_timeout_expired=lambda: False)
    source = KafkaSource.__new__(KafkaSource)  # no broker: only the membership judgement
    source.cfg = KafkaConfig(max_poll_interval_ms=3000, session_timeout_ms=3000, heartbeat_interval_ms=500)
    source.consumer = SimpleNamespace(_coordinator=SimpleNamespace(generation_if_stable=lambda: 7, heartbeat=heartbeat))
    source._polled_at, source._joined_at = now, now - 30.0
    assert not source.in_group() and not source.session_alive()
    heartbeat.last_receive = now - 0.5  # answered: a healthy member
    assert source.in_group()
    source._polled_at = now - 10.0      # a batch past the rebalance timeout
    assert not source.in_group()
    source._polled_at, source.consumer._coordinator.generation_if_stable = now, lambda: None  # rejoining
    assert not source.in_group() and source.session_alive()  # its revoke may still save state


class _GrownSource:
    """A member's view of an input topic that has grown: the broker asked afresh (the real
    ``KafkaSource.partitions_now``), or a given count; the consumer's own metadata, which may
    be minutes old, says ``cached``."""

    from connectors.kafka import KafkaSource
    partitions_now = KafkaSource.partitions_now

    def __init__(self, cfg=None, count: int | None = None, cached: int = 1) -> None:
        self.cfg, self.cached = cfg, cached
        if count is not None:
            self.partitions_now = lambda timeout_ms=2000: count

    def session_alive(self):
        return True

    def connected(self):
        return True

    def partitions_for_topic(self):
        return self.cached

    def rewind(self, partitions):
        return {tp: 0 for tp in partitions}

    def resume(self, partitions):
        pass


def test_devices_whose_key_the_topic_s_growth_moves_continue_live_where_they_now_arrive(broker):
    """The input topic grew from 2 partitions to 4: the devices whose key now lands on
    partition 2 or 3 (murmur2, as the producers place them, told by where the devices are)
    are handed over in the rebalance that follows. Their owner copies their state to the new
    partition of the changelog on revoke, and another instance assigned it restores them live
    and scores their readings there. The copy on the old partition stays until the device's
    first snapshot on the new one, for the readings producers still send there until they
    learn of the new partitions, and is deleted then, once. A later rebalance does not copy
    the old partition's frozen copy back over the live one, even where the consumer's
    metadata still counts 2 partitions."""
    from kafka import TopicPartition
    from kafka.partitioner.default import murmur2

    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    topic, cfg = "grow-sensors", KafkaConfig(bootstrap_servers=broker.bootstrap, topic="grow-sensors")
    broker.create_topics({topic: 4})  # Tansu cannot add partitions: made with the count it grew to
    key_hash = {d: murmur2(d.encode()) & 0x7FFFFFFF for d in (f"pump-{i}" for i in range(12))}
    moving = {d: h % 4 for d, h in key_hash.items() if h % 4 != h % 2}
    assert len(moving) >= 2 and len(moving) < len(key_hash)
    store = ChangelogStore(cfg, "grow-state")
    deletes, delete = [], store.delete
    store.delete = lambda partition, device: (deletes.append((partition, device)), delete(partition, device))
    try:
        store.ensure_partitions(4)
        old = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
        old.store, old.source = store, _GrownSource(cfg, cached=2)
        ends = {0: 0, 1: 0}
        for d, h in key_hash.items():  # each on its partition among the 2 the topic had
            old._process(_batch(d, h % 2, list(range(ends[h % 2], ends[h % 2] + 40)), 0), None, _Sinks())
            ends[h % 2] += 40
        old._topic_partitions = 2
        old._on_revoke({TopicPartition(topic, 0), TopicPartition(topic, 1)})
        copies = {(p, d): old.codec.decode(data) for p, d, data in store.load([2, 3])}
        assert set(copies) == {(p, d) for d, p in moving.items()}
        assert {d for _, d, _ in store.load([0, 1])} == set(key_hash)
        # a version before the copies reads offset -1 and replays the new partition rather than skip on it
        assert all(s.offset == -1 and s.moved_from == (key_hash[d] % 2, ends[key_hash[d] % 2])
                   for (_, d), s in copies.items())
        # one instance holding every partition keeps each device where its readings still arrive
        both = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
        both.store, both._assigned = store, {TopicPartition(topic, p) for p in range(4)}
        both._to_restore = set(both._assigned)
        both._restore_partitions(_GrownSource(cfg, cached=4))
        assert both._partition_of == {d: h % 2 for d, h in key_hash.items()}

        new = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
        new.store, new.source, results = store, _GrownSource(cfg, cached=2), []
        new.on_result = results.append
        new._to_restore = {TopicPartition(topic, 2), TopicPartition(topic, 3)}
        new._restore_partitions(new.source)
        assert new._topic_partitions == 4
        assert new.pipeline.streams_by_state() == {"warming": 0, "adapting": 0, "live": len(moving)}
        assert new._covered == {d: (key_hash[d] % 2, ends[key_hash[d] % 2]) for d in moving}  # old partitions'
        mover, other = sorted(moving)[:2]
        for batch in range(3):
            offsets = list(range(5 * batch, 5 * batch + 5))
            new._process(_batch(mover, moving[mover], offsets, 40 + 5 * batch), None, _Sinks())
            new._write_states(new.pipeline.take_changed())
            store.flush()
            new._delete_old_copies()  # as a checkpoint does once the snapshots are acknowledged
        assert all(s.score is not None for r in results for s in r.scores)
        assert deletes == [(key_hash[mover] % 2, mover)]  # the old copy, once: not at every checkpoint
        assert mover not in {d for _, d, _ in store.load([0, 1])}
        live = {d: data for _, d, data in store.load([2, 3])}[mover]

        # the old instance gets its partitions again, its consumer still counting 2: it holds the
        # copies left there (frozen: their readings go to the new partitions) and must not take
        # its next rebalance for a growth and copy them over the live states
        old._to_restore = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        old._restore_partitions(old.source)
        assert old._topic_partitions == 4
        old._on_revoke({TopicPartition(topic, 0), TopicPartition(topic, 1)})
        assert {d: data for _, d, data in store.load([2, 3])}[mover] == live
        # the old partition's next owner forgetting its frozen copy deletes that copy only
        store.delete(key_hash[other] % 2, other)
        store.flush()
        assert {d: p for p, d, _ in store.load(range(4))}[other] == moving[other]
    finally:
        store.close()


def test_from_a_single_partition_the_producers_partitioner_is_taken_from_the_settings():
    """Every key is on partition 0 of a single partition, whatever its hash: the placement
    cannot tell murmur2 from crc32, and kafka.producer_partitioner says which."""
    from kafka import TopicPartition

    from connectors.partitioners import KEY_HASHES
    from connectors.state_store import LocalStore
    devices = [f"pump-{i}" for i in range(6)]
    for partitioner in ("auto", "crc32"):
        daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", FOREWARN_KAFKA_PRODUCER_PARTITIONER=partitioner)
        daemon.store, daemon.source = LocalStore(":memory:"), _GrownSource(count=3)
        for i, d in enumerate(devices):
            daemon._process(_batch(d, 0, list(range(40 * i, 40 * i + 40)), 0), None, _Sinks())
        daemon._topic_partitions = 1
        daemon._on_revoke({TopicPartition("t", 0)})
        placed = {d: p for p, d, _ in daemon.store.load(range(3))}  # one row per device in a local store
        if partitioner == "auto":
            assert placed == dict.fromkeys(devices, 0)
        else:
            assert placed == {d: KEY_HASHES["crc32"](d.encode()) % 3 for d in devices} != dict.fromkeys(devices, 0)


def test_a_fleet_not_placed_by_a_known_partitioner_is_not_moved_when_the_topic_grows():
    """Producers with a partitioner of their own: where a device goes next cannot be told, so
    nothing is moved (each re-warms where it arrives), and the log says why."""
    import logging

    from kafka import TopicPartition

    from connectors.state_store import LocalStore
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store, daemon.source = LocalStore(":memory:"), _GrownSource(count=4)
    # where neither murmur2 nor crc32 puts these keys among 2 partitions, or 4
    for i, (d, p) in enumerate({"pump-0": 1, "pump-3": 1, "pump-4": 0}.items()):
        daemon._process(_batch(d, p, list(range(40 * i, 40 * i + 40)), 0), None, _Sinks())
    daemon._topic_partitions = 2
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("forewarn.daemon").addHandler(handler)
    try:
        daemon._on_revoke({TopicPartition("t", 0), TopicPartition("t", 1)})
    finally:
        logging.getLogger("forewarn.daemon").removeHandler(handler)
    assert sorted((p, d) for p, d, _ in daemon.store.load(range(4))) == [(0, "pump-4"), (1, "pump-0"), (1, "pump-3")]
    assert any("cannot be told" in r.getMessage() and r.fields["placement"] == "unknown" for r in records)


def test_a_partition_count_the_broker_did_not_give_is_not_trusted_to_find_a_growth():
    """The consumer's own count may be minutes old: taken for the topic's, the next rebalance
    would see a growth that was handled already and copy a frozen state over the live one."""
    from kafka import TopicPartition
    from kafka.errors import KafkaTimeoutError
    from kafka.partitioner.default import murmur2

    from connectors.state_store import LocalStore
    device = next(f"pump-{i}" for i in range(20) if (murmur2(f"pump-{i}".encode()) & 0x7FFFFFFF) % 2 == 1)
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    saver._process(_batch(device, 0, list(range(40)), 0), None, _Sinks())
    saver._write_states([device])

    class Unanswered(_GrownSource):
        def partitions_now(self, timeout_ms=2000):
            raise KafkaTimeoutError("no answer")

    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store, daemon._to_restore = store, {TopicPartition("t", 0)}
    daemon._restore_partitions(Unanswered(cached=1))  # the topic has 2 partitions, the consumer says 1
    assert daemon._topic_partitions == 0
    daemon.source = _GrownSource(count=2)
    daemon._on_revoke({TopicPartition("t", 0)})
    assert [p for p, d, _ in store.load(range(2))] == [0]  # not copied to partition 1


def test_copies_left_behind_by_an_earlier_growth_do_not_hide_the_partitioner_at_the_next():
    """Devices restored here that nothing has reached since (copies left on their old partition
    when the topic grew before, at neither home now) are no evidence of where producers put keys."""
    from kafka import TopicPartition
    from kafka.partitioner.default import murmur2

    from connectors.state_store import LocalStore
    key_hash = {d: murmur2(d.encode()) & 0x7FFFFFFF for d in (f"pump-{i}" for i in range(16))}
    left, live = list(key_hash)[:8], list(key_hash)[8:]
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    for i, d in enumerate(left):  # saved on the partition murmur2 does not put them on among 2
        saver._process(_batch(d, 1 - key_hash[d] % 2, list(range(40 * i, 40 * i + 40)), 0), None, _Sinks())
    saver._write_states(left)

    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store, daemon._to_restore = store, {TopicPartition("t", 0), TopicPartition("t", 1)}
    daemon._restore_partitions(_GrownSource(count=2, cached=2))
    for i, d in enumerate(live):
        daemon._process(_batch(d, key_hash[d] % 2, list(range(1000 + 40 * i, 1040 + 40 * i)), 0), None, _Sinks())
    daemon.source = _GrownSource(count=4)
    daemon._on_revoke({TopicPartition("t", 0), TopicPartition("t", 1)})
    placed = {d: p for p, d, _ in store.load(range(4))}  # one row per device in a local store
    assert {d: placed[d] for d in live} == {d: key_hash[d] % 4 for d in live}
    assert {d: placed[d] for d in left} == {d: 1 - key_hash[d] % 2 for d in left}  # not moved


def test_bad_records_a_restored_partition_re_delivers_are_not_counted_or_dead_lettered_again():
    """Its previous owner counted and dead-lettered them: each rebalance within a checkpoint
    interval counted them twice, while the readings beside them were skipped."""
    from kafka import TopicPartition

    from connectors.kafka import PolledBatch
    from connectors.state_store import LocalStore
    from monitor.readings import BadReason, BadRecord, Reading
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    saver.store = store = LocalStore(":memory:")
    saver.pipeline.feed([Reading("a", float(t), {"v": float(t % 7)}) for t in range(20)])
    saver._partition_of, saver._processed[0] = {"a": 0}, 30
    saver._write_states(["a"])
    store.flush()
    restored = _restored_from(store)
    letters = []

    class Sinks(_Sinks):
        def send_dead_letters(self, bad, key_of=None):
            letters.extend(b.ref for b in bad)
            return len(bad)
    batch = PolledBatch(bad=[BadRecord(BadReason.MALFORMED, "invalid JSON", f"t/0@{o}") for o in (25, 29, 30, 35)],
                        offsets={TopicPartition("t", 0): 36}, records=4)
    restored._process(batch, None, Sinks())
    assert letters == ["t/0@30", "t/0@35"]  # before 30: handled by the previous owner
    assert restored.registry.get_sample_value("forewarn_bad_records_total", {"reason": "malformed"}) == 2
    assert not restored._bad_handled  # read past it: nothing more is skipped


def test_a_stop_gives_up_a_restore_rather_than_wait_out_a_broker_gone_meanwhile():
    """The restore's read called this after every fetch and went on for kafka.delivery_timeout_ms
    (120 s) with the broker gone, past Kubernetes' grace period, whatever signal came.  Given up,
    the restore leaves its partitions paused and the daemon stops as usual (not abandoned: the
    other partitions still get their last checkpoint)."""
    from kafka import TopicPartition

    from connectors.state_store import LocalStore
    from monitor.daemon import StoppedWhileWaiting
    daemon = _idle_daemon()
    daemon._still_alive()  # reading: alive, going on
    daemon.stop()
    with pytest.raises(StoppedWhileWaiting):
        daemon._still_alive()

    class Reading(LocalStore):
        def load(self, partitions, on_progress=None):
            on_progress()  # a stop arrives while it reads
            return []
    daemon.store = Reading(":memory:")
    daemon._to_restore = {TopicPartition("t", 0)}
    daemon._restore(_RestoreSource(committed=40, partitions=1))
    assert daemon._to_restore == {TopicPartition("t", 0)} and not daemon._abandoned


def test_a_moved_device_keeps_its_snapshot_in_a_local_state_file(tmp_path):
    """The local file holds one row per device: the old partition's tombstone, sent after
    the new snapshot, deleted that new row (and so the device's only snapshot)."""
    from connectors.state_store import LocalStore
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = LocalStore(tmp_path / "state.db")
    daemon._process(_batch("d", 0, list(range(0, 40)), 0), None, _Sinks())
    daemon._pending = {("t", 0): 40}
    daemon._checkpoint_now(_CommittingSource())
    daemon._process(_batch("d", 1, list(range(0, 40)), 40), None, _Sinks())   # its key moved to partition 1
    daemon._pending = {("t", 1): 40}
    daemon._checkpoint_now(_CommittingSource())
    daemon.store.close()
    assert [(p, d) for p, d, _ in LocalStore(tmp_path / "state.db").load([0, 1])] == [(1, "d")]


def test_a_device_moving_back_before_the_flush_has_the_copy_it_left_deleted_next():
    """Moved from 0 to 1 and written there, then back on 0 before the flush: the copy on 1
    is now the old one, due for deletion after the device's next snapshot on 0."""
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = _DictChangelog()
    daemon._process(_batch("d", 0, list(range(0, 40)), 0), None, _Sinks())
    daemon._write_states(daemon.pipeline.take_changed())
    daemon._process(_batch("d", 1, list(range(0, 5)), 40), None, _Sinks())     # moved to 1
    daemon._write_states(daemon.pipeline.take_changed())
    daemon._process(_batch("d", 0, list(range(40, 45)), 45), None, _Sinks())   # back on 0 before the flush
    daemon._delete_old_copies()  # after the flush: the copy on 0 is older than the one on 1
    assert set(store.data) == {(1, "d")} and daemon._old_home == {"d": 1}
    daemon._write_states(daemon.pipeline.take_changed())
    daemon._delete_old_copies()
    assert set(store.data) == {(0, "d")} and daemon._old_home == {}


def test_snapshots_whose_flush_was_cut_short_are_checked_at_the_next(broker, monkeypatch):
    """A flush given up while waiting (a revoke's deadline) forgot its snapshots: the next
    flush then passed without them, and a moved device's old copy could be deleted after a
    new snapshot that never landed."""
    import connectors.state_store
    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "cut-state")
    try:
        store.ensure_partitions(1)
        store.put(0, "d", b"snapshot")

        def cut_short(producer, on_wait):
            raise TimeoutError("the revoke's deadline")
        real = connectors.state_store.wait_flushed
        monkeypatch.setattr(connectors.state_store, "wait_flushed", cut_short)
        with pytest.raises(TimeoutError):
            store.flush()
        assert [d for d, *_ in store._snapshots] == ["d"]  # still to be checked
        monkeypatch.setattr(connectors.state_store, "wait_flushed", real)
        store.flush()
        assert store._snapshots == [] and store.load([0]) == [(0, "d", b"snapshot")]
    finally:
        store.close()


# ---- sequences around restores, idle forgetting and checkpoint rounds (from an audit) ----

class _OrderedChangelog:
    """ChangelogStore's semantics, in memory: newest snapshot per device among the partitions read; a
    tombstone deletes its own partition's copy only."""

    shared = True

    def __init__(self):
        self.log, self.t = {}, 0

    def ensure_partitions(self, n, deadline=None):
        pass

    def put(self, p, d, data):
        self.t += 1
        self.log[(p, d)] = (self.t, data)

    def delete(self, p, d):
        self.t += 1
        self.log[(p, d)] = (self.t, None)

    def take_dropped(self):
        return []

    def flush(self, on_wait=None):
        pass

    def load(self, partitions, on_progress=None):
        latest, wanted = {}, set(partitions)
        for (p, d), copy in self.log.items():
            if p in wanted:
                latest.setdefault(d, {})[p] = copy
        return [_newest(d, c) for d, c in latest.items() if any(v is not None for _, v in c.values())]


class _GroupSource:
    def __init__(self, count):
        self.count, self.commits = count, []

    def partitions_now(self, timeout_ms=2000):
        return self.count

    def partitions_for_topic(self):
        return self.count

    def session_alive(self):
        return True

    def in_group(self):
        return True

    def connected(self):
        return True

    def rewind(self, partitions):
        return {tp: 0 for tp in partitions}

    def pause(self, partitions):
        pass

    def resume(self, partitions):
        pass

    def commit(self, offsets):
        self.commits.append(dict(offsets))


def test_a_device_forgotten_as_idle_leaves_no_growth_copy_to_be_restored_again():
    """The input topic grew 2 -> 4; a member holding every partition restores a moved device
    from its copy on the new partition and places it on the old one (held too). Forgotten as
    idle, only the old partition's snapshot was deleted: the copy came back at every restore."""
    from kafka.partitioner.default import murmur2
    h = {f"pump-{i}": murmur2(f"pump-{i}".encode()) & 0x7FFFFFFF for i in range(50)}
    mover = next(d for d, k in h.items() if k % 4 == 2)
    others = [d for d, k in h.items() if k % 4 == k % 2][:4]
    env = dict(FOREWARN_DETECTOR_WARMUP="16", FOREWARN_KAFKA_PRODUCER_PARTITIONER="murmur2")
    store = _OrderedChangelog()
    old = _idle_daemon(**env)
    old.store, old.source = store, _GroupSource(4)
    for i, d in enumerate([mover] + others):
        old._process(_batch(d, h[d] % 2, list(range(40 * i, 40 * i + 40)), 0), None, _Sinks())
    old._topic_partitions = 2
    old._on_revoke({TopicPartition("t", 0), TopicPartition("t", 1)})  # copies to the new partitions
    for attempt in range(2):
        daemon = _idle_daemon(**env)
        daemon.store = store
        daemon._assigned = {TopicPartition("t", p) for p in range(4)}
        daemon._to_restore = set(daemon._assigned)
        daemon._restore_partitions(_GroupSource(4))
        if attempt == 0:
            assert mover in daemon.pipeline.devices() and daemon._partition_of[mover] == h[mover] % 2
        elif mover not in daemon.pipeline.devices():
            break
        daemon._newest_seen = daemon._last_seen[mover] + 120.0  # the others kept reporting; it did not
        daemon._last_seen.update(dict.fromkeys(others, daemon._newest_seen))
        daemon._forget_idle(60.0)
        assert mover not in daemon.pipeline.devices()
    assert mover not in daemon.pipeline.devices(), "the forgotten device was restored again"
    assert mover not in {d for _, d, _ in store.load(range(4))}


def test_a_device_back_from_silence_keeps_its_unsent_channels_across_a_restore():
    """Quiet counts from the end of the device's latest silence: here, and after a restart or a
    move, where the first idle check used to forget at once the channels it had not sent yet."""
    env = dict(FOREWARN_DETECTOR_IDLE_TIMEOUT_S="0", FOREWARN_DETECTOR_CHANNEL_IDLE_TIMEOUT_S="25")
    saver = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", **env)
    saver.store = store = LocalStore(":memory:")
    saver.pipeline.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3, "mem": 2.0 + t % 2}) for t in range(60)])
    saver.pipeline.feed([Reading("srv", 100.0, {"cpu": 1.0})])   # 40 s of silence, then cpu alone
    saver._partition_of = {"srv": 0}
    saver._write_states(["srv"])
    store.flush()
    restored = _restored_from(store, **env)
    restored._forget_idle(0.0)
    assert sorted(ch for d, ch in restored.pipeline._streams if d == "srv") == ["cpu", "mem"]
    assert restored.registry.get_sample_value("forewarn_channels_forgotten_total") == 0
    restored.pipeline.feed([Reading("srv", float(t), {"cpu": 1.0}) for t in range(101, 126)])
    restored._forget_idle(0.0)                                   # then 25 s of cpu without it
    assert sorted(ch for d, ch in restored.pipeline._streams if d == "srv") == ["cpu"]


def test_a_round_emptied_by_a_revoke_is_not_counted_as_a_checkpoint():
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16", FOREWARN_STATE_CHECKPOINT_BATCH="1")
    daemon.store, source = _OrderedChangelog(), _GroupSource(1)
    daemon.source, tp = source, TopicPartition("t", 0)
    daemon._assigned = {tp}
    for i, d in enumerate(("a", "b", "c")):
        daemon._process(_batch(d, 0, list(range(10 * i, 10 * i + 10)), 0), source, _Sinks())
    daemon._round = daemon._begin_round()
    daemon._advance_round(source, 1)
    daemon._on_revoke({tp})
    daemon._on_assign({tp})
    daemon._restore_partitions(source)
    daemon._advance_round(source, 1)
    assert daemon._round is None and not [c for c in source.commits if c]
    assert daemon.registry.get_sample_value("forewarn_state_checkpoints_total") == 0


def test_an_idle_check_that_found_the_buffer_full_is_ready_again_once_its_tombstones_go():
    """No input arrives, so no flush follows to clear the wait: the next idle check's tombstones
    finding room must, or /readyz stays 503 with the broker back."""
    daemon = _idle_daemon(FOREWARN_DETECTOR_WARMUP="16")
    daemon.store = store = _DictChangelog()
    daemon._process(_batch("d", 0, list(range(0, 40)), 0), None, _Sinks())
    daemon._write_states(daemon.pipeline.take_changed())
    daemon._assigned = {TopicPartition("t", 0)}
    assert daemon.ready()
    daemon._newest_seen = daemon._last_seen["d"] + 120.0
    store.full_once = True
    daemon._forget_idle(60.0)
    assert not daemon.ready() and "d" in daemon.pipeline.devices()
    daemon._forget_idle(60.0)
    assert daemon.ready() and "d" not in daemon.pipeline.devices() and not store.data
