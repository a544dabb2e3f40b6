"""Prometheus metrics of the detector and the daemon, on a registry passed in.

Names follow Prometheus practice: the ``forewarn_`` prefix, base units in the
name, ``_total`` on counters, and labels only from bounded sets (devices are
capped by ``max_devices``; what the cap leaves out is itself counted).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from monitor import __version__
from monitor.readings import BadReason, Score
from monitor.scoring import MAX_SURPRISE, ScoringConfig, score_of

# the scoring settings exported as forewarn_detector_info labels: what a rule or a reader of
# the dashboard needs to know to read the scores and alarms of an instance
DETECTOR_INFO = ("threshold", "alarm_surprise", "calibration_fading", "novelty_unit", "novelty_window",
                 "smoothing_span", "peak_window", "channel_combination")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ADAPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class DeviceGauges:
    """The per-device gauges: each exported device's latest score and surprise, when it was
    last flagged, how many of its latest readings in a row were, and when it last sent a
    reading, read from a dict at scrape time.

    A labelled ``Gauge`` would take two locked ``set`` calls per reading; the pipeline scores
    far more readings than Prometheus scrapes, so the loop only writes a dict (under one lock
    per batch) and a scrape turns it into samples.

    >>> from prometheus_client import generate_latest
    >>> gauges = DeviceGauges(CollectorRegistry())
    >>> gauges.latest["pump-1"] = [0.5, 0.3, None, 0, 1700000000.0]
    >>> gauges.latest["pump-2"] = [None, None, None, 0, 1700000060.0]  # restored: no score here yet
    >>> [line for line in generate_latest(gauges.registry).decode().splitlines() if not line.startswith("#")]
    ['forewarn_anomaly_score{device="pump-1"} 0.5', 'forewarn_anomaly_surprise{device="pump-1"} 0.3', \
'forewarn_device_last_reading_timestamp_seconds{device="pump-1"} 1.7e+09', \
'forewarn_device_last_reading_timestamp_seconds{device="pump-2"} 1.70000006e+09']
    """

    LABELS = ("device",)
    HELP = {
        "forewarn_anomaly_score": "Latest anomaly score of the device, 0..1, of its channels together "
                                  "(detector.channel_combination)",
        # the score rounds to 1.0 past a surprise of ~16, so alert rules compare surprises
        "forewarn_anomaly_surprise": "Latest surprise of the device, -log10 of the probability behind its score "
                                     "(3 = 1 in 1,000); what alert rules compare",
        # a device's flags between two scrapes never show in its score gauge, and with
        # detector.peak_window every incident is such a flag: alerts can read this instead
        "forewarn_device_last_anomaly_timestamp_seconds": "Unix time the device's latest flagged reading was "
                                                          "scored (exported devices flagged since this instance "
                                                          "took them)",
        # the surprise gauge holds a slow device's one flagged reading until its next reading, so
        # `for:` alone cannot tell a lasting anomaly from a single flag: alerts can ask for both
        "forewarn_device_consecutive_anomalous_readings": "Readings in a row, up to the device's latest, that "
                                                          "were flagged (exported devices whose latest reading "
                                                          "is flagged)",
        # a sensor that goes quiet is a fault of its own, which no score shows: its gauges hold
        "forewarn_device_last_reading_timestamp_seconds": "Unix time this instance last took a reading of the "
                                                          "device; a device restored from saved state counts from "
                                                          "its snapshot's, not counting the time no device sent "
                                                          "anything (the clock of detector.idle_timeout_s)",
    }

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        # device -> [score, surprise (both None until its first score here: restored), unix time
        # of its latest flag or None, flagged readings in a row, unix time of its latest reading]
        self.latest: dict[str, list] = {}
        registry.register(self)

    def describe(self):
        return [GaugeMetricFamily(name, doc, labels=self.LABELS) for name, doc in self.HELP.items()]

    def collect(self):
        with self.lock:
            latest = [(device, tuple(row)) for device, row in self.latest.items()]
        families = self.describe()
        score, surprise, flagged, in_a_row, last_reading = families
        for device, (s, sp, at, run, seen) in latest:
            if s is not None:
                score.add_metric((device,), s)
                surprise.add_metric((device,), sp)
            if at is not None:
                flagged.add_metric((device,), at)
            if run:
                in_a_row.add_metric((device,), run)
            last_reading.add_metric((device,), seen)
        return families


class Metrics:
    """Every metric Forewarn exports.

    >>> from prometheus_client import generate_latest
    >>> m = Metrics(CollectorRegistry(), max_devices=1)
    >>> m.observe_scores([Score("a", 1.0, 0.5, False, surprise=0.3), Score("b", 1.0, 0.9999, True, surprise=4.0)])
    >>> text = generate_latest(m.registry).decode()
    >>> 'forewarn_anomaly_score{device="a"} 0.5' in text, 'forewarn_anomaly_surprise{device="a"} 0.3' in text
    (True, True)
    >>> 'device="b"' in text
    False
    >>> 'forewarn_score_devices_not_exported 1.0' in text, 'forewarn_anomalies_total 1.0' in text
    (True, True)
    """

    def __init__(self, registry: CollectorRegistry, max_devices: int = 10_000,
                 scoring: ScoringConfig | None = None) -> None:
        self.registry = registry
        self.max_devices = max_devices
        scoring = scoring or ScoringConfig()
        self._not_exported: set[str] = set()
        r = registry
        self.devices = DeviceGauges(registry=r)
        self.not_exported = Gauge("forewarn_score_devices_not_exported",
                                  "Devices left out of the per-device gauges (score, surprise, ...) by the max_devices cap",
                                  registry=r)
        self.anomalies = Counter("forewarn_anomalies_total", "Readings flagged as anomalous", registry=r)
        self.readings = Counter("forewarn_readings_total", "Readings processed (accepted by the pipeline)", registry=r)
        self.scored = Counter("forewarn_scored_readings_total", "Readings scored by a live model", registry=r)
        self.bad_records = Counter("forewarn_bad_records_total", "Records rejected, by reason", ["reason"], registry=r)
        for reason in BadReason:
            self.bad_records.labels(reason.value)
        self.streams = Gauge("forewarn_streams", "Streams (device channels) by lifecycle state", ["state"], registry=r)
        self.adaptation = Histogram("forewarn_adaptation_duration_seconds",
                                    "Wall time of the fast adaptation of one batch's new streams",
                                    buckets=ADAPT_BUCKETS, registry=r)
        self.adapted = Counter("forewarn_adapted_streams_total", "Streams adapted and gone live", registry=r)
        self.readapted = Counter("forewarn_readapted_streams_total",
                                 "Live streams adapted afresh after their residuals drifted up", registry=r)
        self.updated = Counter("forewarn_online_updates_total",
                               "Online weight updates of live streams (one per stream updated)", registry=r)
        self.latency = Histogram("forewarn_processing_latency_seconds",
                                 "From the reading's arrival in Kafka (record timestamp) to its score being sent; "
                                 "up to 256 evenly spaced readings per batch are observed (not the re-deliveries "
                                 "a restored state covers, which are skipped)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("forewarn_consumer_lag_records", "Records behind the end of the partition",
                         ["topic", "partition"], registry=r)
        self.last_processed = Gauge("forewarn_last_processed_timestamp_seconds",
                                    "Reading timestamp (ts field) of the newest reading scored in the latest "
                                    "batch (not the newest ever: one device's clock far ahead would hold it)",
                                    registry=r)
        self.threshold = Gauge("forewarn_anomaly_threshold", "Score at or above which a reading is an anomaly "
                               "(1 past a surprise of ~16: compare forewarn_anomaly_alarm_surprise)", registry=r)
        self.alarm_surprise = Gauge("forewarn_anomaly_alarm_surprise", "Surprise at or above which a reading is "
                                    "an anomaly (detector.alarm_surprise, or detector.threshold's)", registry=r)
        self.alarm_surprise.set(scoring.alarm_level)
        self.threshold.set(score_of(scoring.alarm_surprise) if scoring.alarm_surprise else scoring.threshold)
        self.detector = Info("forewarn_detector", "Detector settings that shape scores and alarms (detector.*)",
                             registry=r)
        self.detector.info({name: _label(getattr(scoring, name)) for name in DETECTOR_INFO})
        self.ready = Gauge("forewarn_ready", "1 when partitions are assigned, their state restored and the "
                           "broker reachable and acknowledging (what /readyz answers), else 0", registry=r)
        self.checkpoints = Counter("forewarn_state_checkpoints_total",
                                   "Checkpoints: changed device states written, then input offsets committed", registry=r)
        self.checkpoint_duration = Histogram("forewarn_state_checkpoint_duration_seconds",
                                             "Wall time of one checkpoint, from its start to the offset commit "
                                             "(its writes are spread over loop turns)", buckets=ADAPT_BUCKETS, registry=r)
        self.restored = Counter("forewarn_restored_streams_total", "Streams restored from saved state", registry=r)
        self.restore_failures = Counter("forewarn_state_restore_failures_total",
                                        "Device states that could not be restored: corrupt, other version or "
                                        "initialization (those devices re-warm), or past detector.max_streams",
                                        registry=r)
        self.forgotten = Counter("forewarn_devices_forgotten_total",
                                 "Devices forgotten after detector.idle_timeout_s without a reading (streams, "
                                 "score series and saved state dropped)", registry=r)
        self.channels_forgotten = Counter("forewarn_channels_forgotten_total",
                                          "Channels forgotten after detector.channel_idle_timeout_s without a value while "
                                          "their device sent others (stream and its saved state dropped)", registry=r)
        self.snapshots_dropped = Counter("forewarn_state_snapshots_dropped_total",
                                         "Device snapshots not saved, too large for the changelog "
                                         "(state.max_snapshot_bytes or the topic's limit) or holding a number "
                                         "that is not finite: those devices re-warm after a restart",
                                         registry=r)
        self.redelivered = Counter("forewarn_redelivered_readings_total",
                                   "Re-delivered readings skipped because restored state already covers them",
                                   registry=r)
        self.partition_moves = Counter("forewarn_device_partition_moves_total",
                                       "Devices found on another partition than before, or on two in one batch "
                                       "(once per batch): the input topic gained partitions, or producers do "
                                       "not key readings by device, which ordering and recovery rely on", registry=r)
        self.commit_failures = Counter("forewarn_commit_failures_total",
                                       "Offset commits that failed: refused by the group after a rebalance "
                                       "(the readings are re-delivered to the next owner) or cut off by the "
                                       "broker (retried at the next checkpoint)", registry=r)
        # set by the daemon: which instances checkpoint, so that an alert on stalled checkpoints
        # holds from an instance's start, before its first checkpoint
        self.state = Info("forewarn_state", "State store settings (state.store, state.checkpoint_interval_s)",
                          registry=r)
        self.build = Info("forewarn_build", "Forewarn version", registry=r)
        self.build.info({"version": __version__})

    def observe_scores(self, scores: Iterable[Score]) -> None:
        newest = flagged_at = None
        n = scored = anomalies = 0
        now = float(round(time.time()))  # whole seconds: a shorter sample, and a second is precise enough
        with self.devices.lock:
            for s in scores:
                n += 1
                latest = self.devices.latest.get(s.device)
                if latest is not None:
                    latest[4] = now
                if s.score is None:  # a device is exported once scored: one that never gets past its
                    continue         # warm-up (a mistyped id, say) takes no slot and raises no alert
                if latest is None:
                    latest = self._export_row(s.device, now)
                scored += 1
                if latest is not None:
                    latest[0] = s.score
                    latest[1] = s.surprise if s.surprise is not None else score_surprise(s)
                if s.anomaly:
                    anomalies += 1
                    if latest is not None:
                        latest[2] = flagged_at = flagged_at or time.time()
                        latest[3] += 1
                elif latest is not None:
                    latest[3] = 0
                if newest is None or s.ts > newest:
                    newest = s.ts
        self.readings.inc(n)
        self.scored.inc(scored)
        self.anomalies.inc(anomalies)
        if newest is not None:
            self.last_processed.set(newest)

    def _export_row(self, device: str, seen: float) -> list | None:
        """A new device's row of gauges, or None (counted) past the ``max_devices`` cap."""
        if len(self.devices.latest) < self.max_devices:
            if device in self._not_exported:  # a slot freed up for it
                self._not_exported.discard(device)
                self.not_exported.set(len(self._not_exported))
            self.devices.latest[device] = row = [None, None, None, 0, seen]
            return row
        if device not in self._not_exported:
            self._not_exported.add(device)
            self.not_exported.set(len(self._not_exported))
        return None

    def restore_devices(self, last_reading: dict[str, float]) -> None:
        """Export restored live devices before their next reading, each with the Unix time of its
        latest one: a sensor that went quiet before a restart or a move still shows as quiet."""
        with self.devices.lock:
            for device, seen in last_reading.items():
                if device not in self.devices.latest:
                    self._export_row(device, float(round(seen)))

    def forget_devices(self, devices: Iterable[str]) -> None:
        """Stop exporting devices this instance no longer owns."""
        with self.devices.lock:
            for d in devices:
                self.devices.latest.pop(d, None)
                self._not_exported.discard(d)
        self.not_exported.set(len(self._not_exported))

    def observe_bad(self, reasons: Iterable[BadReason]) -> None:
        for reason in reasons:
            self.bad_records.labels(reason.value).inc()

    def describe_state(self, store: str, checkpoint_interval_s: float) -> None:
        """The state store settings as the labels of ``forewarn_state_info``."""
        self.state.info({"store": store, "checkpoint_interval_s": f"{checkpoint_interval_s:g}"})

    def set_streams(self, by_state: dict[str, int]) -> None:
        for state, n in by_state.items():
            self.streams.labels(state).set(n)


