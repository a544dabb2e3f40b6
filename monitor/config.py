"""Daemon configuration: a TOML file, then ``FOREWARN_<SECTION>_<KEY>`` environment overrides.

Every setting has a default, a type and a one-line description, which ``forewarn
config --print`` and ``forewarn run --help`` show; unknown keys and wrong types
are errors at start, naming the key.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key.

    A misspelt environment override is one, not a setting silently ignored:

    >>> Config.load(environ={"FOREWARN_KAFKA_TOPICS": "x"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: unknown setting in the environment: FOREWARN_KAFKA_TOPICS (...)
    """


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


MIN_DELIVERY_TIMEOUT_MS = 30_005  # kafka-python's request_timeout_ms (30 s) + our linger_ms (5)
# the loop turns, and sees a stop, only between polls: a longer wait gains nothing fetch_max_wait_ms
# does not give, and would hold a SIGTERM past a pod's grace period
MAX_POLL_TIMEOUT_MS = 10_000
MAX_WARMUP = 16_384
MAX_ADAPT_STEPS = 1_000  # each a forward and backward pass over every warming stream's window
MAX_INT32 = 2**31 - 1  # the Kafka protocol's field for timeouts and intervals
MAX_INT16 = 2**15 - 1  # its field for a topic's replication factor
MAX_SNAPSHOT_BYTES = 2**30  # a snapshot's fetch size, with the record's overhead, is an int32 field
STALLED_CHECKPOINTS_ALERT_S = 900.0  # ForewarnCheckpointsStalled: no checkpoint in 15 minutes


