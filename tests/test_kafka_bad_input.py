"""Property: whatever arrives on the topic, the daemon keeps going, rejects the bad with a
reason on the dead-letter topic and in the counter, and scores every good reading."""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from connectors.tansu import free_port
from monitor.config import Config
from monitor.daemon import Daemon
from tests.kafka_support import FAST_GROUP, publish, wait_for

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
text = st.text(max_size=20)

# Each strategy builds one message that is bad in exactly one way (so one dead letter each).
bad_messages = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: not b.strip().startswith(b"{")),
    st.builds(lambda v: json.dumps(v).encode(), st.one_of(st.lists(st.integers(), max_size=3), st.integers(), text)),
    st.builds(lambda v: json.dumps({"ts": 1, "value": v}).encode(), finite),                      # no device
    st.builds(lambda d: json.dumps({"device": d, "value": 1.0}).encode(), st.just("x")),          # no ts
    st.builds(lambda s: json.dumps({"device": "x", "ts": "not-a-time " + s, "value": 1}).encode(), text),
    st.builds(lambda s: json.dumps({"device": "x", "ts": 1, "value": "n" + s}).encode(), text),   # a string value
    # sizes no output record, snapshot or label may inherit; epoch milliseconds; integers past float range
    st.builds(lambda n: json.dumps({"device": "é" * n, "ts": 1, "value": 1}).encode(), st.integers(257, 50_000)),
    st.builds(lambda n: json.dumps({"device": "x", "ts": 1, "values": {"c" * n: 1.0}}).encode(),
              st.integers(257, 5_000)),
    st.builds(lambda n: json.dumps({"device": "x", "ts": 10 ** n, "value": 1}).encode(), st.integers(12, 400)),
    st.sampled_from([b'{"device": "x", "ts": 1, "value": NaN}', b'{"device": "x", "ts": 1, "value": Infinity}',
                     b'{"device": "x", "ts": 1, "value": 1e400}', b'{"device": "x", "ts": 1, "value": true}',
                     b'{"device": "x", "ts": 1, "value": null}', b'{"device": "x", "ts": 1, "value": 1e20}',
                     b'{"device": "x", "ts": 1, "values": {}}', b'{"device": 5.5, "ts": 1, "value": 1}',
                     b'{"device": "x", "ts": 1e999, "value": 1}', b'{"device": "x", "ts": 1,']),
)

_examples = itertools.count()


class _Harness:
    def __init__(self, broker, name: str = "hyp") -> None:
        """A daemon on topics and a group of its own: ``name``-sensors in, -scores and -dead out."""
        self.broker = broker
        sensors, scores, dead = f"{name}-sensors", f"{name}-scores", f"{name}-dead"
        broker.create_topics({sensors: 2, scores: 1, dead: 1})
        env = {**FAST_GROUP, "FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": sensors,
               "FOREWARN_KAFKA_GROUP_ID": name, "FOREWARN_KAFKA_SCORES_TOPIC": scores,
               "FOREWARN_KAFKA_DEAD_LETTER_TOPIC": dead, "FOREWARN_METRICS_HOST": "127.0.0.1",
               "FOREWARN_METRICS_PORT": str(free_port()), "FOREWARN_DETECTOR_WARMUP": "16"}
        self.registry = CollectorRegistry()
        self.daemon = Daemon(Config.load(environ=env), registry=self.registry)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        wait_for(self.daemon.ready, 60, what="daemon ready")
        self.published = 0
        self.readers = {}
        for topic in (scores, dead):
            c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
            c.assign([TopicPartition(topic, 0)])
            c.seek_to_beginning()
            self.readers[topic] = c

    def drain(self, topic: str, n: int) -> list[dict]:
        out: list[dict] = []

        def got_all():
            for msgs in self.readers[topic].poll(timeout_ms=200).values():
                out.extend(json.loads(m.value) for m in msgs)
            return len(out) >= n

        if n:
            wait_for(got_all, 60, what=f"{n} messages on {topic}")
        return out

    def bad_total(self) -> float:
        return sum(s.value for m in self.registry.collect() if m.name == "forewarn_bad_records"
                   for s in m.samples if s.name.endswith("_total"))

    def close(self) -> None:
        self.daemon.stop()
        self.thread.join(30)
        for c in self.readers.values():
            c.close()


