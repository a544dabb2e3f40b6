"""The HTTP endpoints and the metrics that describe what this instance holds."""
import logging
import math
import socket
import time

import pytest
import torch
from kafka.errors import CommitFailedError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry, Counter, generate_latest

from monitor.config import Config
from monitor.daemon import Daemon, _CheckpointRound
from monitor.http_server import HealthServer, _QuietHandler
from monitor.metrics import Metrics
from monitor.readings import Reading, Score
from monitor.scoring import ScoringConfig
from tests.kafka_support import http_get, metric_value, wait_for


def test_an_idle_client_does_not_hold_the_probes_of_everyone_else():
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    server.start()
    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request line, then silence (a port scan, a stuck scraper)
        base = f"http://127.0.0.1:{server.port}"
        assert http_get(f"{base}/healthz", timeout=30)[0] == 200
        assert http_get(f"{base}/readyz", timeout=30)[0] == 200
    finally:
        idle.close()
        server.stop()


def _closed_by_the_server(sock: socket.socket, wait: float = 30) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_slow_clients_cannot_take_every_descriptor_and_are_let_go_at_a_deadline(monkeypatch):
    """Each trickling a header line within the handler's timeout, slow clients held a thread and
    a descriptor each for ever: past the process's limit the probes failed and accept() spun."""
    from monitor.http_server import _ThreadingServer
    monkeypatch.setattr(_ThreadingServer, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(_ThreadingServer, "REQUEST_DEADLINE_S", 3600.0)  # the cap first: no deadline meanwhile
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    server.start()
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
        wait_for(lambda: len(server.server._opened) == 4, 30, what="four connections held")
        with socket.create_connection(("127.0.0.1", server.port)) as fifth:  # turned away: closed at once,
            assert _closed_by_the_server(fifth, wait=10)  # where it would wait an hour for its request
        server.server.REQUEST_DEADLINE_S = 1.0
        for s in slow:  # shut by the server at the deadline, though they never finished a request
            assert _closed_by_the_server(s)
        # their handlers let go of their slots just after: until then a probe would be turned away too
        wait_for(lambda: not server.server._opened, 30, what="the slow clients' slots freed")
        assert http_get(f"http://127.0.0.1:{server.port}/healthz", timeout=30)[0] == 200
    finally:
        for s in slow:
            s.close()
        server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_server_listens_on_ipv6_hosts_and_stays_ipv4_by_default():
    """metrics.host "::" or "::1" was refused ("Address family for hostname not supported");
    "::" takes IPv4 clients too, so a probe on either address family reaches it."""
    for host, reached, not_reached in (("::", ["[::1]", "127.0.0.1"], []), ("::1", ["[::1]"], ["127.0.0.1"]),
                                       ("[::1]", ["[::1]"], []), ("0.0.0.0", ["127.0.0.1"], ["[::1]"])):
        server = HealthServer(host, 0, CollectorRegistry(), lambda: True, lambda: True)
        server.start()
        try:
            for address in reached:
                assert http_get(f"http://{address}:{server.port}/healthz", timeout=30) == (200, "ok\n"), (host, address)
            for address in not_reached:
                assert http_get(f"http://{address}:{server.port}/healthz", timeout=30)[0] == 0, (host, address)
        finally:
            server.stop()
    assert Config().metrics.host == "0.0.0.0"


class _Records(logging.Handler):
    """On the HTTP server's logger itself: the CLI's logging set-up stops propagation to caplog."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def http_log():
    logger, handler = logging.getLogger("forewarn.http"), _Records()
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    # not up to the handler an earlier test's CLI run left on "forewarn", on a stderr since closed:
    # its "--- Logging error ---" traceback would be taken for the server's
    logger.propagate = False
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request``, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_idle_and_failing_clients_are_logged_quietly_and_never_as_a_traceback(monkeypatch, capfd, http_log):
    """An idle connection printed socketserver's traceback to stderr at its timeout, outside the
    JSON logs (300 of them, ~5,000 lines): now a debug line, and other errors a warning line."""
    monkeypatch.setattr(_QuietHandler, "timeout", 0.2)
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    server.start()
    try:
        assert _exchange(server.port, b"") == b""  # said nothing: closed at the handler's timeout
        assert _exchange(server.port, b"GET /metr") == b""  # stopped mid-line
        timeouts = [r for r in http_log if "timed out or went away" in r.getMessage()]
        assert len(timeouts) == 2 and all(r.levelno == logging.DEBUG for r in timeouts)
        assert "TimeoutError" in timeouts[0].fields["error"]

        def broken(self):
            raise RuntimeError("handler broke")
        monkeypatch.setattr(_QuietHandler, "handle", broken)
        http_log.clear()
        for _ in range(3):
            _exchange(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert [r.levelno for r in http_log] == [logging.WARNING, logging.DEBUG, logging.DEBUG]  # once a minute
        assert http_log[0].fields["error"] == "RuntimeError: handler broke"
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err


class _Huge:
    """One gauge whose label holds ``size`` bytes: a response no socket buffer takes whole."""

    def __init__(self, size: int) -> None:
        self.size = size

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        family = GaugeMetricFamily("huge", "a response larger than the socket buffers", labels=["blob"])
        family.add_metric(["x" * self.size], 1.0)
        yield family


def test_a_client_that_stops_reading_a_response_is_logged_at_debug_not_as_a_traceback(monkeypatch, capfd, http_log):
    """wsgiref catches the write's timeout itself and printed its traceback to stderr."""
    monkeypatch.setattr(_QuietHandler, "timeout", 0.2)
    registry = CollectorRegistry()
    registry.register(_Huge(32 * 2**20))
    server = HealthServer("127.0.0.1", 0, registry, lambda: True, lambda: True)
    server.start()
    try:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", server.port))
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # and never reads
            wait_for(lambda: any("cut short" in r.getMessage() for r in http_log), 60, what="the write to time out")
    finally:
        server.stop()
    assert all(r.levelno == logging.DEBUG for r in http_log if "cut short" in r.getMessage())
    err = capfd.readouterr().err
    assert "Traceback" not in err and "timed out" not in err


def test_a_burst_of_connections_waits_to_be_accepted_rather_than_retry_seconds_later():
    """socketserver's backlog of 5 dropped the rest of a burst: their connects retried after
    1 s, then 3 s, past the probes' timeout."""
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    burst = []
    try:  # not started: nothing is accepted, so every connection waits in the backlog
        for _ in range(64):
            burst.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
    finally:
        for s in burst:
            s.close()
        server.stop()
    assert len(burst) == 64


class _Blocking:
    """A collector that counts its calls and holds each until released."""

    def __init__(self) -> None:
        import threading
        self.calls = 0
        self.release = threading.Event()

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        self.calls += 1
        self.release.wait(60)
        yield GaugeMetricFamily("blocking", "held until released", value=1.0)


def test_scrapes_arriving_while_one_is_rendered_share_its_answer():
    """Each scrape rendered every series in full, taking the GIL from the processing loop:
    four scrapers polling at once cut it from 8,600 to 1,900 batches/s."""
    from concurrent.futures import ThreadPoolExecutor
    registry, collector = CollectorRegistry(), _Blocking()
    registry.register(collector)
    collector.release.set()  # registering collects once, to learn the names
    collector.calls, collector.release = 0, type(collector.release)()
    server = HealthServer("127.0.0.1", 0, registry, lambda: True, lambda: True)
    server.start()
    try:
        with ThreadPoolExecutor(5) as pool:
            scrapes = [pool.submit(http_get, f"http://127.0.0.1:{server.port}/metrics", timeout=60) for _ in range(5)]
            wait_for(lambda: collector.calls + server.renders.waiting >= 5, 60, what="five scrapes at the render")
            assert collector.calls == 1 and server.renders.waiting == 4
            collector.release.set()
            answers = [f.result() for f in scrapes]
        assert {status for status, _ in answers} == {200} and len({text for _, text in answers}) == 1
        assert "blocking 1.0" in answers[0][1]
        collector.release.set()
        assert http_get(f"http://127.0.0.1:{server.port}/metrics", timeout=60)[0] == 200
        assert collector.calls == 2  # a scrape after it renders afresh
    finally:
        collector.release.set()
        server.stop()


def test_an_endpoint_that_raises_answers_500_with_a_warning_not_a_traceback(capfd, http_log):
    def healthy():
        raise ValueError("no clock")
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), healthy, lambda: True)
    server.start()
    try:
        assert http_get(f"http://127.0.0.1:{server.port}/healthz", timeout=30)[0] == 500
        assert http_get(f"http://127.0.0.1:{server.port}/readyz", timeout=30)[0] == 200
    finally:
        server.stop()
    warnings = [r for r in http_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].fields["error"] == "ValueError: no clock"
    assert "Traceback" not in capfd.readouterr().err


