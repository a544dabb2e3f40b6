"""Kafka in and out, on kafka-python, with at-least-once delivery.

``KafkaSource`` polls a batch, turns each record into a ``Reading`` or a
``BadRecord``, and remembers the next offset of every partition it returned;
``commit`` then commits the offsets it is given.  The daemon commits only
offsets whose readings were scored, whose outputs were acknowledged and whose
device states are durable (its checkpoints), so a crash at any point replays
from a state that matches the committed offsets.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import (KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, UnknownTopicOrPartitionError,
                          for_code)
from kafka.structs import OffsetAndMetadata

from monitor.config import KafkaConfig
from monitor.logs import fields
from monitor.readings import BadRecord, MessageFormat, Reading, Score, excerpt, parse_message

log = logging.getLogger("forewarn.kafka")

# Closing never waits longer for an unreachable broker: what it has not acknowledged
# was not committed either, so it is processed again after a restart.
CLOSE_TIMEOUT_S = 5.0
LAG_TIMEOUT_MS = 2000  # lag is information: never hold the loop for it
END_OFFSETS_TIMEOUT_MS = 10_000  # a restore asks once; it is tried again if the broker is slower


@dataclass
class PolledBatch:
    """One poll's readings and rejected records, where each reading came from, and the offsets to commit.

    >>> reading = Reading("pump-7", 5.0, {"temp": 71.2}, ref="sensors/1@41")
    >>> batch = PolledBatch([reading], partition_of={"pump-7": 1}, offset_of={id(reading): (1, 41)},
    ...                     offsets={TopicPartition("sensors", 1): 42}, records=1)
    >>> batch.offset_of[id(reading)]  # a Reading is unhashable: facts about one are keyed by its id()
    (1, 41)
    >>> batch.offsets  # Kafka commits the next offset to read, not the last one read
    {TopicPartition(topic='sensors', partition=1): 42}
    """

    readings: list[Reading] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    arrival: dict[int, float] = field(default_factory=dict)  # id(reading) -> record timestamp (s)
    partition_of: dict[str, int] = field(default_factory=dict)  # device -> partition (its last record's)
    # device -> another partition it came on in this batch: producers not keying by device
    split: dict[str, int] = field(default_factory=dict)
    offset_of: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(reading) -> (partition, offset)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to commit
    records: int = 0
    messages: dict = field(default_factory=dict)  # TopicPartition -> the poll's records, by offset

    def with_raw(self, bad: list[BadRecord]) -> list[BadRecord]:
        """``bad`` with the message each came from where it lacks it: the pipeline's rejections
        (a duplicate timestamp, say) name only their reading's source, and the input topic's
        retention may delete it before anyone reads the dead letter.

        >>> from collections import namedtuple
        >>> from monitor.readings import BadReason
        >>> Record = namedtuple("Record", "offset value")
        >>> batch = PolledBatch(messages={TopicPartition("sensors", 1): [Record(41, b'{"a": 1}'), Record(43, b"x")]})
        >>> late = BadRecord(BadReason.DUPLICATE_TIMESTAMP, "ts 5 after 5", ref=record_ref("sensors", 1, 41))
        >>> [b.raw for b in batch.with_raw([late])]
        ['{"a": 1}']
        """
        out = []
        for b in bad:
            if b.raw is None:
                raw = self._raw(b.ref)
                if raw is not None:
                    b = replace(b, raw=raw)
            out.append(b)
        return out

    def key_of(self, ref: str) -> bytes | None:
        """The key of the record ``ref`` names, if it is in this batch and has one."""
        record = self._record(ref)
        return None if record is None else record.key

    def _raw(self, ref: str) -> str | None:
        record = self._record(ref)
        return None if record is None else excerpt(record.value or b"")

    def _record(self, ref: str):
        at = parse_ref(ref)
        if at is None:
            return None
        topic, partition, wanted = at
        messages = self.messages.get(TopicPartition(topic, partition))
        if not messages:
            return None
        i = bisect.bisect_left(messages, wanted, key=lambda m: m.offset)
        if i < len(messages) and messages[i].offset == wanted:
            return messages[i]
        return None


def record_ref(topic: str, partition: int, offset: int) -> str:
    """Where a record came from, as errors and dead letters name it: ``sensors/3@1042``."""
    return f"{topic}/{partition}@{offset}"


def parse_ref(ref: str) -> tuple[str, int, int] | None:
    """``record_ref``'s topic, partition and offset back; None for another kind of ref.

    >>> parse_ref("sensors/3@1042"), parse_ref("line 12")
    (('sensors', 3, 1042), None)
    """
    where, _, offset = ref.rpartition("@")
    topic, _, partition = where.rpartition("/")
    try:
        return topic, int(partition), int(offset)
    except ValueError:
        return None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource") -> None:
        self.source = source

    def on_partitions_revoked(self, revoked):
        self.source._revoked(set(revoked))

    def on_partitions_assigned(self, assigned):
        self.source._assigned(set(assigned))

    def on_partitions_lost(self, lost):
        # evicted: another member may already own these partitions and have moved their
        # state on, so nothing of them may be written from here
        self.source._revoked(set(lost), lost=True)


class KafkaSource:
    """A consumer-group member that hands out batches of readings.

    ``on_revoke(partitions, lost)`` and ``on_assign(partitions)`` are called from
    inside ``poll`` when the group rebalances (``lost``: the member was evicted and
    the partitions may already belong to another).

    >>> from connectors.tansu import EmbeddedBroker
    >>> def first_batch(broker):
    ...     broker.create_topics({"sensors": 1})
    ...     producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    ...     producer.send("sensors", b'{"device": "pump-7", "ts": 5, "values": {"temp": 71.2}}')
    ...     producer.send("sensors", b"not json")
    ...     producer.close()  # waits until both are acknowledged
    ...     # joining a group waits out the rebalance and session timeouts: short ones keep this quick
    ...     source = KafkaSource(KafkaConfig(bootstrap_servers=broker.bootstrap, max_poll_interval_ms=2000,
    ...                                      session_timeout_ms=2000, heartbeat_interval_ms=500, poll_timeout_ms=200))
    ...     try:
    ...         for _ in range(100):
    ...             batch = source.poll()
    ...             if batch.records:
    ...                 source.commit(batch.offsets)
    ...                 return batch
    ...     finally:
    ...         source.close()
    >>> with EmbeddedBroker() as broker:
    ...     batch = first_batch(broker)
    >>> batch.readings
    [Reading(device='pump-7', ts=5.0, values={'temp': 71.2}, ref='sensors/0@0')]
    >>> [str(b) for b in batch.bad]
    ['sensors/0@1: malformed: invalid JSON (Expecting value: line 1 column 1 (char 0))']
    >>> batch.offsets
    {TopicPartition(topic='sensors', partition=0): 2}
    """

    def __init__(self, cfg: KafkaConfig, message_format: MessageFormat = MessageFormat(),
                 on_revoke: Callable[[set[TopicPartition]], None] | None = None,
                 on_assign: Callable[[set[TopicPartition]], None] | None = None) -> None:
        self.cfg = cfg
        self.message_format = message_format
        self.on_revoke = on_revoke
        self.on_assign = on_assign
        self._delivered: dict[TopicPartition, int] = {}  # processed and delivered, not yet committed
        # this member's own clocks for in_group: kafka-python resets its heartbeat timers when it
        # finds the coordinator again, before it learns that the group has dropped the member
        self._polled_at = self._joined_at = time.monotonic()
        self._clock_warned_at = -math.inf
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
        self._polled_at = time.monotonic()
        records = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records)
        batch.messages = records
        now = time.time()
        latest = now + self.cfg.max_timestamp_ahead_s if self.cfg.max_timestamp_ahead_s else math.inf
        newest_record = -1  # broker timestamp (ms), to tell a clock of this instance's far behind
        # per record, so the batch's containers are bound once
        partition_of, arrival, offset_of, readings = batch.partition_of, batch.arrival, batch.offset_of, batch.readings
        fmt = self.message_format
        for tp, messages in records.items():
            partition = tp.partition
            prefix = f"{tp.topic}/{partition}@"  # record_ref's form
            for m in messages:
                parsed = parse_message(m.value, fmt, prefix + str(m.offset), latest)
                if parsed.bad:
                    batch.bad.extend(parsed.bad)
                stamp = m.timestamp
                if stamp is not None and stamp > newest_record:
                    newest_record = stamp
                reading = parsed.reading
                if reading is not None:
                    readings.append(reading)
                    if stamp is not None and stamp >= 0:
                        arrival[id(reading)] = stamp / 1000.0
                    device = reading.device
                    was = partition_of.get(device, partition)
                    if was != partition:
                        batch.split[device] = was
                    partition_of[device] = partition
                    offset_of[id(reading)] = (partition, m.offset)
            batch.records += len(messages)
            batch.offsets[tp] = messages[-1].offset + 1
        if newest_record / 1000.0 > latest:
            self._clock_behind(newest_record / 1000.0 - now)
        return batch

    CLOCK_WARNING_INTERVAL_S = 600.0

    def _clock_behind(self, lead: float) -> None:
        """Records stamped (by their producers, or the broker) further ahead of this clock than
        readings may be: this clock may be behind, and valid readings refused as bad_timestamp."""
        at = time.monotonic()
        if at - self._clock_warned_at < self.CLOCK_WARNING_INTERVAL_S:
            return
        self._clock_warned_at = at
        log.warning("records arrive stamped further ahead of this instance's clock than "
                    "kafka.max_timestamp_ahead_s: if this clock is behind, readings are refused as bad_timestamp "
                    "(logged every 10 minutes while it lasts)", extra=fields(ahead_s=round(lead, 1)))

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit offsets whose readings are scored and whose outputs are delivered."""
        if not offsets:
            return
        self._delivered.update(offsets)
        self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self._delivered.items()})
        self._delivered.clear()

    def rewind(self, partitions) -> dict[TopicPartition, int | None]:
        """Go back to the committed offset of these partitions, or to the start without one
        (under ``earliest``); returns the committed offsets (None: none).  kafka-python keeps
        the fetch position of a partition that stays with this member across a rebalance:
        past what the state restored for it covers, when its devices were not all saved on
        revoke."""
        assigned = self.consumer.assignment()
        committed_at = {}
        for tp in partitions:
            if tp not in assigned:
                continue
            committed_at[tp] = committed = self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)
            elif self.cfg.auto_offset_reset == "earliest":
                self.consumer.seek_to_beginning(tp)
        return committed_at

    def end_offsets(self, partitions) -> dict[TopicPartition, int]:
        """The next offset each of these partitions will write (KafkaTimeoutError, which
        is retriable, after ``END_OFFSETS_TIMEOUT_MS``: the loop is not held longer)."""
        return self.consumer.end_offsets(list(partitions), timeout_ms=END_OFFSETS_TIMEOUT_MS)

    def pause(self, partitions) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partitions) -> None:
        self.consumer.resume(*[tp for tp in partitions if tp in self.consumer.assignment()])

    def in_group(self) -> bool:
        """Whether this member may still speak for its partitions, as far as it can tell: the
        group stable with it in it and its session alive (``session_alive``).  A member dropped
        while it was busy or paused (a batch past kafka.max_poll_interval_ms, a frozen VM)
        believes it holds its partitions until its next poll; state it writes then lands after
        the new owner's."""
        coordinator = getattr(self.consumer, "_coordinator", None)  # kafka-python's, not public
        try:
            stable = coordinator is None or coordinator.generation_if_stable() is not None
        except AttributeError:  # another kafka-python: cannot tell, so as before
            stable = True
        return stable and self.session_alive()

    def session_alive(self) -> bool:
        """This member's session by its own clocks: a heartbeat answered within the session
        timeout of the last one or of the join, and a poll within the rebalance timeout.  Also
        right inside a rebalance, where the group is not stable but the partitions still ours."""
        now = time.monotonic()
        if now - self._polled_at > self.cfg.max_poll_interval_ms / 1000:
            return False
        heartbeat = getattr(getattr(self.consumer, "_coordinator", None), "heartbeat", None)
        answered = getattr(heartbeat, "last_receive", None)
        if answered is None:  # another kafka-python: the poll clock alone
            return True
        return now - max(answered, self._joined_at) <= self.cfg.session_timeout_ms / 1000

    def connected(self) -> bool:
        """Whether the group coordinator is known and its connection is up.

        kafka-python has no public call for this: this is its coordinator's own test,
        read without its side effect (marking the coordinator dead is the IO thread's
        business); a kafka-python without these attributes counts as connected.
        """
        try:
            node = self.consumer._coordinator.coordinator_id
            client = self.consumer._client
            return node is not None and not (client.is_disconnected(node) and client.connection_delay(node) > 0)
        except AttributeError:
            return True

    def partitions_for_topic(self) -> int:
        return len(self.consumer.partitions_for_topic(self.cfg.topic) or ()) or 1

    def partitions_now(self, timeout_ms: int = 2000) -> int:
        """The input topic's partitions as the broker has them now.  The consumer's own
        metadata is refreshed every metadata_max_age_ms (5 minutes): a member that did not
        lead the rebalance learns of new partitions late."""
        admin = admin_client(self.cfg, timeout_ms)
        try:
            topic = admin.describe_topics([self.cfg.topic])[0]
        finally:
            admin.close()
        if topic["error_code"]:
            raise for_code(topic["error_code"])(f"input topic {self.cfg.topic!r}")
        if not topic["partitions"]:
            raise UnknownTopicOrPartitionError(f"input topic {self.cfg.topic!r} has no partitions")
        return len(topic["partitions"])

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the partition end, per assigned partition (from the consumer's own view)."""
        parts = self.assignment()
        if not parts:
            return {}
        ends = self.consumer.end_offsets(list(parts), timeout_ms=LAG_TIMEOUT_MS)
        positions = {tp: self.consumer.position(tp, timeout_ms=LAG_TIMEOUT_MS) for tp in parts}
        return {tp: max(0, ends[tp] - pos) for tp, pos in positions.items() if pos is not None}

    def _revoked(self, partitions: set[TopicPartition], lost: bool = False) -> None:
        # kafka-python 3 calls a synchronous listener on its IO thread, where a commit cannot
        # block, and only while the main thread waits inside poll() or close() (its heartbeat
        # task never calls it: checked in 3.0.12's source and against the broker), so the
        # daemon's state is never touched from two threads at once.  Delivered but uncommitted
        # offsets of these partitions are dropped instead.
        # The next owner re-reads from the last commit and skips what the states saved on
        # revoke already cover.
        for tp in partitions:
            self._delivered.pop(tp, None)
        if self.on_revoke:
            self.on_revoke(partitions, lost)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self._joined_at = time.monotonic()
        if self.on_assign:
            self.on_assign(partitions)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class OutputTopicError(ValueError):
    """A configured output topic does not exist and cannot be created.

    Its message suggests leaving the output topics empty; then there is nothing to check
    (and no broker to ask):

    >>> KafkaSinks(KafkaConfig(anomalies_topic="", dead_letter_topic="", scores_topic="")).ensure_topics()
    []
    >>> issubclass(OutputTopicError, ValueError)  # the CLI reports it as a setting to fix, without a traceback
    True
    """


class KafkaSinks:
    """Anomaly events and dead letters, each optional, through one producer.

    >>> from connectors.tansu import EmbeddedBroker
    >>> def sent_anomalies(broker):
    ...     sinks = KafkaSinks(KafkaConfig(bootstrap_servers=broker.bootstrap, anomalies_topic="anomalies"))
    ...     try:
    ...         print(sinks.ensure_topics())
    ...         scores = [Score("pump-7", 5.0, 0.42, False), Score("pump-7", 6.0, 0.9995, True, "temp")]
    ...         print(sinks.send_scores(scores))  # anomalies sent; the scores topic is not configured
    ...         sinks.flush()  # the daemon commits input offsets only after this
    ...     finally:
    ...         sinks.close()
    ...     consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    ...     try:
    ...         consumer.assign([TopicPartition("anomalies", p) for p in consumer.partitions_for_topic("anomalies")])
    ...         for _ in range(50):
    ...             for records in consumer.poll(timeout_ms=200).values():
    ...                 return [(r.key, json.loads(r.value)["ts"]) for r in records]
    ...     finally:
    ...         consumer.close()
    >>> with EmbeddedBroker() as broker:
    ...     sent_anomalies(broker)
    ['anomalies']
    1
    [(b'pump-7', 6.0)]
    """

    def __init__(self, cfg: KafkaConfig) -> None:
        self.cfg = cfg
        self.anomalies_topic = cfg.anomalies_topic
        self.dead_letter_topic = cfg.dead_letter_topic
        self.scores_topic = cfg.scores_topic
        self.producer = None
        self._futures: list = []
        if self.anomalies_topic or self.dead_letter_topic or self.scores_topic:
            self.producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers.split(","),
                                          client_id=f"{cfg.client_id}-sink", acks="all", linger_ms=5,
                                          retries=2**31 - 1, delivery_timeout_ms=cfg.delivery_timeout_ms,
                                          compression_type=cfg.compression_type or None, **cfg.security())

    def ensure_topics(self) -> list[str]:
        """Create the configured output topics that do not exist yet (the broker's default
        partitions and replication); returns those created.  Otherwise, on a broker that
        does not create topics, a missing one would show only at the first output, as a
        metadata timeout, and again after every restart."""
        topics = sorted({t for t in (self.anomalies_topic, self.dead_letter_topic, self.scores_topic) if t})
        if not topics:
            return []
        admin = admin_client(self.cfg)
        try:
            missing = sorted(t["name"] for t in admin.describe_topics(topics)
                             if t["error_code"] == UnknownTopicOrPartitionError.errno)
            if missing:
                try:
                    admin.create_topics([NewTopic(t, -1, -1) for t in missing])
                except TopicAlreadyExistsError:  # another instance was quicker
                    pass
                except KafkaError as exc:
                    raise OutputTopicError(f"output topic(s) {', '.join(missing)} do not exist and could not be "
                                           f"created ({type(exc).__name__}): create them, or leave "
                                           "kafka.anomalies_topic / dead_letter_topic / scores_topic empty") from None
        finally:
            admin.close()
        for topic in topics:  # now, while the broker is known to be up: a first send during an
            self.producer.partitions_for(topic)  # outage would block on it, outside any wait we watch
        return missing

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

    def send_dead_letters(self, bad: list[BadRecord], key_of: Callable[[str], bytes | None] | None = None) -> int:
        """Each bad record as a dead letter; ``key_of(source)`` gives its record's key, which the
        letter carries as its own key and, as text, in ``key`` (a tombstone has nothing else)."""
        if not self.dead_letter_topic:
            return 0
        for b in bad:
            key = key_of(b.ref) if key_of else None
            letter = {"reason": b.reason.value, "detail": b.detail, "source": b.ref, "raw": b.raw,
                      "key": None if key is None else excerpt(key), "rejected_at": time.time()}
            if key is not None and len(key) > self.MAX_LETTER_KEY_BYTES:
                # a record's key of a megabyte would make its letter one the producer refuses, and a
                # daemon that cannot dead-letter a record stops on it at every restart
                letter["key_bytes"], key = len(key), None
            self._futures.append(self.producer.send(self.dead_letter_topic, key=key, value=json.dumps(letter).encode()))
        return len(bad)

    MAX_LETTER_KEY_BYTES = 4096  # a device name is at most 256 characters: 1 KiB of UTF-8

    def flush(self, on_wait: Callable[[float], None] | None = None) -> None:
        """Block until everything sent is acknowledged; raises if any of it was not.

        ``on_wait(seconds)`` is called about every second while the broker has not answered.
        """
        if self.producer is None:
            return
        futures, self._futures = self._futures, []
        flush_acknowledged(self.producer, futures, on_wait)

    def close(self) -> None:
        if self.producer is not None:
            close_producer(self.producer)


