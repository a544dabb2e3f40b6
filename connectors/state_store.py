"""Where per-device state snapshots live between runs: a Kafka changelog or a local file.

Both stores keep the latest snapshot per device, grouped by the input partition
the device arrives on, and have one protocol: ``put`` snapshots, ``flush`` to
make them durable (before the daemon commits input offsets), ``load`` what the
given partitions hold.

* ``ChangelogStore``: a compacted topic keyed by device id, one partition per
  input partition, as Kafka Streams and Quix Streams do.  Any instance of the
  consumer group can restore any partition, so state moves with its partitions.
* ``LocalStore``: an SQLite file, for a single instance without a changelog.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
from kafka.errors import (IncompatibleBrokerVersion, KafkaTimeoutError, MessageSizeTooLargeError,
                          TopicAlreadyExistsError, UnknownTopicOrPartitionError, UnsupportedVersionError)

from connectors.kafka import admin_client, close_producer, flush_acknowledged, wait_flushed
from monitor.config import KafkaConfig

log = logging.getLogger("forewarn.state")


class StoreError(ValueError):
    """The state store cannot be used as configured; the message says what to do.

    A changelog made when the input topic had fewer partitions, on a broker (like the embedded
    one) that cannot add partitions:

    >>> from connectors.tansu import EmbeddedBroker
    >>> with EmbeddedBroker() as broker:  # doctest: +ELLIPSIS
    ...     broker.create_topics({"plant-state": 1})
    ...     store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "plant-state")
    ...     try:
    ...         store.ensure_partitions(2)
    ...     finally:
    ...         store.close()
    Traceback (most recent call last):
        ...
    connectors.state_store.StoreError: changelog topic 'plant-state' has 1 partition(s) but the input topic has 2, ...
    """


class LocalStore:
    """Snapshots in one SQLite file; ``flush`` commits the transaction.

    >>> store = LocalStore(":memory:")
    >>> store.put(0, "pump-7", b"state")
    >>> store.flush()
    >>> store.load([0]), store.load([1])
    ([(0, 'pump-7', b'state')], [])
    """

    shared = False  # other instances cannot read it: for a group of one

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._named():  # a directory, another kind of file, no permission
            self.db = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS state (partition INTEGER, device TEXT PRIMARY KEY, data BLOB)")

    @contextmanager
    def _named(self):
        """SQLite's errors (a corrupt file, one made read-only or locked by another process, a
        full disk) as a StoreError naming the file and the setting."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state file {self.path!r} (state.local_path): {exc}") from None

    def ensure_partitions(self, needed: int, deadline: float | None = None) -> None:
        """Any number of partitions fits one table."""

    def put(self, partition: int, device: str, data: bytes) -> None:
        with self._named():
            self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (partition, device, data))

    def take_dropped(self) -> list[tuple[str, int]]:
        """No size limit here: nothing is dropped."""
        return []

    def delete(self, partition: int, device: str) -> None:
        """The device's snapshot, if it was written for this partition: one row per device, so
        a snapshot written since for its new partition has replaced the old one, and stays."""
        with self._named():
            self.db.execute("DELETE FROM state WHERE device = ? AND partition = ?", (device, partition))

    def flush(self, on_wait=None) -> None:
        with self._named():
            self.db.commit()

    def load(self, partitions: Iterable[int], on_progress: Callable[[], None] | None = None
             ) -> list[tuple[int, str, bytes]]:
        parts = sorted(set(partitions))
        if not parts:
            return []
        marks = ",".join("?" * len(parts))
        # as blobs: a row edited by hand (a NULL, text, a name that is not UTF-8) is one device's
        # snapshot that fails to decode, and that device re-warms, not a restore that fails
        with self._named():
            rows = self.db.execute(f"SELECT partition, CAST(device AS BLOB), CAST(data AS BLOB) FROM state "
                                   f"WHERE partition IN ({marks})", parts).fetchall()
        return [(p, bytes(d or b"").decode("utf-8", "backslashreplace"), bytes(b or b"")) for p, d, b in rows]

    def close(self) -> None:
        try:
            with self._named():
                self.db.commit()
        finally:
            self.db.close()