def test_head_is_answered_as_get_without_the_body_on_every_path():
    """HEAD /healthz, /readyz and a 404 sent their body (HTTP forbids it); HEAD /metrics was 405."""
    registry = CollectorRegistry()
    Counter("forewarn_example", "something to export", registry=registry).inc()
    server = HealthServer("127.0.0.1", 0, registry, lambda: True, lambda: False)
    server.start()
    try:
        for path, status in (("/healthz", b"200"), ("/readyz", b"503"), ("/metrics", b"200"), ("/", b"200"),
                             ("/nowhere", b"404")):
            got = _exchange(server.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            head = _exchange(server.port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
            get_headers, _, get_body = got.partition(b"\r\n\r\n")
            head_headers, _, head_body = head.partition(b"\r\n\r\n")
            assert head_headers.split(b" ")[1] == get_headers.split(b" ")[1] == status, path
            assert head_body == b"" and get_body, path
            assert f"Content-Length: {len(get_body)}".encode() in head_headers.split(b"\r\n"), path
            assert b"Content-Type" in head_headers, path
    finally:
        server.stop()


def test_the_probes_refuse_methods_other_than_get_and_head_as_metrics_does():
    """A POST to /healthz was answered 200 "ok", as if it were a probe; /metrics left HEAD out of
    its Allow header, though it answers HEAD."""
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    server.start()
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            for method, status in (("POST", b"405"), ("DELETE", b"405"), ("OPTIONS", b"200")):
                headers, _, body = _exchange(server.port, f"{method} {path} HTTP/1.0\r\n\r\n".encode()
                                             ).partition(b"\r\n\r\n")
                assert headers.split(b" ")[1] == status, (method, path)
                assert b"\r\nAllow: OPTIONS, GET, HEAD" in headers and b"ok" not in body, (method, path)
    finally:
        server.stop()


def test_a_device_left_out_of_the_score_series_stops_counting_once_it_gets_one():
    metrics = Metrics(CollectorRegistry(), max_devices=1)
    metrics.observe_scores([Score("a", 1.0, 0.5, False), Score("b", 1.0, 0.5, False)])
    assert metric_value(generate_latest(metrics.registry).decode(), "forewarn_score_devices_not_exported") == 1
    metrics.forget_devices(["a"])  # idle, or its partition moved
    metrics.observe_scores([Score("b", 2.0, 0.6, False)])  # b takes the freed slot
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "forewarn_score_devices_not_exported") == 0
    assert 'forewarn_anomaly_score{device="b"} 0.6' in text


def test_each_scored_or_restored_device_s_latest_reading_time_is_exported():
    """What ForewarnDeviceSilent reads: a sensor that stops before a restart is as quiet as one
    that stops after; one that never got past its warm-up (a mistyped id) is not exported."""
    metrics = Metrics(CollectorRegistry(), max_devices=2)
    before = time.time() - 1.0  # exported in whole seconds
    metrics.observe_scores([Score("typo", 1.0, None, False), Score("live", 1.0, 0.5, False),
                            Score("other", 1.0, 0.5, False)])
    text = generate_latest(metrics.registry).decode()
    for device in ("live", "other"):
        seen = metric_value(text, f'forewarn_device_last_reading_timestamp_seconds{{device="{device}"}}')
        assert before <= seen <= time.time() + 1.0
    assert 'device="typo"' not in text and metric_value(text, "forewarn_score_devices_not_exported") == 0
    metrics.restore_devices({"restored": before - 3600.0, "live": before - 3600.0})  # no room; live is here
    text = generate_latest(metrics.registry).decode()
    assert 'device="restored"' not in text and metric_value(text, "forewarn_score_devices_not_exported") == 1
    assert metric_value(text, 'forewarn_device_last_reading_timestamp_seconds{device="live"}') >= before
    metrics.forget_devices(["other"])
    metrics.restore_devices({"restored": before - 3600.0})  # the freed slot
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, 'forewarn_device_last_reading_timestamp_seconds{device="restored"}') == round(before - 3600.0)
    assert metric_value(text, "forewarn_score_devices_not_exported") == 0
    assert 'forewarn_anomaly_score{device="restored"}' not in text  # not scored here yet
    metrics.observe_scores([Score("restored", 2.0, None, False)])  # a channel of it warming still counts
    assert metric_value(generate_latest(metrics.registry).decode(),
                        'forewarn_device_last_reading_timestamp_seconds{device="restored"}') >= before