def reading_message(reading: Reading) -> bytes:
    return json.dumps({"device": reading.device, "ts": reading.ts, "values": reading.values}).encode()


# A broker that has acknowledged nothing for this long while readings wait is taken as lost:
# a healthy one answers in milliseconds, and the producer's own retries would hide an outage
# for its delivery timeout (120 s) before a send failed.
PUBLISH_STALL_S = 10.0
# The longest one reading may be held back for its recorded pace: beyond it the speed is a
# mistake (a wait of years; past ~292 years time.sleep overflows).
MAX_PACE_WAIT_S = 7 * 86400.0
PUBLISH_TICK_S = 0.5  # progress, and the broker's answers, are looked at this often while pacing


class PublishError(KafkaError):
    """Publishing stopped before the end of the recording because the broker did not take
    the readings; ``sent`` readings had been handed to the producer, ``acknowledged`` of them
    acknowledged.

    >>> err = PublishError("the broker acknowledged nothing for 10 s", sent=120, acknowledged=80)
    >>> str(err), err.sent - err.acknowledged  # without kafka-python's class-name prefix
    ('the broker acknowledged nothing for 10 s', 40)
    >>> isinstance(err, KafkaError)  # where it is not caught, the CLI reports it as other Kafka errors
    True
    """

    def __init__(self, message: str, sent: int, acknowledged: int) -> None:
        super().__init__(message)
        self.sent, self.acknowledged = sent, acknowledged

    def __str__(self) -> str:
        return str(self.args[0])


