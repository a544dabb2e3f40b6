"""The daemon against a real Kafka-protocol broker (Tansu) and a real Prometheus server."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

import pytest

from connectors.tansu import EmbeddedBroker, free_port
from monitor.readings import parse_timestamp
from tests.kafka_support import (ROOT, BrokerLink, assert_warmed_once, committed_offsets, http_get, metric_value,
                                 read_topic, start_daemon, start_prometheus, stop_daemon_and_prometheus, wait_for)

BUNDLED = ROOT / "monitor" / "data" / "nab" / "machine_temperature_system_failure.csv"
# NAB's labelled window around the machine's catastrophic failure
FAILURE_WINDOW = (parse_timestamp("2014-02-07 14:55:00"), parse_timestamp("2014-02-09 14:05:00"))


def _nab_rows(path: Path, start: str, end: str) -> list[tuple[str, float]]:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return [(t, float(v)) for t, v in rows if start <= t <= end]


def _write_recording(path: Path, data_dir: Path) -> dict[str, int]:
    """Two labelled NAB series as two devices; the machine's ends inside its failure window."""
    devices = {
        "machine-temp": _nab_rows(BUNDLED, "2014-02-01 00:00:00", "2014-02-09 12:40:00"),
        "ambient-temp": _nab_rows(data_dir / "nab/data/realKnownCause/ambient_temperature_system_failure.csv",
                                  "2013-07-04 00:00:00", "2013-08-20 00:00:00"),
    }
    with open(path, "w") as f:
        for device, rows in devices.items():
            for t, v in rows:
                f.write(json.dumps({"device": device, "ts": t, "value": v}) + "\n")
    return {d: len(r) for d, r in devices.items()}


def _daemon_env(broker, topic: str, group: str, port: int, **extra) -> dict[str, str]:
    return {"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": topic,
            "FOREWARN_KAFKA_GROUP_ID": group, "FOREWARN_METRICS_HOST": "127.0.0.1",
            "FOREWARN_METRICS_PORT": str(port), **extra}