def test_each_exported_device_has_its_surprise_and_the_alarm_level_is_exported_both_ways():
    metrics = Metrics(CollectorRegistry(), max_devices=1, scoring=ScoringConfig(alarm_surprise=65.0))
    metrics.observe_scores([Score("a", 1.0, 1.0, False, surprise=40.0), Score("b", 1.0, 1.0, True, surprise=70.0)])
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, 'forewarn_anomaly_surprise{device="a"}') == 40.0
    assert 'device="b"' not in text  # past max_devices: neither of its gauges
    assert metric_value(text, "forewarn_anomaly_alarm_surprise") == 65.0
    assert metric_value(text, "forewarn_anomaly_threshold") == 1.0  # 1 - 1e-65, as a float
    assert 'alarm_surprise="65"' in text and 'threshold="0.999"' in text and 'peak_window="0"' in text
    assert "forewarn_device_last_anomaly_timestamp_seconds{" not in text  # nothing flagged yet (b is not exported)
    before = time.time()
    metrics.observe_scores([Score("a", 2.0, 1.0, True, surprise=66.0)])
    flagged_at = metric_value(generate_latest(metrics.registry).decode(),
                              'forewarn_device_last_anomaly_timestamp_seconds{device="a"}')
    assert before <= flagged_at <= time.time()
    metrics.forget_devices(["a"])
    text = generate_latest(metrics.registry).decode()
    assert "forewarn_anomaly_surprise{" not in text and "forewarn_device_last_anomaly_timestamp_seconds{" not in text
    default = generate_latest(Metrics(CollectorRegistry(), scoring=ScoringConfig(threshold=0.995)).registry).decode()
    assert metric_value(default, "forewarn_anomaly_threshold") == 0.995
    assert metric_value(default, "forewarn_anomaly_alarm_surprise") == pytest.approx(2.30103, abs=1e-5)