@dataclass
class KafkaConfig:
    """The ``[kafka]`` section: broker, topics, consumer tuning and security.

    >>> kafka = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_plain_username="mon")
    >>> kafka.security()  # unset options are left out, for kafka-python's own defaults
    {'security_protocol': 'SASL_SSL', 'sasl_mechanism': 'PLAIN', 'sasl_plain_username': 'mon'}
    >>> KafkaConfig(heartbeat_interval_ms=20000).validate()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: kafka.heartbeat_interval_ms (20000) must be below kafka.session_timeout_ms (10000); ...
    """

    bootstrap_servers: str = _setting("localhost:9092", "comma-separated host:port list")
    topic: str = _setting("sensors", "topic the readings arrive on (keyed by device id)")
    group_id: str = _setting("forewarn", "consumer group; instances in one group share the devices")
    client_id: str = _setting("forewarn", "client id shown to the broker")
    anomalies_topic: str = _setting("", "topic for anomaly events, keyed by device ('' = none)")
    dead_letter_topic: str = _setting("", "topic for bad records with their reason ('' = none)")
    scores_topic: str = _setting("", "topic for every reading's score, keyed by device ('' = none)")
    compression_type: str = _setting("", "compression of the output topics: gzip, lz4, snappy or zstd ('' = none; "
                                         "the input may use any of them)")
    auto_offset_reset: str = _setting("earliest", "where a group without committed offsets starts: earliest|latest")
    producer_partitioner: str = _setting("auto", "how producers place device keys, for moving device state when the "
                                                 "topic grows: murmur2 (Java, kafka-python), crc32 (librdkafka), "
                                                 "auto (told by where the devices are) or none (they re-warm)")
    max_timestamp_ahead_s: float = _setting(86400.0, "readings stamped later than this instance's clock plus this "
                                                     "are bad records (bad_timestamp): one reading from a clock "
                                                     "far ahead would put its device's later readings out of "
                                                     "order until then; keep this clock synchronized "
                                                     "(0 = no limit)")
    max_poll_records: int = _setting(5000, "records per poll, i.e. the largest pipeline batch")
    poll_timeout_ms: int = _setting(500, "how long one poll waits for records; a stop waits for it too "
                                         f"(at most {MAX_POLL_TIMEOUT_MS:,}, and under half of "
                                         "metrics.healthy_after_s)")
    fetch_max_wait_ms: int = _setting(100, "how long the broker may hold a fetch for more data (latency vs. batching)")
    max_poll_interval_ms: int = _setting(300000, "rebalance timeout; a group join waits this long (keep small in tests)")
    session_timeout_ms: int = _setting(10000, "consumer session timeout")
    heartbeat_interval_ms: int = _setting(3000, "consumer heartbeat interval")
    delivery_timeout_ms: int = _setting(120000, "how long outputs and state may wait for an unreachable broker; "
                                                "past it the daemon exits uncommitted and a restart replays")
    security_protocol: str = _setting("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: str = _setting("", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI or AWS_MSK_IAM ('' = none)")
    sasl_plain_username: str = _setting("", "SASL user name")
    sasl_plain_password: str = _setting("", "SASL password (prefer the environment variable)")
    ssl_cafile: str = _setting("", "CA bundle for SSL")
    ssl_certfile: str = _setting("", "client certificate for SSL")
    ssl_keyfile: str = _setting("", "client key for SSL")
    ssl_password: str = _setting("", "password of an encrypted SSL client key (prefer the environment variable)")

    def validate(self) -> None:
        servers = [s.strip() for s in self.bootstrap_servers.split(",")]
        if not any(servers) or not all(servers):
            raise ConfigError(f"kafka.bootstrap_servers must be a comma-separated host:port list with no empty "
                              f"entry, got {self.bootstrap_servers!r}")
        for server in servers:
            _check_server(server)
        if not self.topic:
            raise ConfigError("kafka.topic must not be empty")
        if not self.group_id.strip():  # Kafka refuses an empty group id; the changelog would be "-state"
            raise ConfigError("kafka.group_id must not be empty")
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError(f"kafka.auto_offset_reset must be earliest or latest, got {self.auto_offset_reset!r}")
        if self.producer_partitioner not in ("auto", "murmur2", "crc32", "none"):
            raise ConfigError("kafka.producer_partitioner must be auto, murmur2, crc32 or none, got "
                              f"{self.producer_partitioner!r}")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ConfigError(f"kafka.security_protocol: unknown {self.security_protocol!r}")
        if self.sasl_mechanism == "OAUTHBEARER":
            raise ConfigError("kafka.sasl_mechanism: OAUTHBEARER needs a token-provider object, which the "
                              "configuration cannot give")
        if self.compression_type not in COMPRESSION_TYPES:
            raise ConfigError(f"kafka.compression_type: unknown {self.compression_type!r} "
                              f"(one of {', '.join(c for c in COMPRESSION_TYPES if c)}, or '' for none)")
        if self.sasl_mechanism not in SASL_MECHANISMS:  # kafka-python would fail to bootstrap, saying less
            raise ConfigError(f"kafka.sasl_mechanism: unknown {self.sasl_mechanism!r} "
                              f"(one of {', '.join(m for m in SASL_MECHANISMS if m)}, or '' for none)")
        self._validate_security()
        for name in ("topic", "anomalies_topic", "dead_letter_topic", "scores_topic"):
            check_topic_name(f"kafka.{name}", getattr(self, name))
        # an output read back as input loops: each dead letter is read as a new bad record, forever
        for name in ("anomalies_topic", "dead_letter_topic", "scores_topic"):
            if getattr(self, name) == self.topic:
                raise ConfigError(f"kafka.{name} is the input topic ({self.topic!r}): outputs would be read "
                                  "back as readings")
        for name in ("max_poll_records", "poll_timeout_ms", "fetch_max_wait_ms", "max_poll_interval_ms", "session_timeout_ms",
                     "heartbeat_interval_ms"):
            if not 1 <= getattr(self, name) <= MAX_INT32:  # kafka-python would fail to encode a request
                raise ConfigError(f"kafka.{name} must be in 1..{MAX_INT32}, got {getattr(self, name)}")
        if not 0 <= self.max_timestamp_ahead_s < math.inf:  # NaN too
            raise ConfigError("kafka.max_timestamp_ahead_s must be >= 0 seconds (0 = no limit), got "
                              f"{self.max_timestamp_ahead_s!r}")
        if self.poll_timeout_ms > MAX_POLL_TIMEOUT_MS:
            raise ConfigError(f"kafka.poll_timeout_ms ({self.poll_timeout_ms}) must be <= {MAX_POLL_TIMEOUT_MS}: "
                              "a stop waits for the poll under way")
        if self.fetch_max_wait_ms >= KAFKA_REQUEST_TIMEOUT_MS:  # kafka-python refuses it later, less clearly
            raise ConfigError(f"kafka.fetch_max_wait_ms ({self.fetch_max_wait_ms}) must be below the consumer's "
                              f"request timeout ({KAFKA_REQUEST_TIMEOUT_MS} ms)")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:  # kafka-python refuses it later, less clearly
            raise ConfigError(f"kafka.heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                              f"kafka.session_timeout_ms ({self.session_timeout_ms}); a third of it is usual")
        if not MIN_DELIVERY_TIMEOUT_MS <= self.delivery_timeout_ms <= MAX_INT32:  # kafka-python refuses less
            raise ConfigError(f"kafka.delivery_timeout_ms must be in {MIN_DELIVERY_TIMEOUT_MS}..{MAX_INT32} "
                              f"(at least the producers' request timeout plus linger), got {self.delivery_timeout_ms}")

    def _validate_security(self) -> None:
        """What kafka-python would otherwise find only when it connects, after the daemon has
        started, and report in its own log rather than as a configuration error.

        >>> KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN").validate()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        monitor.config.ConfigError: kafka.sasl_mechanism PLAIN needs kafka.sasl_plain_username and ...
        """
        protocol, mechanism = self.security_protocol, self.sasl_mechanism
        sasl = protocol.startswith("SASL_")
        if sasl and not mechanism:
            raise ConfigError(f"kafka.security_protocol {protocol} needs kafka.sasl_mechanism "
                              f"({', '.join(m for m in SASL_MECHANISMS if m)})")
        if mechanism and not sasl:
            raise ConfigError(f"kafka.sasl_mechanism {mechanism} is used only with kafka.security_protocol "
                              f"SASL_PLAINTEXT or SASL_SSL, not {protocol}: it would be ignored")
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
                self.sasl_plain_username and self.sasl_plain_password):
            raise ConfigError(f"kafka.sasl_mechanism {mechanism} needs kafka.sasl_plain_username and "
                              f"kafka.sasl_plain_password (FOREWARN_KAFKA_SASL_PLAIN_PASSWORD for the password)")
        needs = {"GSSAPI": "gssapi", "AWS_MSK_IAM": "botocore"}.get(mechanism)
        if needs and importlib.util.find_spec(needs) is None:
            raise ConfigError(f"kafka.sasl_mechanism {mechanism} needs the {needs} package: pip install {needs}")
        if mechanism == "AWS_MSK_IAM" and protocol != "SASL_SSL":
            raise ConfigError("kafka.sasl_mechanism AWS_MSK_IAM needs kafka.security_protocol SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and protocol not in ("SSL", "SASL_SSL"):
                raise ConfigError(f"kafka.{name} is used only with kafka.security_protocol SSL or SASL_SSL, "
                                  f"not {protocol}: it would be ignored")
            if path and not Path(path).is_file():
                raise ConfigError(f"kafka.{name}: no such file {path!r}")
        if self.ssl_password and not (self.ssl_keyfile or self.ssl_certfile):  # the key may be in the certificate file
            raise ConfigError("kafka.ssl_password unlocks the client key of kafka.ssl_keyfile or kafka.ssl_certfile, "
                              "and neither is set: it would be ignored")

    def security(self) -> dict[str, Any]:
        """The security settings kafka-python takes, passed through as given."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        for name in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile",
                     "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out


@dataclass
class DetectorConfig:
    """The ``[detector]`` section: warm-up, scoring, the caps and the optional re-learning.

    >>> DetectorConfig().scoring_config().alarm_level  # threshold 0.999 as a surprise
    3.0
    >>> DetectorConfig(alarm_surprise=64.0).scoring_config().alarm_level
    64.0
    >>> DetectorConfig(threshold=0.99, alarm_surprise=5.0).validate()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: detector.threshold (0.99) and detector.alarm_surprise (5.0) both set the alarm ...
    """

    init: str = _setting("", "initialization checkpoint ('' = the one shipped in the package)")
    warmup: int = _setting(256, "readings a stream buffers before it is adapted and scored (16 to 16,384; "
                                "adapting a stream takes memory in proportion, ~2 MB at 256)")
    adapt_steps: int = _setting(-1, "inner steps of fast adaptation (-1 = the initialization's)")
    threshold: float = _setting(0.999, "score at or above which a reading is an anomaly")
    alarm_surprise: float = _setting(0.0, "the same threshold as a surprise, -log10 of the tail probability "
                                          "(0 = the threshold's: 0.999 is 3); needed past ~16, where scores round "
                                          "to 1.0 (NAB's is 64 with the NAB options, see docs/evaluation.md); set, it "
                                          "replaces detector.threshold")
    calibration_fading: float = _setting(0.0, "stage-2 score calibration across streams, one alarm per incident "
                                              "(0 = off; 0.002 was best on NAB, see docs/evaluation.md)")
    novelty_unit: float = _setting(0.0, "range novelty: a value beyond the range of the stream's last novelty_window "
                                        "values by this share of it scores surprise 1 "
                                        "(0 = off; see docs/evaluation.md)")
    novelty_window: int = _setting(0, "values whose range novelty is judged against, in 16 blocks "
                                      "(0 = all so far, else >= 16)")
    smoothing_span: int = _setting(0, "the forecast's surprise averaged over about this many readings, "
                                      "exponentially weighted (0 = off; 9 was best on SMD, see docs/evaluation.md)")
    peak_window: int = _setting(0, "a device's surprise counts only when it tops all of about its last "
                                   "peak_window readings' (4 blocks), else 0: one alarm per rising incident, not "
                                   "one per reading (0 = off, else >= 4; 48 chosen on NAB, see docs/evaluation.md)")
    channel_combination: str = _setting("joint", "a device's score from its channels: 'joint', how unlikely they "
                                                 "are together (Fisher's method) or that one is so surprised "
                                                 "(Bonferroni's), whichever is stronger, or 'max', its worst "
                                                 "channel's (see README)")
    max_streams: int = _setting(1_000_000, "cap on streams held (~24 KB each when live); readings of new "
                                           "streams past it are bad records (stream_limit)")
    max_channels: int = _setting(1024, "cap on one device's channels; readings of its new channels past it are "
                                       "bad records (stream_limit)")
    adapt_batch: int = _setting(512, "streams adapted in one batched call (~2 MB each while adapting, at warmup 256)")
    drift_threshold: float = _setting(0.0, "Page-Hinkley threshold on a live stream's |residual| that re-adapts it "
                                           "on its next drift_window readings (0 = off)")
    drift_window: int = _setting(256, "readings a drifted stream is re-adapted on")
    online_every: int = _setting(0, "readings between a live stream's online weight updates, which leave out "
                                    "readings it flagged (0 = off)")
    online_window: int = _setting(256, "newest readings an online update learns from (5 bytes each per stream)")
    online_steps: int = _setting(1, "gradient steps of one online update")
    online_lr_scale: float = _setting(0.5, "online step size, as a multiple of the adaptation's")
    idle_timeout_s: float = _setting(7 * 86400.0, "a device without a record for this long while others on "
                                                  "the instance kept arriving is forgotten: streams, score "
                                                  "series, saved state; it warms afresh if it returns "
                                                  "(0 = never; the daemon only)")
    channel_idle_timeout_s: float = _setting(7 * 86400.0, "a channel a device has sent nothing on for this long "
                                                          "(its own timestamps) while it kept sending others is "
                                                          "forgotten, stream and saved state, so that renamed "
                                                          "channels do not fill max_channels; a channel reported "
                                                          "less often than this never goes live (0 = never; the "
                                                          "daemon only)")

    def scoring_config(self):
        """The ``ScoringConfig`` these settings describe."""
        from monitor.scoring import ScoringConfig
        return ScoringConfig(threshold=self.threshold, alarm_surprise=self.alarm_surprise,
                             calibration_fading=self.calibration_fading,
                             novelty_unit=self.novelty_unit, novelty_window=self.novelty_window,
                             smoothing_span=self.smoothing_span, peak_window=self.peak_window,
                             channel_combination=self.channel_combination)

    def pipeline_config(self, adapt):
        """The ``PipelineConfig`` these settings describe, with ``adapt`` (the initialization's
        ``AdaptConfig``, its steps replaced where ``adapt_steps`` >= 0) for fast adaptation: the
        one place that maps detector settings onto the pipeline, for the daemon and ``replay``
        alike."""
        from monitor.pipeline import PipelineConfig  # here: reading a configuration needs no torch
        if self.adapt_steps >= 0:
            adapt = replace(adapt, steps=self.adapt_steps)
        return PipelineConfig(
            warmup=self.warmup, adapt=adapt, scoring=self.scoring_config(),
            max_streams=self.max_streams, max_channels=self.max_channels, adapt_batch=self.adapt_batch,
            drift_threshold=self.drift_threshold, drift_window=self.drift_window, online_every=self.online_every,
            online_window=self.online_window, online_steps=self.online_steps, online_lr_scale=self.online_lr_scale,
            channel_idle_timeout_s=self.channel_idle_timeout_s)

    def validate(self) -> None:
        try:  # the scoring settings' own checks (their names are the same here)
            self.scoring_config()
        except ValueError as exc:
            raise ConfigError(f"detector.{exc}") from None
        if self.alarm_surprise and self.threshold != DetectorConfig.threshold:
            raise ConfigError(f"detector.threshold ({self.threshold}) and detector.alarm_surprise "
                              f"({self.alarm_surprise}) both set the alarm level: set one of them")
        # PipelineConfig checks these too, but building one imports torch, which reading a
        # configuration (forewarn config --print, the daemon's start-up errors) should not need
        if not 16 <= self.warmup <= MAX_WARMUP:  # past it, one slice of adapt_batch streams would take many GB
            raise ConfigError(f"detector.warmup must be in 16..{MAX_WARMUP}, got {self.warmup}")
        # drift and online windows are adapted on as warm-up windows are, at the same memory cost
        _check_bounds("detector", self, drift_threshold=(0, math.inf), drift_window=(16, MAX_WARMUP),
                      online_every=(0, MAX_INT32), online_window=(16, MAX_WARMUP), online_steps=(1, MAX_ADAPT_STEPS),
                      idle_timeout_s=(0, math.inf), channel_idle_timeout_s=(0, math.inf),
                      max_streams=(1, math.inf), max_channels=(1, math.inf),
                      adapt_batch=(1, math.inf), adapt_steps=(-1, MAX_ADAPT_STEPS))
        if self.online_lr_scale <= 0:
            raise ConfigError(f"detector.online_lr_scale must be > 0, got {self.online_lr_scale}")


@dataclass
class MetricsConfig:
    """The ``[metrics]`` section: where /metrics, /healthz and /readyz are served.

    >>> MetricsConfig(port=0).validate() is None  # 0 asks for any free port
    True
    >>> MetricsConfig(port=70000).validate()
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: metrics.port must be in 0..65535
    """

    host: str = _setting("0.0.0.0", "address of the /metrics, /healthz and /readyz server")
    port: int = _setting(9108, "port of that server (0 = any free port)")
    max_devices: int = _setting(10_000, "devices exported with their own score series; the rest are counted")
    healthy_after_s: float = _setting(60.0, "/healthz fails when the loop has not turned for this long")

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError("metrics.port must be in 0..65535")
        _check_bounds("metrics", self, max_devices=(0, math.inf))
        if self.healthy_after_s <= 0:
            raise ConfigError(f"metrics.healthy_after_s must be > 0, got {self.healthy_after_s}")


@dataclass
class StateConfig:
    """The ``[state]`` section: where device state is checkpointed, and how often.

    >>> StateConfig(store="local", local_path="plant-1.db").validate() is None
    True
    >>> StateConfig(store="redis").validate()
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: state.store must be changelog, local or none, got 'redis'
    """

    store: str = _setting("changelog", "where device state is checkpointed: changelog (Kafka), local (file) or none")
    changelog_topic: str = _setting("", "compacted state topic ('' = <group_id>-state)")
    changelog_replication: int = _setting(-1, "replication factor the changelog topic is created with "
                                              "(-1 = the broker's default.replication.factor; at most 32767)")
    max_snapshot_bytes: int = _setting(32 * 2**20, "largest device snapshot written to the changelog, 64 KiB..1 GiB (~9 KB "
                                                   "per channel); the topic is created to take it, and a "
                                                   "larger one, or one the topic refuses, is dropped (that "
                                                   "device re-warms after a restart)")
    local_path: str = _setting("forewarn-state.db", "state file of the local store")
    checkpoint_interval_s: float = _setting(30.0, "seconds between checkpoints (state written, then offsets "
                                                  "committed; 0 = after every batch; 900 or more makes the "
                                                  "ForewarnCheckpointsStalled alert fire); ~0.15 ms per "
                                                  "changed device each time")
    checkpoint_batch: int = _setting(1000, "device snapshots written per loop turn while a checkpoint is under way "
                                           "(~0.15 ms each; bounds the pause a checkpoint adds to scoring)")

    def validate(self) -> None:
        if self.store not in ("changelog", "local", "none"):
            raise ConfigError(f"state.store must be changelog, local or none, got {self.store!r}")
        _check_bounds("state", self, checkpoint_interval_s=(0, math.inf), checkpoint_batch=(1, math.inf))
        if self.changelog_replication == 0 or not -1 <= self.changelog_replication <= MAX_INT16:
            raise ConfigError(f"state.changelog_replication must be -1 (the broker's default) or in 1..{MAX_INT16} "
                              f"(a 16-bit field in Kafka's protocol), got {self.changelog_replication}")
        _check_bounds("state", self, max_snapshot_bytes=(2**16, MAX_SNAPSHOT_BYTES))
        if self.store == "local" and (not self.local_path.strip() or self.local_path.strip() == ":memory:"):
            # SQLite takes both, for a database gone at exit: state that would silently not last
            raise ConfigError(f"state.local_path must name a file for state.store = local, got {self.local_path!r}")
        if self.changelog_topic:
            check_topic_name("state.changelog_topic", self.changelog_topic)


@dataclass
class LogConfig:
    """The ``[log]`` section: level and line format of the daemon's log.

    >>> LogConfig(level="debug", format="text").validate() is None  # the level in any case
    True
    >>> LogConfig(level="verbose").validate()
    Traceback (most recent call last):
    ...
    monitor.config.ConfigError: log.level: unknown level 'verbose'
    """

    level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    format: str = _setting("json", "json (one object per line) or text")

    def validate(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log.level: unknown level {self.level!r}")
        if self.format not in ("json", "text"):
            raise ConfigError("log.format must be json or text")


@dataclass
class Config:
    """Every section of the daemon's configuration; ``load`` it, then read ``cfg.<section>.<key>``.

    >>> cfg = Config.load(environ={"FOREWARN_STATE_STORE": "local", "FOREWARN_DETECTOR_THRESHOLD": "0.99"})
    >>> cfg.state.store, cfg.detector.threshold, cfg.kafka.topic  # the rest keep their defaults
    ('local', 0.99, 'sensors')
    >>> cfg.describe().splitlines()[1]  # each setting documented, with its environment variable
    '# comma-separated host:port list (env FOREWARN_KAFKA_BOOTSTRAP_SERVERS)'
    """

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def changelog_topic(self) -> str:
        """The topic device state is checkpointed to: ``state.changelog_topic``, by default
        the consumer group's id with ``-state``, so that each group keeps its own."""
        return self.state.changelog_topic or f"{self.kafka.group_id}-state"

    def validate(self) -> "Config":
        for section in (self.kafka, self.detector, self.metrics, self.state, self.log):
            section.validate()
        if self.kafka.poll_timeout_ms >= self.metrics.healthy_after_s * 1000 / 2:
            # an idle topic's loop turns once per poll: /healthz would fail between turns
            raise ConfigError(f"kafka.poll_timeout_ms ({self.kafka.poll_timeout_ms}) must be under half of "
                              f"metrics.healthy_after_s ({self.metrics.healthy_after_s:g} s), or /healthz fails "
                              "on an idle topic while it waits")
        if self.state.store == "changelog":
            changelog = self.changelog_topic()
            if not self.state.changelog_topic:  # a legal group id may still make an illegal topic name
                check_topic_name("state.changelog_topic (by default kafka.group_id + '-state'; set it to a "
                                 "legal name)", changelog)
            taken = {self.kafka.topic: "kafka.topic", self.kafka.anomalies_topic: "kafka.anomalies_topic",
                     self.kafka.dead_letter_topic: "kafka.dead_letter_topic", self.kafka.scores_topic: "kafka.scores_topic"}
            if changelog in taken:
                raise ConfigError(f"the state changelog topic {changelog!r} is also {taken[changelog]}: set "
                                  "state.changelog_topic to a topic of its own")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict[str, str] | None = None) -> "Config":
        """Defaults, then the TOML file, then the environment.

        >>> cfg = Config.load(environ={"FOREWARN_KAFKA_TOPIC": "plant-1", "FOREWARN_DETECTOR_WARMUP": "128"})
        >>> cfg.kafka.topic, cfg.detector.warmup
        ('plant-1', 128)
        >>> Config.load(environ={"FOREWARN_DETECTOR_WARMUP": "many"})
        Traceback (most recent call last):
        ...
        monitor.config.ConfigError: FOREWARN_DETECTOR_WARMUP: expected an integer, got 'many'
        """
        cfg = cls()
        if path is not None and not str(path).strip():  # "$CONFIG" unset: not the current folder, not no file
            raise ConfigError("an empty configuration file name")
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such configuration file") from None
            except IsADirectoryError:
                raise ConfigError(f"{path}: is a directory, not a configuration file") from None
            except PermissionError:
                raise ConfigError(f"{path}: the configuration file cannot be read (permission denied)") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: not UTF-8 text, as TOML must be ({exc.reason} at byte {exc.start})") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML ({exc})") from None
            for section_name, values in data.items():
                if not isinstance(values, dict):
                    home = [s for s in SECTIONS if section_name in {f.name for f in fields(getattr(cfg, s))}]
                    raise ConfigError(f"{path}: {section_name} = ... at the top level: settings go in their "
                                      "section" + (f", here under [{home[0]}]" if len(home) == 1 else
                                                   f" ({', '.join(SECTIONS)})"))
                if section_name not in SECTIONS:
                    raise ConfigError(f"{path}: unknown section [{section_name}] (sections: {', '.join(SECTIONS)})")
                section = getattr(cfg, section_name)
                for key, value in values.items():
                    _assign(section, section_name, key, value, f"{path}: {section_name}.{key}")
        env = os.environ if environ is None else environ
        known = set()
        for section_name in SECTIONS:
            section = getattr(cfg, section_name)
            for f in fields(section):
                var = f"FOREWARN_{section_name.upper()}_{f.name.upper()}"
                known.add(var)
                if var in env:
                    _assign(section, section_name, f.name, _from_text(env[var], f.type, var), var)
        # a misspelt override would otherwise be ignored in silence, like an unknown key in the file
        prefixes = tuple(f"FOREWARN_{name.upper()}_" for name in SECTIONS)
        unknown = sorted(v for v in env if (v.startswith(prefixes) and v not in known) or _misspelt_section(v, known)
                         or _meant(v, known))
        if unknown:
            meant = [f"{m} (not {v})" for v in unknown  # a service link's address is no misspelling
                     if not env[v].startswith(("tcp://", "udp://")) and (m := _suggestion(v, known))]
            raise ConfigError(f"unknown setting in the environment: {', '.join(unknown)} "
                              + (f"(did you mean {'; '.join(meant)}? " if meant else "(")
                              + "`forewarn config --print` lists every setting and its variable)"
                              + _service_link_hint({v: env[v] for v in unknown}))
        return cfg.validate()

    def describe(self) -> str:
        """Every setting with its current value, as TOML, each with its help as a comment."""
        lines = []
        for section_name in SECTIONS:
            section = getattr(self, section_name)
            lines.append(f"[{section_name}]")
            for f in fields(section):
                value = getattr(section, f.name)
                lines.append(f"# {f.metadata['help']} (env FOREWARN_{section_name.upper()}_{f.name.upper()})")
                if "password" in f.name and value:
                    # commented out: a file saved from this must not hold a stand-in sent as the password
                    lines.append(f"# {f.name} = (set; not shown)")
                else:
                    lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