def _replay_to_kafka(path: Path, broker, topic: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(["python", "-m", "monitor.cli", "replay-to-kafka", str(path), "--topic", topic,
                             "--bootstrap-servers", broker.bootstrap, "--quiet", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def prometheus_bin():
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the prometheus server is not installed (apt-get install prometheus; .ci/run does)")
    return path


def _query(port: int, promql: str) -> list[dict]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def test_end_to_end_kafka_daemon_prometheus(broker, data_dir, tmp_path, prometheus_bin):
    topic, anomalies = "e2e-sensors", "e2e-anomalies"
    broker.create_topics({topic: 4, anomalies: 1, "e2e-dead": 1})
    recording = tmp_path / "fleet.jsonl"
    counts = _write_recording(recording, data_dir)
    metrics_port = free_port()
    # 10 s, not FAST_GROUP's 3: a batch with both adaptations on a loaded machine has outlasted 3 s, and
    # the lost partitions then re-warmed their devices on the rest of the replay, too short to go live
    daemon = start_daemon(_daemon_env(broker, topic, "e2e", metrics_port, FOREWARN_KAFKA_ANOMALIES_TOPIC=anomalies,
                                      FOREWARN_KAFKA_DEAD_LETTER_TOPIC="e2e-dead",
                                      FOREWARN_KAFKA_MAX_POLL_INTERVAL_MS="10000"), tmp_path / "daemon.log")
    prometheus, prom_port = start_prometheus(prometheus_bin, tmp_path, metrics_port)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 60, what="daemon ready")
        assert http_get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200
        publisher = _replay_to_kafka(recording, broker, topic)
        out, err = publisher.communicate(timeout=120)
        assert publisher.returncode == 0, err
        assert out.startswith(f"published {sum(counts.values())} readings")
        total = sum(counts.values())
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: metric_value(http_get(url)[1], "forewarn_readings_total") == total, 120,
                 what="every reading processed")
        # Prometheus itself must have scraped the final state
        wait_for(lambda: _query(prom_port, f"forewarn_readings_total == {total}"), 30, what="prometheus scrape")
        series = _query(prom_port, "forewarn_anomaly_score")
        assert {s["metric"]["device"] for s in series} == set(counts)
        flagged = _query(prom_port, 'max_over_time(forewarn_anomaly_score{device="machine-temp"}[10m]) >= 0.999')
        assert flagged, "the labelled failure should drive the machine's score over the threshold"
        assert _query(prom_port, 'forewarn_streams{state="live"} == 2')
        events = read_topic(broker.bootstrap, anomalies)
        in_window = [e for e in events if e["device"] == "machine-temp" and FAILURE_WINDOW[0] <= e["ts"] <= FAILURE_WINDOW[1]]
        assert in_window and all(e["score"] >= 0.999 and e["channel"] == "value" for e in in_window)
        assert {"forecast", "value", "ts", "score"} <= set(in_window[0])
    finally:
        code = stop_daemon_and_prometheus(daemon, prometheus)
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert "stopped" in (tmp_path / "daemon.log").read_text()


def test_sigkill_mid_replay_loses_nothing_and_commits_only_processed(broker, tmp_path):
    topic, scores_topic, group = "kill-sensors", "kill-scores", "kill"
    broker.create_topics({topic: 2, scores_topic: 1})
    recording = tmp_path / "fleet.jsonl"
    with open(recording, "w") as f:
        for t in range(3000):
            for d in range(4):
                f.write(json.dumps({"device": f"d{d}", "ts": t, "value": (t * (d + 1)) % 17 / 3.0}) + "\n")
    env = _daemon_env(broker, topic, group, free_port(), FOREWARN_KAFKA_SCORES_TOPIC=scores_topic,
                      FOREWARN_KAFKA_MAX_POLL_RECORDS="200", FOREWARN_DETECTOR_WARMUP="64",
                      FOREWARN_STATE_CHECKPOINT_INTERVAL_S="0.5", FOREWARN_STATE_CHECKPOINT_BATCH="1")
    first = start_daemon(env, tmp_path / "first.log")
    publisher = _replay_to_kafka(recording, broker, topic, "--speed", "150")  # 3,000 s of readings in ~20 s
    try:
        # kill it once it has committed part of the stream, wherever it is in its loop
        wait_for(lambda: sum(committed_offsets(broker.bootstrap, group, topic).values()) >= 3000, 120,
                 what="some readings processed")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    scored_before = read_topic(broker.bootstrap, scores_topic)
    committed = committed_offsets(broker.bootstrap, group, topic)
    assert sum(committed.values()) < 12_000, "killed mid-stream"
    done_before: dict[int, set[int]] = {}
    for s in scored_before:
        part, offset = s["source"].rsplit("/", 1)[1].split("@")
        done_before.setdefault(int(part), set()).add(int(offset))
    for part, offset in committed.items():
        assert set(range(offset)) <= done_before.get(part, set()), f"partition {part} committed unscored offsets"

    assert publisher.wait(120) == 0
    second = start_daemon(env, tmp_path / "second.log")
    try:
        wait_for(lambda: sum(committed_offsets(broker.bootstrap, group, topic).values()) == 12_000, 120,
                 what="the restarted daemon to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    scored = read_topic(broker.bootstrap, scores_topic)
    keys = {(s["device"], s["ts"]) for s in scored}
    assert keys == {(f"d{d}", float(t)) for t in range(3000) for d in range(4)}, "a reading was never scored"
    assert_warmed_once(scored)
    assert "state restored" in (tmp_path / "second.log").read_text()


def test_missing_output_topics_are_created_at_start_not_found_missing_at_the_first_anomaly(broker):
    from kafka.admin import KafkaAdminClient

    from connectors.kafka import KafkaSinks
    from monitor.config import KafkaConfig
    broker.create_topics({"out-scores": 1})
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, anomalies_topic="out-anomalies",
                      dead_letter_topic="out-dead", scores_topic="out-scores")
    sinks = KafkaSinks(cfg)
    try:
        assert sinks.ensure_topics() == ["out-anomalies", "out-dead"]
        assert sinks.ensure_topics() == []  # a restart finds them
    finally:
        sinks.close()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    described = admin.describe_topics(["out-anomalies", "out-dead"])
    admin.close()
    assert all(t["error_code"] == 0 and t["partitions"] for t in described)


def test_a_missing_input_topic_is_named_at_start(broker, tmp_path):
    """Tansu creates it when the consumer group asks for it, as a broker with topic creation
    on request does, so the daemon is soon ready here; elsewhere it waits, not ready."""
    port, log = free_port(), tmp_path / "absent.log"
    daemon = start_daemon({"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": "absent",
                           "FOREWARN_KAFKA_GROUP_ID": "absent", "FOREWARN_METRICS_HOST": "127.0.0.1",
                           "FOREWARN_METRICS_PORT": str(port), "FOREWARN_STATE_STORE": "none"}, log)
    try:
        wait_for(lambda: "the input topic does not exist" in log.read_text(), 120, what="the warning")
        assert "topic=absent" in log.read_text()
        assert daemon.poll() is None  # not exited
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0


def test_replay_to_kafka_with_the_broker_lost_fails_soon_and_an_interrupt_exits_soon(tmp_path):
    """Before, sends were checked every 10,000 records: a lost broker went unnoticed for minutes
    and kafka-python's unbounded close held a Ctrl-C for as long as the broker stayed away."""
    link_port = free_port()
    lost = EmbeddedBroker(advertised_port=link_port)
    link = BrokerLink(link_port, lost.port)
    recording = tmp_path / "pump.csv"
    # 5-minute readings at --speed 3000: ten a second, for far longer than the test runs
    start = parse_timestamp("2024-01-01T00:00:00Z")
    recording.write_text("timestamp,value\n" + "".join(
        f"{datetime.fromtimestamp(start + 300 * i, tz=timezone.utc):%Y-%m-%d %H:%M:%S},{i % 17}.5\n"
        for i in range(20_000)))
    with lost:
        lost.create_topics({"lost-a": 1, "lost-b": 1})
        left, interrupted = (_replay_to_kafka(recording, lost, topic, "--speed", "3000")
                             for topic in ("lost-a", "lost-b"))
        try:
            wait_for(lambda: all(sum(lost.end_offsets(t).values()) for t in ("lost-a", "lost-b")), 60,
                     what="both publishing")
            link.cut()
            time.sleep(1)  # so that readings sent into the outage wait unacknowledged when the interrupt comes
            interrupted.send_signal(signal.SIGINT)
            _, err = interrupted.communicate(timeout=60)
            assert interrupted.returncode == 130 and "forewarn: interrupted" in err, err
            _, err = left.communicate(timeout=90)
            assert left.returncode == 1, err
            assert "publishing to lost-a stopped: the broker acknowledged nothing for 10 s" in err, err
            assert "Traceback" not in err
        finally:
            for p in (left, interrupted):
                if p.poll() is None:
                    p.kill()
                    p.wait()
            link.close()