def test_a_daemon_exports_its_alarm_level_its_settings_and_when_each_device_was_flagged():
    """What ForewarnDeviceIncident reads, from the configuration through the pipeline."""
    env = {"FOREWARN_DETECTOR_WARMUP": "64", "FOREWARN_DETECTOR_PEAK_WINDOW": "48",
           "FOREWARN_DETECTOR_ALARM_SURPRISE": "30"}
    daemon = Daemon(Config.load(environ=env), registry=CollectorRegistry())
    noise = (0.05 * torch.randn(400, generator=torch.Generator().manual_seed(0))).tolist()
    waves = [Reading(f"dev{i}", float(t), {"x": math.sin(t / 6) + noise[2 * t + i]}) for t in range(200) for i in range(2)]
    daemon.metrics.observe_scores(daemon.pipeline.feed(waves).scores)
    result = daemon.pipeline.feed([Reading("dev0", 200.0, {"x": 1e4}),
                                   Reading("dev1", 200.0, {"x": math.sin(200 / 6)})])
    assert [s.anomaly for s in result.scores] == [True, False] and result.scores[0].score == 1.0
    daemon.metrics.observe_scores(result.scores)
    text = generate_latest(daemon.registry).decode()
    assert metric_value(text, "forewarn_anomaly_alarm_surprise") == 30.0
    assert 'peak_window="48"' in text and 'alarm_surprise="30"' in text
    assert metric_value(text, 'forewarn_anomaly_surprise{device="dev0"}') >= 30.0
    assert 'forewarn_device_last_anomaly_timestamp_seconds{device="dev0"}' in text
    assert 'forewarn_device_last_anomaly_timestamp_seconds{device="dev1"}' not in text


def test_priming_adapts_a_made_up_stream_on_its_own_pipeline():
    """Before joining the group (torch's one-off set-up must not make a first batch outlast
    kafka.max_poll_interval_ms): nothing of it stays in the daemon's pipeline or metrics."""
    daemon = Daemon(Config.load(environ={"FOREWARN_DETECTOR_WARMUP": "32"}), registry=CollectorRegistry())
    assert daemon._prime() == 1
    assert daemon.pipeline.streams_by_state() == {"warming": 0, "adapting": 0, "live": 0}
    assert daemon.registry.get_sample_value("forewarn_readings_total") == 0.0


