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
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from connectors.kafka import close_producer, flush_acknowledged
from monitor.config import KafkaConfig

log = logging.getLogger("forewarn.state")


class LocalStore:
    """Snapshots in one SQLite file; ``flush`` commits the transaction.

    >>> store = LocalStore(":memory:")
    >>> store.put(0, "pump-7", b"state")
    >>> store.flush()
    >>> store.load([0]), store.load([1])
    ([(0, 'pump-7', b'state')], [])
    """

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level="DEFERRED", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (partition INTEGER, device TEXT PRIMARY KEY, data BLOB)")

    def put(self, partition: int, device: str, data: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (partition, device, data))

    def flush(self, on_wait=None) -> None:
        self.db.commit()

    def load(self, partitions: Iterable[int]) -> list[tuple[int, str, bytes]]:
        parts = sorted(set(partitions))
        if not parts:
            return []
        marks = ",".join("?" * len(parts))
        return [(p, d, bytes(b)) for p, d, b in
                self.db.execute(f"SELECT partition, device, data FROM state WHERE partition IN ({marks})", parts)]

    def close(self) -> None:
        self.db.commit()
        self.db.close()


class ChangelogStore:
    """Snapshots on a compacted Kafka topic, partition for partition with the input topic."""

    def __init__(self, cfg: KafkaConfig, topic: str, input_partitions: int) -> None:
        self.cfg = cfg
        self.topic = topic
        self._ensure_topic(input_partitions)
        self.producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers.split(","),
                                      client_id=f"{cfg.client_id}-state", acks="all", linger_ms=5,
                                      compression_type=None, retries=2**31 - 1,
                                      delivery_timeout_ms=cfg.delivery_timeout_ms, **cfg.security())
        self._futures: list = []

    def _ensure_topic(self, partitions: int) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.cfg.bootstrap_servers.split(","),
                                 client_id=f"{self.cfg.client_id}-admin", **self.cfg.security())
        try:
            admin.create_topics([NewTopic(self.topic, partitions, 1,
                                          topic_configs={"cleanup.policy": "compact"})])
            log.info("created changelog topic", extra={"fields": {"topic": self.topic, "partitions": partitions}})
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()

    def put(self, partition: int, device: str, data: bytes) -> None:
        self._futures.append(self.producer.send(self.topic, key=device.encode(), value=data, partition=partition))

    def flush(self, on_wait: Callable[[float], None] | None = None) -> None:
        """Block until every snapshot is acknowledged; raises if one was not."""
        futures, self._futures = self._futures, []
        flush_acknowledged(self.producer, futures, on_wait)

    def load(self, partitions: Iterable[int]) -> list[tuple[int, str, bytes]]:
        """The newest snapshot of every device on these partitions, read up to the current end."""
        tps = [TopicPartition(self.topic, p) for p in sorted(set(partitions))]
        if not tps:
            return []
        consumer = KafkaConsumer(bootstrap_servers=self.cfg.bootstrap_servers.split(","), group_id=None,
                                 enable_auto_commit=False, client_id=f"{self.cfg.client_id}-restore",
                                 max_poll_records=5000, **self.cfg.security())
        try:
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            latest: dict[str, tuple[int, bytes | None]] = {}
            remaining = {tp for tp in tps if ends[tp] > consumer.position(tp)}
            deadline = time.monotonic() + 300
            while remaining:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"changelog {self.topic}: restore did not reach the end in 300 s")
                for tp, records in consumer.poll(timeout_ms=500).items():
                    for r in records:
                        if r.key is not None:
                            latest[r.key.decode()] = (tp.partition, r.value)
                for tp in list(remaining):
                    if consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return [(p, d, v) for d, (p, v) in latest.items() if v is not None]
        finally:
            consumer.close()

    def close(self) -> None:
        close_producer(self.producer)