SECTIONS = ("kafka", "detector", "metrics", "state", "log")
# kafka-python's mechanisms that these settings can drive: a user name and a password, or credentials
# from the environment (GSSAPI: the Kerberos ticket cache; AWS_MSK_IAM: the AWS credential chain).
# OAUTHBEARER needs a token-provider object, which a configuration file cannot give.
SASL_MECHANISMS = ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "AWS_MSK_IAM")
COMPRESSION_TYPES = ("", "gzip", "lz4", "snappy", "zstd")  # kafka-python's, with their codecs installed
KAFKA_REQUEST_TIMEOUT_MS = 30_000  # kafka-python's consumer default, which Forewarn keeps (tested)
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # 1073741824, not 1.07374e+09


def _check_bounds(section: str, settings, **bounds: tuple[float, float]) -> None:
    """Each named setting within its (low, high), both included; the first one outside is named."""
    for name, (low, high) in bounds.items():
        value = getattr(settings, name)
        if not low <= value <= high:
            limit = f">= {low:g}" if high == math.inf else f"in {_bound(low)}..{_bound(high)}"
            raise ConfigError(f"{section}.{name} must be {limit}, got {value}")


def _check_server(server: str) -> None:
    """One ``host[:port]`` of ``kafka.bootstrap_servers``, read as kafka-python reads it (an
    IPv6 address in brackets when a port follows), but refused now rather than when the daemon
    connects, with the setting named."""
    from kafka.cluster import get_ip_port_afi
    address = re.sub("^.*://", "", server)  # kafka-python drops a PROTOCOL:// prefix, as Java's client does
    try:
        host, port, _ = get_ip_port_afi(address)
    except ValueError:
        host, port = "", 0
    if not host or not 1 <= port <= 65535 or not (_HOST_NAME.fullmatch(host) or _is_ip(host)):
        raise ConfigError(f"kafka.bootstrap_servers: {server!r} is not host:port with a port in 1..65535 and "
                          "a host name of A-Z a-z 0-9 . _ - or an IP address (an IPv6 address with a port goes in "
                          "brackets: [::1]:9092; a PROTOCOL:// prefix is dropped, as kafka-python drops it)")


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")  # underscores too: common in container networks' names


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_topic_name(setting: str, name: str) -> None:
    """Kafka's rule for topic names ('' = no such output, allowed here)."""
    if name and (not _TOPIC_NAME.fullmatch(name) or name in (".", "..")):
        raise ConfigError(f"{setting}: {name!r} is not a legal Kafka topic name (up to 249 of the "
                          "characters A-Z a-z 0-9 . _ -)")


