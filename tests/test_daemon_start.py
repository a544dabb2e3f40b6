"""``forewarn run``'s start-up: errors that name what to fix, and a stop that does not wait for it."""
import os
import signal
import socket
import subprocess
import sys

import pytest
from kafka.errors import KafkaTimeoutError

from connectors.tansu import free_port
from connectors.kafka import error_text
from tests.kafka_support import ROOT, wait_for

# kafka-python's clients wait this long for a first broker (30 s by default): far longer than
# the test waits, so that an exit at all shows the stop ended the start-up, not the bootstrap
_RUN_WITH_A_LONG_BOOTSTRAP = """
import sys
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
for client in (KafkaAdminClient, KafkaConsumer, KafkaProducer):
    client.DEFAULT_CONFIG["bootstrap_timeout_ms"] = 600_000
from monitor.daemon import Daemon
Daemon.STARTUP_WARN_S = 0.5  # the warning that the start-up waits, soon
from monitor.cli import main
sys.exit(main(["--threads", "1", "run"]))
"""


def _run(env: dict[str, str], log_path, script: str | None = None) -> subprocess.Popen:
    full = {**os.environ, "FOREWARN_LOG_FORMAT": "text", "FOREWARN_METRICS_HOST": "127.0.0.1",
            "FOREWARN_METRICS_PORT": "0", **env}
    command = ["-c", script] if script else ["-m", "monitor.cli", "--threads", "1", "run"]
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, *command], cwd=ROOT, env=full, stdout=log,
                                stderr=subprocess.STDOUT)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_the_brokers_do_not_answer_ends_the_start_up_cleanly(tmp_path, stop):
    """It waited out kafka-python's bootstrap (30 s), then exited 2 on its timeout, though
    ``forewarn run --help`` promises a stop at once with the broker unreachable."""
    log_path = tmp_path / "daemon.log"
    daemon = _run({"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing listens there
                   "FOREWARN_STATE_STORE": "local", "FOREWARN_STATE_LOCAL_PATH": str(tmp_path / "state.db"),
                   "FOREWARN_STATE_CHECKPOINT_INTERVAL_S": "3600"},  # taken, with a warning
                  log_path, _RUN_WITH_A_LONG_BOOTSTRAP)
    try:
        # the state file is open, and the consumer's constructor waits for a broker
        wait_for(lambda: "waiting_for=the consumer" in log_path.read_text(), 120, what="the start-up waiting")
        daemon.send_signal(stop)
        code = daemon.wait(120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log_path.read_text()
    assert code == 0, text
    assert "connecting to the brokers" in text and "still starting: waiting for the brokers" in text
    assert "stopped before starting" in text and "closing=['store']" in text, text
    assert "the ForewarnCheckpointsStalled alert (no checkpoint in 15 minutes) will fire" in text
    assert "ERROR" not in text and "exiting on an error" not in text, text


def test_a_metrics_port_in_use_names_the_address_and_the_settings(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = _run({"FOREWARN_METRICS_PORT": str(port)}, tmp_path / "daemon.log")
        assert daemon.wait(120) == 2
    assert (f"forewarn: error: cannot serve metrics on 127.0.0.1:{port} (metrics.host, metrics.port): "
            "Address already in use") in (tmp_path / "daemon.log").read_text()


def test_a_metrics_host_that_does_not_resolve_names_the_address_and_the_settings(tmp_path):
    daemon = _run({"FOREWARN_METRICS_HOST": "no-such-host.invalid", "FOREWARN_METRICS_PORT": "9108"},
                  tmp_path / "daemon.log")
    assert daemon.wait(120) == 2
    assert ("forewarn: error: cannot serve metrics on no-such-host.invalid:9108 (metrics.host, metrics.port): "
            in (tmp_path / "daemon.log").read_text())


def test_an_error_s_type_is_named_once():
    """kafka-python's errors begin with their type's name: the log said
    "KafkaTimeoutError: KafkaTimeoutError: Unable to bootstrap"."""
    assert error_text(KafkaTimeoutError("Unable to bootstrap")) == "KafkaTimeoutError: Unable to bootstrap"
    assert error_text(KafkaTimeoutError()) == "KafkaTimeoutError"
    assert error_text(ValueError("bad")) == "ValueError: bad"
    assert error_text(TimeoutError()) == "TimeoutError"


def test_clients_opened_before_a_failure_in_priming_are_closed(monkeypatch):
    """The clients connect on their own thread while torch primes on the main one: priming that
    fails after they are all open must still close them."""
    from prometheus_client import CollectorRegistry

    from monitor.config import Config
    from monitor.daemon import Daemon

    class Client:
        closed = False

        def close(self):
            self.closed = True

    clients = {name: Client() for name in ("store", "source", "sinks")}
    daemon = Daemon(Config.load(environ={"FOREWARN_METRICS_HOST": "127.0.0.1", "FOREWARN_METRICS_PORT": "0"}),
                    registry=CollectorRegistry())
    connected = []

    def connect(startup):
        for name, client in clients.items():
            startup.keep(name, name, lambda c=client: c)
        connected.append(startup)

    def prime():
        wait_for(lambda: connected and connected[0].done.is_set(), timeout=60)  # the start-up is done
        raise RuntimeError("torch broke")

    monkeypatch.setattr(daemon, "_connect", connect)
    monkeypatch.setattr(daemon, "_prime", prime)
    with pytest.raises(RuntimeError, match="torch broke"):
        daemon.run()
    assert {name: c.closed for name, c in clients.items()} == {"store": True, "source": True, "sinks": True}


def test_memory_freed_by_a_burst_of_adaptations_is_handed_back_once_the_burst_ends(monkeypatch):
    """glibc kept a burst's freed heap resident (1.1 GiB after 2,000 streams adapted, 0.37 GiB in
    use): the daemon sat at its peak until restarted."""
    from prometheus_client import CollectorRegistry

    import monitor.daemon as daemon_module
    from monitor.config import Config
    calls = []
    monkeypatch.setattr(daemon_module, "release_free_memory", lambda: calls.append(1) or 0.01)
    daemon = daemon_module.Daemon(Config.load(environ={}), registry=CollectorRegistry())
    for adapted in (40, 30, 0):  # a burst of 70 streams, over two batches, then one without (or a quiet poll)
        daemon._release_after_burst(adapted)
    assert len(calls) == 1
    for adapted in (10, 0, 0, 20, 0):  # a trickle: not worth a trim per batch
        daemon._release_after_burst(adapted)
    assert len(calls) == 1
    daemon._release_after_burst(40)
    daemon._release_after_burst(0)  # the trickle adds up: 70 since the last
    assert len(calls) == 2
    for _ in range(3000):  # batches that all adapt a few: the burst never ends, yet it is handed back
        daemon._release_after_burst(2)
    assert len(calls) == 3


def test_release_free_memory_calls_the_c_library_where_it_has_malloc_trim():
    import platform

    from monitor.daemon import release_free_memory
    seconds = release_free_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert seconds is not None and seconds >= 0


def test_the_alarm_caveat_is_told_once_a_device_with_several_channels_comes():
    """It was logged at every start with alarm_surprise 64, though a fleet of single metrics,
    NAB's kind, is not capped at all."""
    import logging

    from prometheus_client import CollectorRegistry

    from monitor.config import Config
    from monitor.daemon import Daemon
    from monitor.readings import Reading
    daemon = Daemon(Config.load(environ={"FOREWARN_DETECTOR_ALARM_SURPRISE": "64",
                                         "FOREWARN_DETECTOR_WARMUP": "16"}), registry=CollectorRegistry())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("forewarn.daemon")
    logger.addHandler(handler)
    try:
        for readings in ([Reading("a", float(t), {"v": 1.0}) for t in range(20)],
                         [Reading("b", 0.0, {"v": 1.0, "w": 2.0})], [Reading("c", 0.0, {"v": 1.0, "w": 2.0})]):
            daemon.pipeline.feed(readings)
            daemon._tell_alarm_caveat()
            if readings[0].device == "a":
                assert not records  # single metrics: nothing to say
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:35] for r in records] == ["alarm surprise 64 is above 49.7, th"]