def _label(value) -> str:
    """A setting as a label value: floats short (3.3e-05, not 3.3333333333333335e-05)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def score_surprise(s: Score) -> float:
    """A score's surprise: its own, or (a score made without one) the surprise its score implies."""
    if s.surprise is not None:
        return s.surprise
    return -math.log10(1.0 - s.score) if s.score < 1.0 else MAX_SURPRISE


# ---- the metric reference in README.md, generated from the code above ------------------------------------
REFERENCE_BEGIN = "<!-- BEGIN metrics reference: generated by `python -m monitor.metrics --update-readme README.md` -->"
REFERENCE_END = "<!-- END metrics reference -->"


def reference_table() -> str:
    """Every metric of ``Metrics`` as a Markdown table: exported name, type, labels, help.

    >>> table = reference_table().splitlines()
    >>> table[0]
    '| metric | type | labels | help |'
    >>> [row for row in table if "forewarn_anomalies_total" in row]
    ['| `forewarn_anomalies_total` | counter |  | Readings flagged as anomalous |']
    """
    from prometheus_client.metrics import MetricWrapperBase

    m = Metrics(CollectorRegistry())
    m.describe_state("changelog", 30.0)  # as a daemon does: its labels are listed
    wrappers = {w._name: w for w in vars(m).values() if isinstance(w, MetricWrapperBase)}
    rows = ["| metric | type | labels | help |", "|---|---|---|---|"]
    for family in m.registry.collect():
        labels = list(DeviceGauges.LABELS if family.name in DeviceGauges.HELP
                      else getattr(wrappers.get(family.name), "_labelnames", ()))
        for sample in family.samples:  # an Info's keys are labels of its one sample
            labels += [k for k in sample.labels if k not in labels and k != "le"]
        name, doc = f"`{family.name}`", family.documentation
        if family.type == "counter":
            name = f"`{family.name}_total`"
        elif family.type == "info":
            name = f"`{family.name}_info`"
        elif family.type == "histogram":
            name += " (`_bucket`, `_sum`, `_count`)"
            bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
            doc += f"; buckets {', '.join(bounds)}"
        cells = [name, family.type, ", ".join(f"`{label}`" for label in labels), doc.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def update_reference(text: str) -> str:
    """``text`` (the README) with the table between the reference markers regenerated."""
    begin, end = text.find(REFERENCE_BEGIN), text.find(REFERENCE_END)
    if begin < 0 or end < begin:
        raise ValueError("the metrics reference markers are missing")
    return text[:begin] + REFERENCE_BEGIN + "\n" + reference_table() + "\n" + text[end:]


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m monitor.metrics", description="The metric reference.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--reference", action="store_true", help="print the Markdown table of every metric")
    action.add_argument("--update-readme", metavar="README", help="rewrite the table between the markers")
    args = parser.parse_args()
    if args.reference:
        print(reference_table())
    else:
        path = Path(args.update_readme)
        path.write_text(update_reference(path.read_text()))