def _misspelt_section(var: str, known: set[str]) -> bool:
    """``FOREWARN_METRIC_PORT`` for ``FOREWARN_METRICS_PORT``: a variable whose first word is
    close to a section's name and which, with that name instead, is a ``known`` setting's.
    Other FOREWARN_ variables are left alone: Kubernetes sets FOREWARN_SERVICE_HOST,
    FOREWARN_PORT_... for a Service named forewarn."""
    if not var.startswith("FOREWARN_"):
        return False
    head, _, rest = var[len("FOREWARN_"):].partition("_")
    if head.lower() in SECTIONS or not rest:
        return False
    return any(f"FOREWARN_{name.upper()}_{rest.upper()}" in known
               for name in difflib.get_close_matches(head.lower(), SECTIONS, n=1, cutoff=0.75))
# what Kubernetes sets for a Service named forewarn(-...): FOREWARN_SERVICE_HOST, FOREWARN_PORT,
# FOREWARN_PORT_9108_TCP_ADDR, ...; never a setting, whatever its name resembles
_SERVICE_LINK = re.compile(r"FOREWARN(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)"
                           r"(_ADDR|_PORT|_PROTO)?)?)")
# of those, the ones no setting's misspelling could look like (FOREWARN_METRIC_PORT could)
_SERVICE_ADDRESS = re.compile(r"FOREWARN(_[A-Z0-9_]+)?_SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)")


