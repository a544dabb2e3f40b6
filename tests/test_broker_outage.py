"""The broker goes away and comes back while the daemon runs: it waits, reconnects and loses nothing."""
from __future__ import annotations

import signal
import time

import pytest
from kafka.errors import KafkaTimeoutError

from connectors.state_store import ChangelogStore
from connectors.tansu import EmbeddedBroker, free_port
from tests.kafka_support import (BrokerLink, assert_warmed_once, committed_offsets, http_get, metric_value, publish,
                                 read_topic, run_in_thread, start_daemon, wait_for)
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


def test_a_restore_the_broker_does_not_answer_is_retried_not_fatal(broker, monkeypatch):
    """The broker may go away just as partitions are restored (at start, on a rebalance, as a
    longer outage ends): their devices wait, paused, and the restore is tried again."""
    daemon, topic, group = _daemon_on(broker, "restore")
    daemon.RESTORE_RETRY_S = 0.2
    failures = []
    original = ChangelogStore.load

    def load_while_the_broker_is_away(store, partitions, on_progress=None):
        if len(failures) < 3:
            failures.append(1)
            assert not daemon.ready()
            raise KafkaTimeoutError("Unable to bootstrap from the broker")
        return original(store, partitions, on_progress)
    monkeypatch.setattr(ChangelogStore, "load", load_while_the_broker_is_away)
    errors = _run_until_committed(daemon, broker, topic, group)
    assert not errors and len(failures) == 3
    assert daemon.records == 100 * DEVICES


def test_a_state_write_with_no_room_in_the_producer_is_a_wait_not_fatal(broker, monkeypatch):
    """With the broker away a checkpoint's snapshots fill the producer's buffer, and a put
    gives up after ``max_block_ms``: the round waits, not ready, and writes them again."""
    daemon, topic, group = _daemon_on(broker, "full")
    refused, ready_when_refused = [], []
    original = ChangelogStore.put

    def put_with_a_full_buffer(store, partition, device, data):
        if len(refused) < 5:
            # the changelog's partitions were learnt at the restore: a real put would not block on them
            assert store.producer._metadata.partitions_for_topic(store.topic)
            refused.append(device)
            raise KafkaTimeoutError("Failed to allocate memory within the configured max blocking time")
        ready_when_refused.append(daemon.ready())
        return original(store, partition, device, data)
    monkeypatch.setattr(ChangelogStore, "put", put_with_a_full_buffer)
    errors = _run_until_committed(daemon, broker, topic, group)
    assert not errors and len(refused) == 5
    assert ready_when_refused[0] is False  # the round waited for the broker, not ready


def _daemon_on(broker, name: str):
    """A daemon (changelog state) over a one-partition topic holding 100 readings per device."""
    from monitor.config import Config
    from monitor.daemon import Daemon
    from tests.kafka_support import FAST_GROUP

    topic, scores, group = f"{name}-sensors", f"{name}-scores", name
    broker.create_topics({topic: 1, scores: 1})
    publish(broker.bootstrap, topic, _messages(range(100)))
    return Daemon(Config.load(environ={**FAST_GROUP, **_env(broker, topic, group, 0, scores)})), topic, group


def _run_until_committed(daemon, broker, topic, group) -> list[BaseException]:
    """Run the daemon until all 100 readings per device are committed or it dies; stop it."""
    thread, errors = run_in_thread(daemon)
    try:
        wait_for(lambda: sum(committed_offsets(broker.bootstrap, group, topic).values()) == 100 * DEVICES
                 or errors, 120, what="the readings to be processed and committed")
    finally:
        daemon.stop()
        thread.join(60)
    return errors
