"""Kafka in and out, on kafka-python, with at-least-once delivery.

``KafkaSource`` polls a batch, turns each record into a ``Reading`` or a
``BadRecord``, and remembers the next offset of every partition it returned;
``commit`` then commits exactly those offsets.  The daemon calls ``commit`` only
after every reading of the batch was scored and its outputs were flushed, so a
crash at any point replays from the last batch whose results were delivered.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from monitor.config import KafkaConfig
from monitor.readings import BadRecord, MessageFormat, Reading, Score, parse_message

log = logging.getLogger("forewarn.kafka")


@dataclass
class PolledBatch:
    readings: list[Reading] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    arrival: dict[int, float] = field(default_factory=dict)  # id(reading) -> record timestamp (s)
    partition_of: dict[str, int] = field(default_factory=dict)  # device -> partition
    offset_of: dict[int, int] = field(default_factory=dict)  # id(reading) -> its record's offset
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to commit
    records: int = 0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource") -> None:
        self.source = source

    def on_partitions_revoked(self, revoked):
        self.source._revoked(set(revoked))

    def on_partitions_assigned(self, assigned):
        self.source._assigned(set(assigned))


class KafkaSource:
    """A consumer-group member that hands out batches of readings.

    ``on_revoke(partitions)`` and ``on_assign(partitions)`` are called from inside
    ``poll`` when the group rebalances; offsets of batches already handed out
    but not committed are committed first if their outputs were delivered.
    """

    def __init__(self, cfg: KafkaConfig, message_format: MessageFormat = MessageFormat(),
                 on_revoke: Callable[[set[TopicPartition]], None] | None = None,
                 on_assign: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self.cfg = cfg
        self.message_format = message_format
        self.on_revoke = on_revoke
        self.on_assign = on_assign
        self._delivered: dict[TopicPartition, int] = {}  # processed and delivered, not yet committed
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers.split(","),
            group_id=cfg.group_id,
            client_id=cfg.client_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            max_poll_records=cfg.max_poll_records,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            **cfg.security(),
        )
        self.consumer.subscribe([cfg.topic], listener=_Rebalance(self))

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def poll(self) -> PolledBatch:
        batch = PolledBatch()
        records = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records)
        for tp, messages in records.items():
            for m in messages:
                ref = f"{tp.topic}/{tp.partition}@{m.offset}"
                parsed = parse_message(m.value or b"", self.message_format, ref)
                batch.bad.extend(parsed.bad)
                if parsed.reading is not None:
                    batch.readings.append(parsed.reading)
                    if m.timestamp is not None and m.timestamp >= 0:
                        batch.arrival[id(parsed.reading)] = m.timestamp / 1000.0
                    batch.partition_of[parsed.reading.device] = tp.partition
                    batch.offset_of[id(parsed.reading)] = m.offset
                batch.records += 1
            batch.offsets[tp] = messages[-1].offset + 1
        return batch

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit offsets whose readings are scored and whose outputs are delivered."""
        if not offsets:
            return
        self._delivered.update(offsets)
        self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self._delivered.items()})
        self._delivered.clear()

    def pause(self, partitions) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partitions) -> None:
        self.consumer.resume(*[tp for tp in partitions if tp in self.consumer.assignment()])

    def partitions_for_topic(self) -> int:
        return len(self.consumer.partitions_for_topic(self.cfg.topic) or ()) or 1

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the partition end, per assigned partition (from the consumer's own view)."""
        parts = self.assignment()
        if not parts:
            return {}
        ends = self.consumer.end_offsets(list(parts))
        return {tp: max(0, ends[tp] - self.consumer.position(tp)) for tp in parts}

    def _revoked(self, partitions: set[TopicPartition]) -> None:
        if self._delivered:
            try:
                self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self._delivered.items()})
                self._delivered.clear()
            except Exception:  # the group moved on; the next owner replays (at-least-once)
                log.warning("commit on revoke failed", exc_info=True)
        if self.on_revoke:
            self.on_revoke(partitions)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        if self.on_assign:
            self.on_assign(partitions)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class KafkaSinks:
    """Anomaly events and dead letters, each optional, through one producer."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self.anomalies_topic = cfg.anomalies_topic
        self.dead_letter_topic = cfg.dead_letter_topic
        self.scores_topic = cfg.scores_topic
        self.producer = None
        self._futures: list = []
        if self.anomalies_topic or self.dead_letter_topic or self.scores_topic:
            self.producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers.split(","),
                                          client_id=f"{cfg.client_id}-sink", acks="all", linger_ms=5,
                                          retries=2**31 - 1, **cfg.security())

    def send_scores(self, scores: list[Score]) -> int:
        """Anomaly events to the anomalies topic and, if configured, every score to the scores topic."""
        n = 0
        send = self.producer.send if self.producer is not None else None
        for s in scores:
            if not (self.scores_topic or (s.anomaly and self.anomalies_topic)):
                continue
            event = json.dumps({"device": s.device, "ts": s.ts, "score": s.score, "surprise": s.surprise,
                                "anomaly": s.anomaly, "channel": s.channel, "forecast": s.forecast,
                                "value": s.value, "source": s.ref}).encode()
            key = s.device.encode()
            if self.scores_topic:
                self._futures.append(send(self.scores_topic, key=key, value=event))
            if s.anomaly and self.anomalies_topic:
                self._futures.append(send(self.anomalies_topic, key=key, value=event))
                n += 1
        return n

    def send_dead_letters(self, bad: list[BadRecord]) -> int:
        if not self.dead_letter_topic:
            return 0
        for b in bad:
            letter = {"reason": b.reason.value, "detail": b.detail, "source": b.ref, "raw": b.raw,
                      "rejected_at": time.time()}
            self._futures.append(self.producer.send(self.dead_letter_topic, value=json.dumps(letter).encode()))
        return len(bad)

    def flush(self) -> None:
        """Block until everything sent is acknowledged; raises if any of it was not."""
        if self.producer is None:
            return
        self.producer.flush()
        futures, self._futures = self._futures, []
        _raise_failed(futures)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()


def reading_message(reading: Reading) -> bytes:
    return json.dumps({"device": reading.device, "ts": reading.ts, "values": reading.values}).encode()


def publish_recording(batches, producer: KafkaProducer, topic: str, speed: float | None = None,
                      on_progress: Callable[[int], None] | None = None) -> tuple[int, list[BadRecord]]:
    """Publish readings keyed by device; ``speed`` scales the recorded pace (None = as fast as possible).

    Returns the number published and the file's bad records (which are not sent).
    """
    sent = 0
    bad: list[BadRecord] = []
    first_ts = started = None
    futures = []
    for batch in batches:
        bad.extend(batch.bad)
        for reading in batch.readings:
            if speed is not None:
                if first_ts is None:
                    first_ts, started = reading.ts, time.monotonic()
                due = started + (reading.ts - first_ts) / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            futures.append(producer.send(topic, key=reading.device.encode(), value=reading_message(reading)))
            sent += 1
        if on_progress:
            on_progress(len(batch.readings))
        if len(futures) > 10_000:
            producer.flush()
            _raise_failed(futures)
            futures = []
    producer.flush()
    _raise_failed(futures)
    return sent, bad


def _raise_failed(futures) -> None:
    for f in futures:
        if f.failed():
            raise f.exception