def _meant(var: str, known: set[str]) -> str | None:
    """The setting's variable a ``FOREWARN_`` variable spells without its section or without an
    underscore (``FOREWARN_BOOTSTRAP_SERVERS``, ``FOREWARN_LOGLEVEL``), if there is one.

    >>> known = {"FOREWARN_KAFKA_BOOTSTRAP_SERVERS", "FOREWARN_LOG_LEVEL", "FOREWARN_METRICS_PORT"}
    >>> _meant("FOREWARN_BOOTSTRAP_SERVERS", known), _meant("FOREWARN_LOGLEVEL", known)
    ('FOREWARN_KAFKA_BOOTSTRAP_SERVERS', 'FOREWARN_LOG_LEVEL')
    >>> _meant("FOREWARN_PORT", known), _meant("FOREWARN_DATA", known)  # a service link; not a setting
    (None, None)
    """
    if not var.startswith("FOREWARN_") or var in known or _SERVICE_LINK.fullmatch(var):
        return None
    spelt = var[len("FOREWARN_"):].replace("_", "").lower()
    by_full, by_key = {}, {}
    for name in known:
        section, _, key = name[len("FOREWARN_"):].partition("_")
        by_full[(section + key).replace("_", "").lower()] = name
        by_key.setdefault(key.replace("_", "").lower(), []).append(name)
    if spelt in by_full:
        return by_full[spelt]
    candidates = by_key.get(spelt, [])
    return candidates[0] if len(candidates) == 1 else None