class PaceError(ValueError):
    """The recorded pace at the speed asked for would hold a reading back for an absurd time
    (longer than ``MAX_PACE_WAIT_S``); ``sent`` readings had been sent before it.

    >>> err = PaceError("the recorded pace at speed 1e-300 would hold the reading ...", sent=1)
    >>> isinstance(err, ValueError), err.sent  # a setting to change, as the CLI reports ValueError
    (True, 1)
    """

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


class _Acknowledgements:
    """Counts what the broker answered: on the producer's IO thread, or on the sending one
    when a future is done before its callback is added, so both may count at once."""

    def __init__(self) -> None:
        self.acknowledged = 0
        self.error: BaseException | None = None
        self.answered_at = time.monotonic()
        self._lock = threading.Lock()

    def ok(self, _metadata) -> None:
        with self._lock:  # += is not atomic across threads: a lost count would look like a stall
            self.acknowledged += 1
            self.answered_at = time.monotonic()

    def failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


def publish_recording(batches, producer: KafkaProducer, topic: str, speed: float | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      stall_s: float = PUBLISH_STALL_S) -> tuple[int, list[BadRecord]]:
    """Publish readings keyed by device; ``speed`` scales the recorded pace (None = as fast as possible).

    Returns the number published (all acknowledged) and the file's bad records (which are
    not sent).  ``on_progress(n)`` is told of readings sent at least every ``PUBLISH_TICK_S``
    while they go out.  Raises ``PublishError`` as soon as a send fails or the broker has
    acknowledged nothing for ``stall_s`` while readings wait, and ``PaceError`` before a wait
    longer than ``MAX_PACE_WAIT_S``.
    """
    sent = 0
    bad: list[BadRecord] = []
    acks = _Acknowledgements()
    first_ts = started = None
    unreported = 0
    reported_at = waiting_since = time.monotonic()

    def check(now: float) -> None:
        nonlocal unreported, reported_at
        if acks.error is not None:
            raise PublishError(f"the broker did not acknowledge a reading ({error_text(acks.error)})",
                               sent, acks.acknowledged)
        if acks.acknowledged < sent and now - max(acks.answered_at, waiting_since) > stall_s:
            raise PublishError(f"the broker acknowledged nothing for {stall_s:g} s with "
                               f"{sent - acks.acknowledged} readings waiting: is it down or unreachable?",
                               sent, acks.acknowledged)
        if on_progress and unreported and now - reported_at >= PUBLISH_TICK_S:
            on_progress(unreported)
            unreported, reported_at = 0, now

    for batch in batches:
        bad.extend(batch.bad)
        for reading in batch.readings:
            if speed is not None:
                if first_ts is None:
                    first_ts, started = reading.ts, time.monotonic()
                due = started + (reading.ts - first_ts) / speed
                now = time.monotonic()
                if due - now > MAX_PACE_WAIT_S:  # inf too: a speed of 1e-300 makes one
                    raise PaceError(f"the recorded pace at speed {speed:g} would hold the reading at ts "
                                    f"{reading.ts:.0f} back for {due - now:.3g} s ({(due - now) / 86400:.3g} days), "
                                    f"past the limit of {MAX_PACE_WAIT_S / 86400:g} days for one wait", sent)
                while now < due:  # in steps, so that progress shows and a lost broker is noticed
                    check(now)
                    time.sleep(min(due - now, PUBLISH_TICK_S))
                    now = time.monotonic()
            now = time.monotonic()
            if acks.acknowledged == sent:  # nothing was waiting: the broker's silence starts now
                waiting_since = now
            try:
                future = producer.send(topic, key=reading.device.encode(), value=reading_message(reading))
            except KafkaTimeoutError as exc:  # its buffer full, or the topic's metadata not coming
                raise PublishError(f"the producer did not take a reading ({error_text(exc)})", sent,
                                   acks.acknowledged) from None
            future.add_callback(acks.ok)
            future.add_errback(acks.failed)
            sent += 1
            unreported += 1
            check(now)
    if on_progress and unreported:
        on_progress(unreported)
    wait_flushed(producer, lambda _seconds: check(time.monotonic()))
    check(time.monotonic())
    return sent, bad