def test_malformed_messages_never_stop_the_daemon(broker):
    harness = _Harness(broker)
    try:
        @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.one_of(st.tuples(st.just("good"), finite), st.tuples(st.just("bad"), bad_messages)),
                        min_size=1, max_size=25))
        def check(items):
            n = next(_examples)
            device = f"hyp-{n}"
            messages, good, bad = [], 0, 0
            for i, (kind, payload) in enumerate(items):
                if kind == "good":
                    messages.append((device.encode(), json.dumps({"device": device, "ts": i, "value": payload}).encode()))
                    good += 1
                else:
                    messages.append((device.encode(), payload))
                    bad += 1
            before = harness.bad_total()
            publish(broker.bootstrap, "hyp-sensors", messages)
            harness.published += len(messages)
            wait_for(lambda: harness.daemon.records >= harness.published, 60, what="records processed")
            assert harness.thread.is_alive()
            scores = harness.drain("hyp-scores", good)
            assert len(scores) == good and {s["device"] for s in scores} <= {device}
            assert sorted(s["ts"] for s in scores) == sorted(float(i) for i, (k, _) in enumerate(items) if k == "good")
            letters = harness.drain("hyp-dead", bad)
            assert len(letters) == bad
            assert all(letter["reason"] and letter["detail"] and letter["source"].startswith("hyp-sensors/")
                       for letter in letters)
            assert harness.bad_total() - before == bad

        check()
        assert harness.daemon.healthy()
    finally:
        harness.close()


def test_a_reading_from_a_clock_far_ahead_does_not_silence_its_device(broker):
    # accepted, it would put every later reading of the device out of order for two days
    harness = _Harness(broker, "clock")
    kafka_log, records = logging.getLogger("forewarn.kafka"), []
    handler = logging.Handler()
    handler.emit = records.append
    kafka_log.addHandler(handler)
    try:
        ahead = time.time() + 2 * 86400  # kafka.max_timestamp_ahead_s is one day by default
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        for ts in [0.0, 1.0, 2.0, ahead, 3.0, 4.0, 5.0]:
            # the skewed reading's record is stamped by the same clock: as if this instance's were behind
            producer.send("clock-sensors", key=b"skewed", value=json.dumps({"device": "skewed", "ts": ts,
                                                                            "value": 1.0}).encode(),
                          timestamp_ms=int(ahead * 1000) if ts == ahead else None)
        producer.flush()
        producer.close()
        scores = harness.drain("clock-scores", 6)
        assert sorted(s["ts"] for s in scores) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        (letter,) = harness.drain("clock-dead", 1)
        assert letter["reason"] == "bad_timestamp" and "kafka.max_timestamp_ahead_s" in letter["detail"]
        assert harness.bad_total() == 1
        (warning,) = [r for r in records if "further ahead of this instance's clock" in r.getMessage()]
        assert warning.fields["ahead_s"] > 86400
    finally:
        kafka_log.removeHandler(handler)
        harness.close()


def test_readings_compressed_by_their_producers_are_scored_and_outputs_compressed(broker):
    # Producers often compress (lz4, zstd): without the codecs kafka-python fails the poll, and the
    # daemon would exit at every restart.  The outputs here are compressed too.
    from kafka import KafkaProducer
    broker.create_topics({"zip-sensors": 1, "zip-scores": 1})
    codecs = ("gzip", "lz4", "snappy", "zstd")
    for codec in codecs:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec)
        for t in range(20):
            producer.send("zip-sensors", key=codec.encode(),
                          value=json.dumps({"device": codec, "ts": t, "value": float(t % 5)}).encode())
        producer.close()
    env = {**FAST_GROUP, "FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": "zip-sensors",
           "FOREWARN_KAFKA_GROUP_ID": "zip", "FOREWARN_KAFKA_SCORES_TOPIC": "zip-scores",
           "FOREWARN_KAFKA_COMPRESSION_TYPE": "zstd", "FOREWARN_METRICS_HOST": "127.0.0.1",
           "FOREWARN_METRICS_PORT": str(free_port()), "FOREWARN_DETECTOR_WARMUP": "16"}
    daemon = Daemon(Config.load(environ=env), registry=CollectorRegistry())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: daemon.records >= 80, 90, what="every reading processed")
    finally:
        daemon.stop()
        thread.join(30)
    assert daemon.pipeline.counts["scored"] == 4 * (20 - 16) and not daemon.pipeline.bad_counts
    reader = KafkaConsumer("zip-scores", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=3000)
    devices = sorted({json.loads(r.value)["device"] for r in reader})
    reader.close()
    assert devices == sorted(codecs)


