"""The broker goes away and comes back while the daemon runs: it waits, reconnects and loses nothing."""
from __future__ import annotations

import signal
import time

import pytest

from connectors.tansu import EmbeddedBroker, free_port
from tests.kafka_support import (BrokerLink, assert_warmed_once, committed_offsets, http_get, metric_value, publish,
                                 read_topic, start_daemon, wait_for)
from tests.test_state_recovery import DEVICES, _env, _messages

OUTAGE_S = 5.0  # longer than the tests' 3 s session timeout


@pytest.fixture
def linked_broker():
    """A broker reached only through a link the test can cut."""
    link_port = free_port()
    broker = EmbeddedBroker(advertised_port=link_port)
    link = BrokerLink(link_port, broker.port)
    with broker:
        yield broker, link
    link.close()


def test_broker_outage_daemon_waits_not_ready_then_continues_without_loss(linked_broker, tmp_path):
    broker, link = linked_broker
    topic, scores, group = "outage-sensors", "outage-scores", "outage"
    broker.create_topics({topic: 2, scores: 1})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = start_daemon(_env(broker, topic, group, port, scores), tmp_path / "daemon.log")

    def committed() -> int:
        return sum(committed_offsets(broker.bootstrap, group, topic).values())

    def outage(expected_line: str) -> None:
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 503, 60, what="readiness to drop")
        assert http_get(f"{base}/healthz")[0] == 200, "waiting for the broker is alive, not stuck"
        assert metric_value(http_get(f"{base}/metrics")[1], "forewarn_ready") == 0.0
        wait_for(lambda: expected_line in (tmp_path / "daemon.log").read_text(), 30, what=expected_line)
        time.sleep(OUTAGE_S)  # hold the outage past the session timeout, so the group notices too
        link.restore()
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 120, what="readiness to come back")
    try:
        publish(broker.bootstrap, topic, _messages(range(300)))
        wait_for(lambda: committed() == 300 * DEVICES, 180, what="the first part")
        link.cut()  # while idle: the consumer loses its coordinator
        outage("broker unreachable")
        publish(broker.bootstrap, topic, _messages(range(300, 600)))
        link.cut()  # while the part is processed: outputs wait for acknowledgement, or the consumer notices
        outage("broker")
        publish(broker.bootstrap, topic, _messages(range(600, 900)))
        wait_for(lambda: committed() == 900 * DEVICES, 180, what="everything after the outages")
        assert daemon.poll() is None, "the daemon rode out the outages without restarting"
        log = (tmp_path / "daemon.log").read_text()
        assert "broker reachable again" in log

        # stopped during an outage: it exits without waiting out the broker, commits nothing
        # it could not deliver, and the next run processes the rest
        publish(broker.bootstrap, topic, _messages(range(900, 1200)))
        link.cut()
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 503, 60, what="readiness to drop")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
        link.restore()
        daemon = start_daemon(_env(broker, topic, group, port, scores), tmp_path / "second.log")
        wait_for(lambda: committed() == 1200 * DEVICES, 180, what="the next run to process the rest")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    assert daemon.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    scored = read_topic(broker.bootstrap, scores)
    assert {(s["device"], s["ts"]) for s in scored} == {(f"d{d}", float(t)) for t in range(1200) for d in range(DEVICES)}
    assert_warmed_once(scored)


def test_stop_while_waiting_for_the_broker_gives_up_the_wait_uncommitted():
    from monitor.config import Config
    from monitor.daemon import Daemon, StoppedWhileWaiting

    daemon = Daemon(Config())
    daemon._assigned = {"partition"}
    ready_while_waiting = []

    class UnacknowledgedSink:  # a producer whose broker does not answer
        def flush(self, on_wait):
            on_wait(1.0)  # a slow acknowledgement is not yet an outage
            ready_while_waiting.append(daemon.ready())
            on_wait(daemon.SLOW_ACK_S)
            ready_while_waiting.append(daemon.ready())
            daemon.stop()  # SIGTERM arrives during the wait
            on_wait(daemon.SLOW_ACK_S + 1)  # a reachable broker gets its grace period
            on_wait(daemon.STOP_GRACE_S)

    assert daemon.ready()
    with pytest.raises(StoppedWhileWaiting):
        daemon._flushed(UnacknowledgedSink())
    assert ready_while_waiting == [True, False]