def _suggestion(var: str, known: set[str]) -> str | None:
    """The setting's variable an unknown one most likely meant, if any.

    >>> known = {"FOREWARN_KAFKA_TOPIC", "FOREWARN_METRICS_PORT", "FOREWARN_KAFKA_BOOTSTRAP_SERVERS"}
    >>> [_suggestion(v, known) for v in ("FOREWARN_BOOTSTRAP_SERVERS", "FOREWARN_KAFKA_TOPICS", "FOREWARN_METRIC_PORT")]
    ['FOREWARN_KAFKA_BOOTSTRAP_SERVERS', 'FOREWARN_KAFKA_TOPIC', 'FOREWARN_METRICS_PORT']
    """
    meant = _meant(var, known)
    if meant is None and not _SERVICE_ADDRESS.fullmatch(var):
        meant = next(iter(difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.85)), None)
    return meant


_TYPES = {"str": str, "int": int, "float": float}


def _assign(section: Any, section_name: str, key: str, value: Any, where: str) -> None:
    known = {f.name: f for f in fields(section)}
    if key not in known:
        raise ConfigError(f"{where}: unknown setting (known in [{section_name}]: {', '.join(known)})")
    kind = _TYPES[known[key].type]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        shown = f"{type(value).__name__} (not shown)" if "password" in key else repr(value)  # a secret, mistyped
        raise ConfigError(f"{where}: expected {_NAMES[kind]}, got {shown}")
    if kind is float and not math.isfinite(value):  # nan passes every range check below it
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    setattr(section, key, value)


