"""The shipped alert rules in a real Prometheus, scraping a real daemon fed a labelled anomaly.

The NAB machine-temperature recording bundled in the package is published to a real Kafka-protocol
broker (Tansu) as two devices: ``machine-temp`` ends at 2014-02-09 12:30, inside NAB's labelled failure
window while the temperature climbs back from its collapse (every reading from 11:55 on is flagged), and
``machine-calm`` is the same series ending at 11:45, before it. Prometheus loads
deploy/prometheus/rules/forewarn.yml and must report ForewarnDeviceAnomaly firing for the first device
only, and every shipped rule must evaluate without error against the daemon's real metrics. With
detector.peak_window on, ForewarnDeviceIncident must fire instead, from the time of the device's flag.
"""
from __future__ import annotations

import json
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import yaml

from connectors.tansu import free_port
from monitor.readings import parse_timestamp
from tests.kafka_support import (ROOT, http_get, metric_value, start_daemon, start_prometheus, stop_daemon_and_prometheus,
                                 wait_for)
from tests.test_kafka_e2e import (  # noqa: F401  (prometheus_bin is a fixture)
    BUNDLED,
    FAILURE_WINDOW,
    _daemon_env,
    _nab_rows,
    _replay_to_kafka,
    prometheus_bin,
)

RULES = ROOT / "deploy" / "prometheus" / "rules" / "forewarn.yml"
DEVICE_ALERT = "ForewarnDeviceAnomaly"
ANOMALOUS_END = "2014-02-09 12:30:00"
CALM_END = "2014-02-09 11:45:00"


def _write_recording(path: Path) -> int:
    devices = {"machine-temp": _nab_rows(BUNDLED, "2014-02-01 00:00:00", ANOMALOUS_END),
               "machine-calm": _nab_rows(BUNDLED, "2014-02-01 00:00:00", CALM_END)}
    with open(path, "w") as f:
        for device, rows in devices.items():
            f.writelines(json.dumps({"device": device, "ts": t, "value": v}) + "\n" for t, v in rows)
    return sum(len(rows) for rows in devices.values())


def _test_rules(path: Path) -> list[str]:
    """A copy of the shipped rules in which only the device alert's `for:` is shortened, from 5 minutes to
    3 seconds, so that the test does not wait 5 minutes; every expression is the shipped one."""
    shipped = yaml.safe_load(RULES.read_text())
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == DEVICE_ALERT:
                rule["for"] = "3s"
    for mine, theirs in zip(rules["groups"], shipped["groups"], strict=True):
        assert [r["expr"] for r in mine["rules"]] == [r["expr"] for r in theirs["rules"]]
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return [r.get("alert") or r["record"] for g in shipped["groups"] for r in g["rules"]]


def _api(port: int, path: str, **params) -> dict:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params))
    assert status == 200, body
    return json.loads(body)["data"]


def _device_alerts(port: int) -> list[dict]:
    return [a for a in _api(port, "alerts")["alerts"] if a["labels"]["alertname"] == DEVICE_ALERT]