def _newest(device: str, copies: dict[int, tuple[int, bytes | None]]) -> tuple[int, str, bytes]:
    """The newest snapshot of a device among the partitions holding one.  A tombstone deletes
    its own partition's copy only: the old partition's next owner forgetting an idle copy of a
    device that moved must not delete the copy it moved to."""
    _, partition, data = max((t, p, v) for p, (t, v) in copies.items() if v is not None)
    return partition, device, data


class ChangelogStore:
    """Snapshots on a compacted Kafka topic, partition for partition with the input topic.

    >>> from connectors.tansu import EmbeddedBroker
    >>> with EmbeddedBroker() as broker:
    ...     store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "sensors-state")
    ...     try:
    ...         store.ensure_partitions(2)  # creates the topic, as many partitions as the input topic
    ...         store.put(1, "pump-7", b"state of pump-7")
    ...         store.put(0, "fan-2", b"state of fan-2")
    ...         store.delete(0, "fan-2")  # a device gone for good: nothing of it is restored
    ...         store.flush()
    ...         print(store.load([0, 1]))
    ...     finally:
    ...         store.close()
    [(1, 'pump-7', b'state of pump-7')]
    """

    shared = True  # any instance of the group restores any partition

    RECORD_OVERHEAD = 4096  # key, headers and batch framing around a snapshot, generously
    # How long a put may wait for room in the producer's buffer (full only while the broker
    # is away or slow) before raising KafkaTimeoutError: well under metrics.healthy_after_s.
    MAX_BLOCK_MS = 10_000

    def __init__(self, cfg: KafkaConfig, topic: str, replication: int = -1,
                 max_snapshot_bytes: int = 32 * 2**20) -> None:
        self.cfg = cfg
        self.topic = topic
        self.replication = replication
        self.max_snapshot_bytes = max_snapshot_bytes
        self._partitions = 0  # the changelog's partitions, once known to be enough
        self.producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers.split(","),
                                      client_id=f"{cfg.client_id}-state", acks="all", linger_ms=5,
                                      compression_type=None, retries=2**31 - 1,
                                      max_request_size=max_snapshot_bytes + self.RECORD_OVERHEAD,
                                      max_block_ms=self.MAX_BLOCK_MS,
                                      delivery_timeout_ms=cfg.delivery_timeout_ms, **cfg.security())
        self._futures: list = []
        self._snapshots: list[tuple[str, int, int, object]] = []  # (device, partition, bytes, future)
        self._dropped: list[tuple[str, int]] = []                   # (device, bytes) refused as too large

    def ensure_partitions(self, needed: int, deadline: float | None = None) -> None:
        """Make sure the changelog has at least ``needed`` partitions (the input topic's):
        create it, or grow it, or refuse with what to do.  Snapshots of input partition p
        go to changelog partition p, so fewer would fail every write and restore.
        ``deadline`` (a monotonic time) bounds the broker's requests and waits."""
        if needed <= self._partitions:
            return
        # a quarter of the time left to each of the admin client's start and its (up to) three requests
        timeout_s = 30.0 if deadline is None else max(0.001, (deadline - time.monotonic()) / 4)
        admin = admin_client(self.cfg, int(timeout_s * 1000))
        try:
            have = self._partition_count(admin)
            if have is not None and not self._partitions:  # once: not again when it grows
                self._check_policy(admin)
            if have is None:
                try:
                    # the broker's limit would refuse a device of many channels (~9 KB each) otherwise
                    admin.create_topics([NewTopic(self.topic, needed, self.replication, topic_configs={
                        "cleanup.policy": "compact",
                        "max.message.bytes": str(self.max_snapshot_bytes + self.RECORD_OVERHEAD)})])
                    log.info("created changelog topic", extra={"fields": {"topic": self.topic, "partitions": needed}})
                    have = needed
                except TopicAlreadyExistsError:  # another instance was quicker
                    have = self._partition_count(admin, settle=True, deadline=deadline) or 0
                except (IncompatibleBrokerVersion, UnsupportedVersionError) as exc:
                    raise StoreError(f"creating changelog topic {self.topic!r}: the broker does not take "
                                     f"replication {self.replication} ({type(exc).__name__}); set "
                                     "state.changelog_replication to a number (brokers before Kafka 2.4)") from None
            if have < needed:
                try:
                    admin.create_partitions({self.topic: NewPartitions(needed)})
                    log.info("grew changelog topic", extra={"fields": {"topic": self.topic, "partitions": needed}})
                    have = needed
                except Exception as exc:  # noqa: BLE001  another instance may have grown it meanwhile
                    have = self._partition_count(admin, settle=True, deadline=deadline) or have
                    if have < needed:
                        raise StoreError(
                            f"changelog topic {self.topic!r} has {have} partition(s) but the input topic has "
                            f"{needed}, and growing it failed ({type(exc).__name__}): add partitions to it "
                            f"(kafka-topics.sh --alter --partitions {needed}), or delete it and let every device "
                            "re-warm") from None
        finally:
            admin.close()
        # now, while the broker is known to be up: the first put during an outage would
        # otherwise block on the topic's metadata for max_block_ms
        self._await_partitions(have, deadline)
        self._partitions = have  # after: a wait given up is done again when the restore is retried

    def _check_policy(self, admin) -> None:
        """Warn when a changelog that was already there is not compacted: with
        ``cleanup.policy=delete`` the snapshots of devices quiet for longer than its
        ``retention.ms`` are deleted (they re-warm after the next restart or move), and
        without compaction every restore reads every snapshot ever written.  A broker that
        will not say (an old one, or ACLs) is taken at its word that it is fine."""
        try:
            found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, self.topic)],
                                           config_filter="all")
            configs = found["topic"][self.topic]
            policy = configs["cleanup.policy"]["value"]
        except Exception as exc:  # noqa: BLE001  only a check: the store works without it
            log.debug("could not read the changelog topic's cleanup.policy",
                      extra={"fields": {"topic": self.topic, "error": repr(exc)}})
            return
        if policy is not None and "compact" not in policy.replace(" ", "").split(","):
            retention = (configs.get("retention.ms") or {}).get("value")
            log.warning("changelog topic is not compacted: snapshots of devices quiet for longer than its "
                        "retention are deleted, and every restore reads every snapshot written; set "
                        f"cleanup.policy=compact (kafka-configs.sh --alter --entity-type topics --entity-name "
                        f"{self.topic} --add-config cleanup.policy=compact)",
                        extra={"fields": {"topic": self.topic, "cleanup_policy": policy,
                                          "retention_ms": retention}})

    def _await_partitions(self, needed: int, deadline: float | None = None) -> None:
        """Wait until the producer knows ``needed`` partitions of the changelog.  kafka-python
        answers ``partitions_for`` from its metadata cache, refreshed every metadata_max_age_ms
        (5 minutes): after the topic grew, a put to a new partition would raise ValueError
        until then.  Raises KafkaTimeoutError (retriable: the restore is tried again) past
        ``MAX_BLOCK_MS`` (or ``deadline``, a monotonic time, if sooner)."""
        deadline = min(time.monotonic() + self.MAX_BLOCK_MS / 1000, deadline or math.inf)
        while len(self.producer.partitions_for(self.topic) or ()) < needed:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"changelog {self.topic}: the producer does not see its {needed} "
                                        f"partitions yet")
            try:  # no public call for this in kafka-python
                self.producer._metadata.request_update()
                self.producer._sender.wakeup()
            except AttributeError:
                pass
            time.sleep(0.1)

    def _partition_count(self, admin, settle: bool = False, deadline: float | None = None) -> int | None:
        """Partitions of the changelog (None: no such topic).  ``settle``: a topic another
        instance has just created may show its partitions only after a moment (waited for
        until ``deadline``, a monotonic time, at most)."""
        for attempt in range(10 if settle else 1):
            if attempt:
                if deadline is not None and time.monotonic() + 0.5 > deadline:
                    break
                time.sleep(0.5)
            topic = admin.describe_topics([self.topic])[0]
            if topic["error_code"] != UnknownTopicOrPartitionError.errno and topic["partitions"]:
                return len(topic["partitions"])
        return None

    def put(self, partition: int, device: str, data: bytes) -> None:
        """Queue a snapshot.  One larger than ``max_snapshot_bytes``, or than the topic
        takes (a changelog made before with the broker's default limit), is replaced by a
        tombstone, so that no older snapshot of the device on that partition is restored: see
        ``take_dropped``."""
        if len(data) > self.max_snapshot_bytes:
            self._drop(partition, device, len(data))
            return
        future = self.producer.send(self.topic, key=device.encode(), value=data, partition=partition)
        self._snapshots.append((device, partition, len(data), future))

    def delete(self, partition: int, device: str) -> None:
        """Queue a tombstone: compaction drops the device's snapshots, and a restore skips it."""
        self._futures.append(self.producer.send(self.topic, key=device.encode(), value=None, partition=partition))

    def _drop(self, partition: int, device: str, size: int) -> None:
        self.delete(partition, device)
        self._dropped.append((device, size))

    def take_dropped(self) -> list[tuple[str, int]]:
        """Devices whose snapshot was too large since the last call, with its size."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def flush(self, on_wait: Callable[[float], None] | None = None) -> None:
        """Block until every snapshot is acknowledged; raises if one was not (save for
        those the broker refused as too large: dropped, see ``put``)."""
        snapshots, self._snapshots = self._snapshots, []
        try:
            wait_flushed(self.producer, on_wait)
        except BaseException:  # checked at the next flush: a tombstone may wait on one of them
            self._snapshots = snapshots + self._snapshots
            raise
        for device, partition, size, future in snapshots:
            if future.failed():
                if not isinstance(future.exception, MessageSizeTooLargeError):
                    raise future.exception
                self._drop(partition, device, size)
        futures, self._futures = self._futures, []
        flush_acknowledged(self.producer, futures, on_wait)  # tombstones included

    def load(self, partitions: Iterable[int], on_progress: Callable[[], None] | None = None
             ) -> list[tuple[int, str, bytes]]:
        """The newest snapshot of every device on these partitions, read up to the current end.

        ``on_progress()`` is called after every fetch (the daemon's liveness); the read gives
        up only when it has not moved for ``delivery_timeout_ms``, however long it takes.
        """
        tps = [TopicPartition(self.topic, p) for p in sorted(set(partitions))]
        if not tps:
            return []
        consumer = KafkaConsumer(bootstrap_servers=self.cfg.bootstrap_servers.split(","), group_id=None,
                                 enable_auto_commit=False, client_id=f"{self.cfg.client_id}-restore",
                                 max_poll_records=5000,
                                 max_partition_fetch_bytes=self.max_snapshot_bytes + self.RECORD_OVERHEAD,
                                 **self.cfg.security())
        stall_s = self.cfg.delivery_timeout_ms / 1000
        try:
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            # device -> partition -> (record time, snapshot or None for a tombstone): a device whose
            # key moved when the input topic grew may have a snapshot on two partitions
            latest: dict[str, dict[int, tuple[int, bytes | None]]] = {}
            unkeyed = 0
            remaining = {tp for tp in tps if ends[tp] > consumer.position(tp)}
            moved = time.monotonic()
            while remaining:
                if time.monotonic() - moved > stall_s:  # retriable: the daemon pauses and tries again
                    raise KafkaTimeoutError(f"changelog {self.topic}: restore made no progress for {stall_s:g} s")
                for tp, records in consumer.poll(timeout_ms=500).items():
                    moved = time.monotonic()
                    for r in records:
                        if r.key is None:  # not written by Forewarn, and no device to give it to
                            unkeyed += 1
                            continue
                        # a key that is not UTF-8 (not written by Forewarn either) is still read: its
                        # record fails to decode and is counted, rather than failing every restore
                        device = r.key.decode("utf-8", "backslashreplace")
                        latest.setdefault(device, {})[tp.partition] = (r.timestamp, r.value)
                for tp in list(remaining):
                    if consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
                if on_progress is not None:
                    on_progress()
            if unkeyed:
                log.warning("changelog records without a key skipped",
                            extra={"fields": {"topic": self.topic, "records": unkeyed}})
            return [_newest(device, copies) for device, copies in latest.items()
                    if any(v is not None for _, v in copies.values())]
        finally:
            consumer.close()

    def close(self) -> None:
        close_producer(self.producer)