_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _from_text(text: str, type_name: str, var: str) -> Any:
    kind = _TYPES[type_name]
    if kind is str:
        return text
    try:
        # int() and float() also take " 128 ", "1_28" and other scripts' digits: a typo, never a setting
        if text != text.strip() or "_" in text or not text.isascii():
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{var}: expected {_NAMES[kind]}, got {text!r}" + _service_link_hint({var: text})) from None


def _service_link_hint(variables: dict[str, str]) -> str:
    """Kubernetes gives a pod FOREWARN_METRICS_PORT=tcp://... for a Service named forewarn-metrics."""
    links = [v for v, text in variables.items() if text.startswith(("tcp://", "udp://")) or _SERVICE_ADDRESS.fullmatch(v)]
    if not links:
        return ""
    return (f"; {', '.join(links)} look like Kubernetes service links (from a Service whose name starts with "
            "forewarn-): set enableServiceLinks: false in the pod spec")


def _toml_value(value: Any) -> str:
    r"""A value as TOML writes it, so that ``forewarn config --print`` reads back as it was.

    >>> text = 'a "quoted" back\\slash and a\nline break'
    >>> tomllib.loads("v = " + _toml_value(text))["v"] == text
    True
    """
    if isinstance(value, str):
        # a JSON string is a TOML basic string, escapes and all, but for DEL, which TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)
