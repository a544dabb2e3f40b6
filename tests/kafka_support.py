"""Helpers for tests against the real embedded broker and a real daemon process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]

FAST_GROUP = {  # a consumer group joins only after the rebalance timeout: keep it short here
    "FOREWARN_KAFKA_MAX_POLL_INTERVAL_MS": "3000",
    # and batches small, so that one (an adaptation on a loaded machine) stays well inside that
    # timeout: a batch past it loses the partitions, and their records come again
    "FOREWARN_KAFKA_MAX_POLL_RECORDS": "500",
    "FOREWARN_KAFKA_SESSION_TIMEOUT_MS": "3000",
    "FOREWARN_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    "FOREWARN_KAFKA_POLL_TIMEOUT_MS": "200",
}


def wait_for(condition, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll until ``condition()`` is truthy; a generous deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what} after {timeout} s")


def start_daemon(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    full = {**os.environ, **FAST_GROUP, "FOREWARN_LOG_FORMAT": "text", **env}
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "monitor.cli", "--threads", "1", "run"], cwd=ROOT,
                            env=full, stdout=log, stderr=subprocess.STDOUT)


def run_in_thread(daemon) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``daemon.run()`` on a thread; the list gets what it died of, if anything."""
    errors: list[BaseException] = []

    def target():
        try:
            daemon.run()
        except Exception as exc:  # noqa: BLE001  (the test checks it)
            errors.append(exc)
    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:  # generous: CI machines stall
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def read_topic(bootstrap: str, topic: str, idle_ms: int = 1500) -> list[dict]:
    """Every message on the topic, from the beginning, as parsed JSON."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=idle_ms)
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    out = [json.loads(m.value) for m in consumer]
    consumer.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    parts = consumer.partitions_for_topic(topic) or set()
    out = {}
    for p in parts:
        c = consumer.committed(TopicPartition(topic, p))
        out[p] = c or 0
    consumer.close()
    return out


def publish(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def assert_warmed_once(scored: list[dict]) -> None:
    """Each device's unscored (warming) readings come before all its scored ones:
    a device that re-warmed after a restart or a move would have a second run."""
    has_score: dict[tuple[str, float], bool] = {}
    for s in scored:
        key = (s["device"], s["ts"])
        has_score[key] = has_score.get(key, False) or s["score"] is not None
    devices = {d for d, _ in has_score}
    for device in devices:
        warming = [t for (d, t), ok in has_score.items() if d == device and not ok]
        live = [t for (d, t), ok in has_score.items() if d == device and ok]
        assert live, f"{device} never went live"
        assert not warming or max(warming) < min(live), f"{device} warmed up again at ts {max(warming)}"


def start_prometheus(binary: str, tmp_path: Path, target_port: int,
                     rule_files: str | None = None) -> tuple[subprocess.Popen, int]:
    """A real Prometheus on loopback scraping ``target_port`` every second as job ``forewarn``
    (the job the shipped rules expect), evaluating ``rule_files`` if given."""
    port = _free_port()
    rules = f"  evaluation_interval: 1s\nrule_files: [{rule_files}]\n" if rule_files else ""
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
{rules}scrape_configs:
  - job_name: forewarn
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115  (the server's stderr, closed with it)
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60, what="prometheus ready")
    return proc, port


def stop_daemon_and_prometheus(daemon: subprocess.Popen, prometheus: subprocess.Popen) -> int:
    """SIGTERM the daemon and wait for it, stop Prometheus; the daemon's exit code."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(30)
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def _free_port() -> int:
    from connectors.tansu import free_port
    return free_port()


class BrokerLink:
    """A TCP forwarder in front of the broker, to take the broker away and bring it back.

    The broker advertises the link's port, so every client connection runs through it.
    ``cut()`` closes the listening port and resets every open connection, which is what
    clients see when a broker process stops; ``restore()`` listens on the same port again
    in front of the same broker log, which is what they see when it starts again with its
    storage intact.  (The embedded Tansu keeps its log in memory, so stopping the process
    itself would also lose the topics.)
    """

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self._lock = threading.Lock()
        self._sockets: set = set()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        listener.close()
        with self._lock:
            open_sockets, self._sockets = self._sockets, set()
        for s in open_sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._listener is not None:
            self.cut()