def test_a_reading_the_pipeline_rejects_reaches_the_dead_letters_with_its_message(broker):
    # A duplicate or out-of-order timestamp is found past parsing: its dead letter named only the
    # source offset, which the input topic's retention may delete before anyone looks.
    broker.create_topics({"late-sensors": 1, "late-dead": 1})
    messages = [json.dumps({"device": "p1", "ts": ts, "value": 1.0}).encode() for ts in (1, 2, 2, 1, 3)]
    publish(broker.bootstrap, "late-sensors", [(b"p1", m) for m in messages])
    env = {**FAST_GROUP, "FOREWARN_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "FOREWARN_KAFKA_TOPIC": "late-sensors",
           "FOREWARN_KAFKA_GROUP_ID": "late", "FOREWARN_KAFKA_DEAD_LETTER_TOPIC": "late-dead",
           "FOREWARN_METRICS_HOST": "127.0.0.1", "FOREWARN_METRICS_PORT": str(free_port())}
    daemon = Daemon(Config.load(environ=env), registry=CollectorRegistry())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: daemon.records >= len(messages), 90, what="every record processed")
    finally:
        daemon.stop()
        thread.join(30)
    reader = KafkaConsumer("late-dead", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=3000)
    letters = [json.loads(r.value) for r in reader]
    reader.close()
    assert [(d["reason"], d["source"], d["raw"]) for d in letters] == [
        ("duplicate_timestamp", "late-sensors/0@2", messages[2].decode()),
        ("out_of_order_timestamp", "late-sensors/0@3", messages[3].decode())]


def test_a_tombstone_or_a_record_not_utf8_reaches_the_dead_letters_with_its_key(broker):
    # a tombstone has nothing but its key; bytes that are not UTF-8 are kept as escapes, not U+FFFD
    broker.create_topics({"keys-sensors": 2, "keys-scores": 1, "keys-dead": 1})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=4 * 2**20)
    producer.send("keys-sensors", key=b"k-tomb", value=None, partition=0)
    producer.send("keys-sensors", key=b"k-bin", value=b"\xff\xfe{", partition=0)
    # a key of a megabyte: as the letter's own key the producer refused it, and the daemon
    # stopped on the record at every restart
    producer.send("keys-sensors", key=b"h" * 1_100_000, value=b"not json", partition=1)
    for ts in range(10):  # a producer that does not key its readings: the device is on both partitions
        producer.send("keys-sensors", key=None, partition=ts % 2,
                      value=json.dumps({"device": "roam", "ts": ts, "value": 1.0}).encode())
    producer.flush()
    producer.close()
    harness = _Harness(broker, "keys")
    try:
        wait_for(lambda: harness.daemon.records >= 13, 60, what="every record processed")
        reader = KafkaConsumer("keys-dead", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                               consumer_timeout_ms=3000)
        records = [(r.key, json.loads(r.value)) for r in reader]
        reader.close()
        letters = dict(records)
        tomb, binary = letters[b"k-tomb"], letters[b"k-bin"]
        assert (tomb["reason"], tomb["raw"], tomb["key"]) == ("malformed", None, "k-tomb")
        assert "tombstone" in tomb["detail"]
        assert binary["raw"] == "\\xff\\xfe{" and binary["key"] == "k-bin"
        [(key, huge)] = [(k, letter) for k, letter in records if letter["source"] == "keys-sensors/1@0"]
        # unkeyed, the key in the letter cut, with its length
        assert (key, huge["reason"], huge["key"], huge["key_bytes"]) == (None, "malformed", "h" * 500, 1_100_000)
        moves = [s.value for m in harness.registry.collect() if m.name == "forewarn_device_partition_moves"
                 for s in m.samples if s.name.endswith("_total")]
        assert moves[0] >= 1  # on two partitions, in one batch or from one to the next
    finally:
        harness.close()


def test_a_device_on_two_partitions_in_one_poll_is_found(broker):
    """Every batch of an unkeyed device may end on the same partition: only the batch shows it."""
    from collections import namedtuple

    from connectors.kafka import KafkaSource
    from monitor.config import KafkaConfig
    Record = namedtuple("Record", "offset value timestamp key")
    source = KafkaSource(KafkaConfig(bootstrap_servers=broker.bootstrap, topic="split-sensors", group_id="split"))
    real = source.consumer

    def reading(ts):
        return Record(ts, json.dumps({"device": "roam", "ts": ts, "value": 1.0}).encode(), None, None)

    class OnePoll:  # what kafka-python hands over: records by partition
        def poll(self, timeout_ms, max_records):
            return {TopicPartition("split-sensors", 0): [reading(0), reading(2)],
                    TopicPartition("split-sensors", 1): [reading(1)]}
    source.consumer = OnePoll()
    try:
        batch = source.poll()
    finally:
        real.close()
    assert batch.partition_of == {"roam": 1} and batch.split == {"roam": 0}