@contextmanager
def _fleet_replayed(broker, tmp_path: Path, prometheus: str, name: str, **detector_env: str):
    """The recording replayed into topic ``<name>-sensors`` and every reading processed by a daemon
    (group ``name``) that a Prometheus server (the binary ``prometheus``) with the shipped rules
    scrapes; yields its port and the shipped rule names, then stops both, the daemon with exit 0."""
    topic = f"{name}-sensors"
    broker.create_topics({topic: 2})
    recording = tmp_path / "fleet.jsonl"
    total = _write_recording(recording)
    rule_names = _test_rules(tmp_path / "rules.yml")
    metrics_port = free_port()
    daemon = start_daemon(_daemon_env(broker, topic, name, metrics_port, **detector_env), tmp_path / "daemon.log")
    server, prom_port = start_prometheus(prometheus, tmp_path, metrics_port, "rules.yml")
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 60, what="daemon ready")
        publisher = _replay_to_kafka(recording, broker, topic)
        _, err = publisher.communicate(timeout=120)
        assert publisher.returncode == 0, err
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: metric_value(http_get(url)[1], "forewarn_readings_total") == total, 120,
                 what="every reading processed")
        yield prom_port, rule_names
    finally:
        code = stop_daemon_and_prometheus(daemon, server)
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def test_shipped_rules_fire_the_device_alert_on_a_labelled_anomaly(broker, tmp_path, prometheus_bin):  # noqa: F811
    assert FAILURE_WINDOW[0] <= parse_timestamp(ANOMALOUS_END) <= FAILURE_WINDOW[1]
    with _fleet_replayed(broker, tmp_path, prometheus_bin, "alerts") as (prom_port, rule_names):
        firing = wait_for(lambda: [a for a in _device_alerts(prom_port) if a["state"] == "firing"], 60,
                          what=f"{DEVICE_ALERT} firing in Prometheus")
        scores = {s["metric"]["device"]: float(s["value"][1]) for s in _api(prom_port, "query",
                                                                              query="forewarn_anomaly_score")["result"]}
        assert [a["labels"]["device"] for a in firing] == ["machine-temp"], scores
        (alert,) = firing
        assert alert["labels"]["job"] == "forewarn" and alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["summary"] == "Device machine-temp anomalous for 5 minutes"
        assert "machine-temp" in alert["annotations"]["description"]
        assert scores["machine-temp"] >= 0.999 > scores["machine-calm"]
        # the calm device is not even pending
        assert {a["labels"]["device"] for a in _device_alerts(prom_port)} == {"machine-temp"}

        # every shipped rule was loaded and evaluates without error on the daemon's real series
        groups = _api(prom_port, "rules")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert sorted(loaded) == sorted(rule_names)
        wait_for(lambda: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                             for g in _api(prom_port, "rules")["groups"] for r in g["rules"]), 30,
                 what="every rule evaluated")
        assert {r["name"]: r["health"] for g in _api(prom_port, "rules")["groups"] for r in g["rules"]} == \
            dict.fromkeys(rule_names, "ok")
        # and the recorded device series agrees with the alert
        over = _api(prom_port, "query", query="device:forewarn_anomaly_surprise:over_alarm")["result"]
        assert [s["metric"]["device"] for s in over] == ["machine-temp"]
        # the flag times are there for the incident alert, which stays silent: this daemon runs
        # the default scoring, not one alarm per incident (detector.peak_window 0)
        flagged = _api(prom_port, "query", query="forewarn_device_last_anomaly_timestamp_seconds")["result"]
        assert "machine-temp" in {s["metric"]["device"] for s in flagged}
        (info,) = _api(prom_port, "query", query="forewarn_detector_info")["result"]
        assert info["metric"]["peak_window"] == "0" and info["metric"]["job"] == "forewarn"
        alerts = _api(prom_port, "alerts")["alerts"]
        assert not [a for a in alerts if a["labels"]["alertname"] == "ForewarnDeviceIncident"]


def test_with_only_new_peaks_counting_a_flag_fires_the_incident_alert(broker, tmp_path, prometheus_bin):  # noqa: F811
    """detector.peak_window on: a device's surprise is high only at an incident's new peaks, rarely
    at a scrape, so ForewarnDeviceIncident alarms from the time of its latest flag instead."""
    with _fleet_replayed(broker, tmp_path, prometheus_bin, "incident",
                         FOREWARN_DETECTOR_PEAK_WINDOW="48") as (prom_port, _):
        def incidents() -> list[dict]:
            return [a for a in _api(prom_port, "alerts")["alerts"]
                    if a["labels"]["alertname"] == "ForewarnDeviceIncident" and a["state"] == "firing"]
        firing = wait_for(incidents, 60, what="ForewarnDeviceIncident firing in Prometheus")
        assert "machine-temp" in {a["labels"]["device"] for a in firing}
        assert all(a["labels"]["job"] == "forewarn" and a["labels"]["severity"] == "warning" for a in firing)
        assert all(" ago on " in a["annotations"]["description"] for a in firing)