def test_the_streams_gauge_drops_with_the_partitions_a_rebalance_takes():
    daemon = Daemon(Config.load(environ={"FOREWARN_DETECTOR_WARMUP": "16"}), registry=CollectorRegistry())
    partition = TopicPartition("sensors", 0)
    daemon._on_assign([partition])
    daemon._partition_of.update({f"dev{i}": 0 for i in range(3)})
    result = daemon.pipeline.feed([Reading(f"dev{i}", float(t), {"x": float((t * 7 + i) % 5)})
                                   for t in range(20) for i in range(3)])
    daemon.metrics.observe_scores(result.scores)
    daemon.metrics.set_streams(daemon.pipeline.streams_by_state())
    live = 'forewarn_streams{state="live"}'
    assert metric_value(generate_latest(daemon.registry).decode(), live) == 3
    daemon._on_revoke([partition])  # a member left without partitions polls no batch that would update it
    assert metric_value(generate_latest(daemon.registry).decode(), live) == 0


def test_an_adaptation_burst_counts_as_the_loop_alive():
    """A fleet switched on adapts for minutes in one feed; /healthz must not call that a stuck loop
    (a liveness restart would replay the same burst, and again)."""
    daemon = Daemon(Config.load(environ={"FOREWARN_DETECTOR_WARMUP": "16", "FOREWARN_DETECTOR_ADAPT_BATCH": "2"}),
                    registry=CollectorRegistry())
    daemon._last_turn -= 2 * daemon.config.metrics.healthy_after_s  # the feed began long ago
    assert not daemon.healthy()
    daemon.pipeline.feed([Reading(f"dev{i}", float(t), {"x": float((t * 7 + i) % 5)})
                          for t in range(16) for i in range(5)])
    assert daemon.healthy()


def test_devices_arriving_on_another_partition_are_counted():
    """Unkeyed producers spread a device over partitions, which ordering and recovery assume away."""
    daemon = Daemon(Config.load(environ={}), registry=CollectorRegistry())
    for partition_of in ({"a": 0, "b": 1}, {"a": 0, "b": 1, "c": 2}, {"a": 1, "b": 1, "c": 0}):
        daemon._note_moves(partition_of)
        daemon._partition_of.update(partition_of)
    text = generate_latest(daemon.registry).decode()
    assert metric_value(text, "forewarn_device_partition_moves_total") == 2  # a, then c
    # a null key spreads a device over partitions within every batch, ending each on the same one
    for _ in range(3):
        daemon._note_moves({"a": 1, "b": 1, "c": 0}, split={"b": 0})
        daemon._partition_of.update({"a": 1, "b": 1, "c": 0})
    text = generate_latest(daemon.registry).decode()
    assert metric_value(text, "forewarn_device_partition_moves_total") == 5  # b, in each batch


class _RefusingSource:
    """A source whose group refuses every commit (this member was kicked out)."""

    def commit(self, offsets):
        raise CommitFailedError("refused")

    def connected(self):
        return True

    def in_group(self):  # as far as it could tell before the commit
        return True


class _NullStore:
    def flush(self, on_wait=None):
        pass

    def take_dropped(self):
        return []


def test_a_refused_commit_is_no_checkpoint_and_the_state_settings_are_exported():
    """ForewarnCheckpointsStalled reads both: a commit the group refuses leaves the readings to be
    processed again, and an instance that never checkpoints after its start must still be seen."""
    daemon = Daemon(Config.load(environ={"FOREWARN_STATE_CHECKPOINT_INTERVAL_S": "15"}), registry=CollectorRegistry())
    daemon.store = _NullStore()
    for _ in range(3):
        daemon._round = _CheckpointRound({TopicPartition("sensors", 0): 10}, [])
        daemon._advance_round(_RefusingSource(), 1000)
    assert daemon.registry.get_sample_value("forewarn_commit_failures_total") == 3
    assert daemon.registry.get_sample_value("forewarn_state_checkpoints_total") == 0
    assert daemon.registry.get_sample_value("forewarn_state_info",
                                            {"store": "changelog", "checkpoint_interval_s": "15"}) == 1