def error_text(exc: BaseException) -> str:
    """``Type: message``, the type named once: kafka-python's errors already begin with it.

    >>> error_text(KafkaTimeoutError("Unable to bootstrap")), error_text(ValueError("bad")), error_text(TimeoutError())
    ('KafkaTimeoutError: Unable to bootstrap', 'ValueError: bad', 'TimeoutError')
    """
    name, text = type(exc).__name__, str(exc)
    if not text or text == name:
        return name
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


def close_producer(producer: KafkaProducer,
                   dropped: str = "they were not committed and are processed again after a restart") -> None:
    """Close, waiting at most ``CLOSE_TIMEOUT_S`` for acknowledgements.

    kafka-python's ``close(timeout)`` raises instead of giving up when records are still
    unacknowledged; those were never committed, so they are dropped here (through the
    sender's own force-close) and processed again after a restart.  ``dropped`` says in
    the warning what becomes of them, for a caller whose records are not the daemon's.
    """
    try:
        producer.close(timeout=CLOSE_TIMEOUT_S)
        return
    except KafkaTimeoutError:
        log.warning("closing a producer with unacknowledged records: %s", dropped)
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()  # aborts the pending batches, so close no longer waits on them
        sender.join(CLOSE_TIMEOUT_S)
    try:
        producer.close(timeout=0)
    except KafkaTimeoutError:  # the sender did not stop: the process is exiting anyway
        log.warning("producer did not close cleanly")


def flush_acknowledged(producer: KafkaProducer, futures: list,
                       on_wait: Callable[[float], None] | None = None) -> None:
    """Wait until every future is acknowledged, raising the first send error."""
    wait_flushed(producer, on_wait)
    _raise_failed(futures)


def wait_flushed(producer: KafkaProducer, on_wait: Callable[[float], None] | None = None) -> None:
    """Wait until everything sent is acknowledged or has failed.

    The wait is cut into one-second steps so that a broker outage is visible
    (``on_wait`` sees the seconds waited so far) rather than a silent hang; the
    producer keeps retrying until its ``delivery_timeout_ms`` runs out.
    """
    started = time.monotonic()
    while True:
        try:
            producer.flush(timeout=1.0)
            return
        except KafkaTimeoutError:
            if on_wait is not None:
                on_wait(time.monotonic() - started)


def admin_client(cfg: KafkaConfig, timeout_ms: int = 30_000) -> KafkaAdminClient:
    """An admin client; ``timeout_ms`` bounds its bootstrap and each request."""
    return KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers.split(","), client_id=f"{cfg.client_id}-admin",
                            bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms, **cfg.security())


def _raise_failed(futures) -> None:
    for f in futures:
        if f.failed():
            raise f.exception
