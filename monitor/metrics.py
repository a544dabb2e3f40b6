"""Prometheus metrics of the detector and the daemon, on a registry passed in.

Names follow Prometheus practice: the ``forewarn_`` prefix, base units in the
name, ``_total`` on counters, and labels only from bounded sets (devices are
capped by ``max_devices``; what the cap leaves out is itself counted).
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from monitor import __version__
from monitor.readings import BadReason, Score

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ADAPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric Forewarn exports.

    >>> from prometheus_client import generate_latest
    >>> m = Metrics(CollectorRegistry(), max_devices=1)
    >>> m.observe_scores([Score("a", 1.0, 0.5, False), Score("b", 1.0, 0.9999, True)])
    >>> text = generate_latest(m.registry).decode()
    >>> 'forewarn_anomaly_score{device="a"} 0.5' in text, 'device="b"' in text
    (True, False)
    >>> 'forewarn_score_devices_not_exported 1.0' in text, 'forewarn_anomalies_total 1.0' in text
    (True, True)
    """

    def __init__(self, registry: CollectorRegistry, max_devices: int = 10_000, threshold: float | None = None) -> None:
        self.registry = registry
        self.max_devices = max_devices
        self._exported: dict[str, object] = {}  # device -> its score gauge child
        self._not_exported: set[str] = set()
        r = registry
        self.score = Gauge("forewarn_anomaly_score", "Latest anomaly score of the device, 0..1 (max over its channels)",
                           ["device"], registry=r)
        self.not_exported = Gauge("forewarn_score_devices_not_exported",
                                  "Devices whose score gauge is left out by the max_devices cap", registry=r)
        self.anomalies = Counter("forewarn_anomalies_total", "Readings flagged as anomalous", registry=r)
        self.readings = Counter("forewarn_readings_total", "Readings processed (accepted by the pipeline)", registry=r)
        self.scored = Counter("forewarn_scored_readings_total", "Readings scored by a live model", registry=r)
        self.bad_records = Counter("forewarn_bad_records_total", "Records rejected, by reason", ["reason"], registry=r)
        for reason in BadReason:
            self.bad_records.labels(reason.value)
        self.streams = Gauge("forewarn_streams", "Streams (device channels) by lifecycle state", ["state"], registry=r)
        self.adaptation = Histogram("forewarn_adaptation_duration_seconds",
                                    "Wall time of one batched fast adaptation", buckets=ADAPT_BUCKETS, registry=r)
        self.adapted = Counter("forewarn_adapted_streams_total", "Streams adapted and gone live", registry=r)
        self.latency = Histogram("forewarn_processing_latency_seconds",
                                 "From the reading's arrival in Kafka (record timestamp) to its score being sent; "
                                 "up to 256 evenly spaced readings per batch are observed",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("forewarn_consumer_lag_records", "Records behind the end of the partition",
                         ["topic", "partition"], registry=r)
        self.last_processed = Gauge("forewarn_last_processed_timestamp_seconds",
                                    "Reading timestamp (ts field) of the newest scored reading", registry=r)
        self.threshold = Gauge("forewarn_anomaly_threshold", "Score at or above which a reading is an anomaly",
                               registry=r)
        if threshold is not None:
            self.threshold.set(threshold)
        self.build = Info("forewarn_build", "Forewarn version", registry=r)
        self.build.info({"version": __version__})

    def observe_scores(self, scores: Iterable[Score]) -> None:
        newest = None
        n = scored = anomalies = 0
        for s in scores:
            n += 1
            if s.score is None:
                continue
            scored += 1
            anomalies += bool(s.anomaly)
            child = self._exported.get(s.device)
            if child is not None:
                child.set(s.score)
            elif len(self._exported) < self.max_devices:
                child = self._exported[s.device] = self.score.labels(s.device)
                child.set(s.score)
            elif s.device not in self._not_exported:
                self._not_exported.add(s.device)
                self.not_exported.set(len(self._not_exported))
            if newest is None or s.ts > newest:
                newest = s.ts
        self.readings.inc(n)
        self.scored.inc(scored)
        self.anomalies.inc(anomalies)
        if newest is not None:
            self.last_processed.set(newest)

    def forget_devices(self, devices: Iterable[str]) -> None:
        """Stop exporting devices this instance no longer owns."""
        for d in devices:
            if self._exported.pop(d, None) is not None:
                self.score.remove(d)
            if d in self._not_exported:
                self._not_exported.discard(d)
        self.not_exported.set(len(self._not_exported))

    def observe_bad(self, reasons: Iterable[BadReason]) -> None:
        for reason in reasons:
            self.bad_records.labels(reason.value).inc()

    def set_streams(self, by_state: dict[str, int]) -> None:
        for state, n in by_state.items():
            self.streams.labels(state).set(n)