def test_the_device_counts_its_flagged_readings_in_a_row_while_its_latest_is_flagged():
    metrics = Metrics(CollectorRegistry())
    in_a_row = "forewarn_device_consecutive_anomalous_readings"

    def run(*flags):
        metrics.observe_scores([Score("a", float(t), 1.0 if f else 0.5, f, surprise=5.0 if f else 0.3)
                                for t, f in enumerate(flags)])
        return metrics.registry.get_sample_value(in_a_row, {"device": "a"})

    assert run(True) == 1
    assert run(True, True) == 3  # across batches
    assert run(False) is None  # absent once the latest is not flagged
    assert run(True, False, True) == 1


def test_lag_that_cannot_be_read_is_warned_of_once_in_a_while_and_the_loop_goes_on():
    """A lag query that failed was logged at debug level only: the gauge kept its last values
    with nothing to say it had gone stale."""
    from kafka import TopicPartition
    from kafka.errors import KafkaTimeoutError
    daemon = Daemon(Config.load(environ={}), registry=CollectorRegistry())
    daemon._assigned = {TopicPartition("sensors", 0)}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("forewarn.daemon")
    logger.addHandler(handler)

    class Source:
        def lag(self):
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 1.0 secs")
    try:
        daemon._update_lag(Source())
        daemon._update_lag(Source())  # within the interval: not again
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "consumer lag unavailable" in warnings[0].getMessage()
    assert warnings[0].fields["error"].startswith("KafkaTimeoutError: Failed to get offsets")


def test_lag_is_exported_for_held_partitions_only_and_latency_for_fed_readings_only():
    """kafka-python revokes on its IO thread and lists a revoked partition until the group has
    settled: the lag series removed on revoke came back frozen, and summed into the topic's lag.
    Re-deliveries a restored state covers are skipped, not scored: their age is no latency."""
    from kafka import TopicPartition

    from connectors.kafka import PolledBatch
    daemon = Daemon(Config.load(environ={}), registry=CollectorRegistry())
    held, revoked = TopicPartition("sensors", 0), TopicPartition("sensors", 1)
    daemon._assigned = {held}

    class Source:
        def lag(self):
            return {held: 5, revoked: 846}
    daemon._update_lag(Source())
    text = generate_latest(daemon.registry).decode()
    assert 'forewarn_consumer_lag_records{partition="0",topic="sensors"} 5.0' in text
    assert 'partition="1"' not in text
    old, new = Reading("a", 1.0, {"v": 1.0}), Reading("a", 2.0, {"v": 1.0})
    batch = PolledBatch([old, new], arrival={id(old): time.time() - 25.0, id(new): time.time()})
    daemon._observe_latency(batch, [new])  # old: skipped as covered
    count = daemon.registry.get_sample_value("forewarn_processing_latency_seconds_count")
    # the new reading's (moments), not the skipped one's (25 s): the bucket between them, far from both
    below_10s = daemon.registry.get_sample_value("forewarn_processing_latency_seconds_bucket", {"le": "10.0"})
    assert count == 1 and below_10s == 1
    many = [Reading("b", float(t), {"v": 1.0}) for t in range(300)]
    daemon._observe_latency(PolledBatch(many, arrival={id(r): time.time() for r in many}), many)
    assert daemon.registry.get_sample_value("forewarn_processing_latency_seconds_count") <= 1 + 256


def test_a_member_with_no_partitions_says_so_at_growing_intervals(forewarn_logs):
    """A join can take kafka.max_poll_interval_ms (300 s): the log said nothing meanwhile,
    and a slow join, or a group that never assigns, looked like a hung daemon."""
    daemon = Daemon(Config.load(environ={"FOREWARN_STATE_STORE": "none"}), registry=CollectorRegistry())

    def said_at(times) -> list[float]:
        out = []
        for t in times:
            forewarn_logs.clear()
            daemon._note_unassigned(t)
            out += [t for r in forewarn_logs if "no partitions assigned yet" in r.getMessage()]
        return out

    assert said_at(range(0, 1300, 5)) == [30, 60, 120, 240, 480, 960]
    daemon._assigned = {TopicPartition("t", 0)}
    assert said_at([5000]) == []
    daemon._assigned = set()  # all revoked later: counted afresh
    assert said_at([6000, 6025, 6030]) == [6030]
