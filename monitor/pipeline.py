"""The detector: readings in, one score per reading out, for any number of devices.

Each channel of each device is a stream with a lifecycle:

    warming  -- buffers its first ``warmup`` values
    adapting -- its window is full; it is adapted at the end of the current batch,
                together with every other stream that filled up in that batch (with
                online updates on, one whose device already has a live channel is
                adapted before the batch's next round: see ``_advance``)
    live     -- a row of the ``FleetForecaster``; every reading is forecast,
                scored and learned

The daemon and the replay tools differ only in where batches come from and where
scores go: both call ``Pipeline.feed``.
"""
from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from numbers import Real

import numpy as np
import torch

from monitor.adapt import AdaptConfig, adapt
from monitor.checkpoint import Initialization
from monitor.checks import require
from monitor.config import MAX_INT32
from monitor.forecaster import FleetForecaster, forecast_sequence
from monitor.readings import BadReason, BadRecord, Reading, Score, by_reason, check_value, encodes_as_utf8
from monitor.scoring import (MAX_SURPRISE, NewPeaks, PageHinkley, RangeNovelty, ResidualScorer, ScoringConfig,
                             joint_surprise, score_of)
from monitor.state import DeviceState, StreamState

# The largest value a library caller may feed (the sources stop at MessageFormat.max_abs_value,
# 1e15): past ~1e308 a window's scale overflows to inf, and its snapshot cannot be written
MAX_VALUE = 1e300


class Lifecycle(str, Enum):
    """The stage of one stream (a device's channel); see the module docstring.

    >>> [stage.value for stage in Lifecycle]  # the order a stream goes through
    ['warming', 'adapting', 'live']
    >>> Lifecycle.LIVE == "live"  # a str: the stages name Pipeline.streams_by_state's counts
    True
    """

    WARMING = "warming"
    ADAPTING = "adapting"
    LIVE = "live"


@dataclass(frozen=True)
class PipelineConfig:
    """Per-stream behaviour; ``adapt`` overrides the initialization's own settings.

    >>> PipelineConfig().warmup
    256
    """

    warmup: int = 256
    adapt: AdaptConfig | None = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    max_streams: int = 1_000_000
    max_channels: int = 1024    # per device: one producer inventing channel names cannot fill max_streams
    seed_residuals: int = 128   # warm-up residuals that prime each stream's score statistics
    adapt_batch: int = 512      # streams adapted in one batched call: bounds the memory of a burst
    # Drift: a Page-Hinkley test on each live stream's |scaled residual| (capped at
    # drift_cap, so one spike cannot trip it); when the residuals have risen for good,
    # the stream collects drift_window more readings (still scored by its current
    # model) and is adapted afresh from the initialization on them.  0 = off.
    drift_threshold: float = 0.0
    drift_window: int = 256
    drift_cap: float = 4.0
    # Online updates: every online_every readings a live stream takes online_steps
    # gradient steps (at online_lr_scale times its adaptation rates) on its newest
    # online_window readings, leaving out of the loss the readings it flagged as
    # anomalous, so that it follows slow change without learning its incidents.  0 = off.
    online_every: int = 0
    online_window: int = 256
    online_steps: int = 1
    online_lr_scale: float = 0.5
    # A channel its device has not sent for this long, by the device's own timestamps, while
    # it sent others is forgotten at drop_quiet_channels (0 = never).  A device whose readings
    # jump forward by as much (it was silent, or its clock jumped) starts the count afresh.
    channel_idle_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 16:
            raise ValueError(f"warmup must be >= 16 readings, got {self.warmup}")
        require(self, ("max_streams", self.max_streams >= 1, ">= 1"), ("max_channels", self.max_channels >= 1, ">= 1"),
                ("seed_residuals", self.seed_residuals >= 0, ">= 0"), ("adapt_batch", self.adapt_batch >= 1, ">= 1"),
                ("drift_threshold", self.drift_threshold >= 0, ">= 0"),
                ("drift_window", self.drift_window >= 16, ">= 16"), ("drift_cap", self.drift_cap > 0, "> 0"),
                ("online_every", 0 <= self.online_every <= MAX_INT32, f"in 0..{MAX_INT32}"),
                ("online_window", self.online_window >= 16, ">= 16"),
                ("online_steps", self.online_steps >= 1, ">= 1"),
                ("online_lr_scale", self.online_lr_scale > 0, "> 0"),
                ("channel_idle_timeout_s", self.channel_idle_timeout_s >= 0, ">= 0"))


class _Stream:
    __slots__ = ("device", "channel", "state", "buffer", "row", "scorer", "last_ts", "backlog", "drift", "rebuffer",
                 "novelty")

    def __init__(self, device: str, channel: str, scorer: ResidualScorer, drift: PageHinkley | None = None,
                 novelty: RangeNovelty | None = None) -> None:
        self.device = device
        self.channel = channel
        self.state = Lifecycle.WARMING
        # array, not list: 8 bytes a value, where a list of floats costs 32 and leaves the
        # allocator's float pools fragmented once the window is adapted and dropped
        self.buffer: array | None = array("d")
        self.row = -1
        self.scorer = scorer
        self.last_ts: float | None = None
        self.backlog: list[tuple[int, float]] = []  # readings that arrived while adapting
        self.drift = drift
        self.rebuffer: list[float] | None = None     # live, drifted: the window for its re-adaptation
        self.novelty = novelty


def _name_problem(device, channel) -> tuple[BadReason, object, str] | None:
    """Why a device or channel name cannot make a stream, as ``(reason, channel, detail)``:
    the sources refuse these; a library caller's ``Reading`` may still hold them, and they
    would fail every output later (snapshots, CSV, metric labels).

    >>> _name_problem("pump", "temp") is None
    True
    >>> _name_problem(17, "temp"), _name_problem("pump", "")[2]
    ((<BadReason.BAD_DEVICE: 'bad_device'>, 'temp', 'a device name must be a non-empty string'), \
'a channel name must be a non-empty string')
    """
    shown = channel[:40] if isinstance(channel, str) else channel
    for reason, what, name in ((BadReason.BAD_DEVICE, "device", device), (BadReason.BAD_CHANNEL, "channel", channel)):
        if not isinstance(name, str) or not name:  # str subclasses too (numpy's names): they write as str
            return reason, shown, f"a {what} name must be a non-empty string"
        if not encodes_as_utf8(name):
            return reason, shown, f"a {what} name that is not valid Unicode (a lone surrogate)"
    return None


def _with(rejected: list | None, entry: tuple) -> list:
    """``rejected`` with ``entry`` appended, made on the first: most readings have none, and
    one of thousands of refused channels must not copy the list each time."""
    if rejected is None:
        return [entry]
    rejected.append(entry)
    return rejected


@dataclass
class FeedResult:
    """Scores for the accepted readings of a batch, in input order, and the rejects.

    >>> from monitor.forecaster import LSTMSpec
    >>> pipe = Pipeline(Initialization.random(LSTMSpec(hidden=4)), PipelineConfig(warmup=16))
    >>> late = Reading("pump", 3.0, {"temp": 1.0})  # behind its stream: rejected, not scored
    >>> result = pipe.feed([Reading("pump", float(t), {"temp": t % 5}) for t in range(20)] + [late])
    >>> len(result.scores), sum(s.score is not None for s in result.scores), result.adapted
    (20, 4, 1)
    >>> [b.reason.value for b in result.bad]
    ['out_of_order_timestamp']
    """

    scores: list[Score]
    bad: list[BadRecord]
    adapted: int = 0           # streams that went live in this batch
    adapt_seconds: float = 0.0
    readapted: int = 0         # live streams adapted afresh after a drift
    updated: int = 0           # online updates of live streams


def _place(entries: list[tuple[int, _Stream, float]], rounds: list[list[tuple[int, _Stream, float]]],
           next_round: dict[int, int]) -> None:
    """Put one reading's values in the first round after each of its streams' previous
    values: a stream advances once per round, in order, and all channels of a reading are
    scored together, so that its joint surprise is known before any of them is learned."""
    k = max(next_round.get(id(stream), 0) for _, stream, _ in entries)
    if k == len(rounds):
        rounds.append([])
    rounds[k].extend(entries)
    for _, stream, _ in entries:
        next_round[id(stream)] = k + 1


class Pipeline:
    """Turns batches of readings into scores, owning every stream's lifecycle.

    >>> import math
    >>> from monitor.forecaster import LSTMSpec
    >>> pipe = Pipeline(Initialization.random(LSTMSpec(hidden=4)), PipelineConfig(warmup=32))
    >>> batch = [Reading("pump", float(t), {"temp": math.sin(t / 4)}) for t in range(40)]
    >>> result = pipe.feed(batch)
    >>> result.scores[0].score is None, result.scores[-1].score is not None
    (True, True)
    >>> pipe.streams_by_state()
    {'warming': 0, 'adapting': 0, 'live': 1}
    """

    def __init__(self, init: Initialization, config: PipelineConfig | None = None) -> None:
        self.init = init
        self.config = config or PipelineConfig()
        self.adapt_config = self.config.adapt or init.adapt
        # called after each slice of adaptation and each online update, the long steps of a
        # feed (a fleet switched on adapts for minutes): the daemon counts them as the loop alive
        self.progress: Callable[[], None] | None = None
        online = self.config.online_every
        self.fleet = FleetForecaster(init.spec, clip=init.normalization.clip,
                                     history=self.config.online_window if online else 0,
                                     max_rows=self.config.max_streams)
        scale = self.config.online_lr_scale
        self._online_config = replace(self.adapt_config, steps=self.config.online_steps,
                                      lr=self.adapt_config.lr * scale)
        self._online_lr = None if init.inner_lr is None else {k: v * scale for k, v in init.inner_lr.items()}
        # a reading at least this surprising is an anomaly: online updates do not learn it
        self._alarm_surprise = self.config.scoring.alarm_level
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._devices: dict[str, list[_Stream]] = {}    # device -> its streams
        self.several_channels_seen = False               # a device with two channels or more came
        self._peaks: dict[str, NewPeaks] = {}            # device -> its recent surprises (peak_window on)
        self._state_counts = Counter({s: 0 for s in Lifecycle})
        self.counts: Counter[str] = Counter()           # readings, scored, anomalies, late_channel
        self._changed: set[str] = set()                  # devices whose state changed since take_changed()
        # With channel_idle_timeout_s: device -> timestamp of its latest reading taken (arrival
        # order), and of the reading that ended its latest silence of that long (or a jump of its
        # clock), from which its channels' quiet is counted
        self._latest_ts: dict[str, float] = {}
        self._resumed_ts: dict[str, float] = {}
        self._restored_ts: dict[str, float] = {}  # restored device -> its snapshot's newest, until a reading
        self.bad_counts: Counter[BadReason] = Counter()
        self._drifted: list[_Stream] = []                # live streams whose drift window filled
        self._due: list[_Stream] = []                    # live streams due an online update

    # ---- introspection -------------------------------------------------
    def streams_by_state(self) -> dict[str, int]:
        return {s.value: self._state_counts[s] for s in Lifecycle}

    def devices(self) -> set[str]:
        return set(self._devices)

    def _set_state(self, stream: _Stream, state: Lifecycle) -> None:
        self._state_counts[stream.state] -= 1
        self._state_counts[state] += 1
        stream.state = state

    # ---- the hot path ---------------------------------------------------
    def feed(self, readings: Sequence[Reading]) -> FeedResult:
        """Score a batch.  A stream seen several times in it advances once per reading, in order."""
        result = FeedResult([], [])
        rounds, accepted = self._route(readings, result.bad)
        # per reading: channel -> (surprise, forecast, value) of its live channels
        results: list[dict[str, tuple[float, float, float]] | None] = [None] * len(readings)
        readapted_before, updated_before = self.counts["readapted"], self.counts["updated"]
        result.adapted, result.adapt_seconds = self._advance(rounds, results)
        result.readapted = self.counts["readapted"] - readapted_before
        result.updated = self.counts["updated"] - updated_before
        for b in result.bad:
            self.bad_counts[b.reason] += 1
        self._verdicts(readings, accepted, results, result.scores)
        return result

    def _route(self, readings: Sequence[Reading], bad: list[BadRecord]
               ) -> tuple[list[list[tuple[int, _Stream, float]]], list[bool]]:
        """Each accepted value to its stream, in rounds: each stream's values in order, one per
        round, and a reading's channels in one round (see ``_place``)."""
        accepted = [False] * len(readings)
        rounds: list[list[tuple[int, _Stream, float]]] = []
        next_round: dict[int, int] = {}
        streams, devices, latest_ts = self._streams, self._devices, self._latest_ts
        changed = self._changed.add
        idle = self.config.channel_idle_timeout_s
        for i, reading in enumerate(readings):
            device, ts = reading.device, reading.ts
            if type(ts) is not float or not -math.inf < ts < math.inf:  # the sources refuse these; a
                ts = self._library_ts(reading, bad)                       # library caller may not
                if ts is None:
                    continue
            values = reading.values
            # the sources refuse these as missing_value; dict first: an ABC check costs ~0.2 us a reading
            if type(values) is not dict and not isinstance(values, Mapping) or not values:
                bad.append(BadRecord(BadReason.MISSING_VALUE, f"device {str(device)[:40]!r}: 'values' must be a "
                                     "non-empty object", reading.ref))
                continue
            try:
                known = device in devices
            except TypeError:  # unhashable: a library caller's, as every name below is checked
                bad.extend(by_reason(device, [_name_problem(device, c) for c in reading.values], reading.ref))
                continue
            placed, first, entries = 0, None, None
            rejected = None  # (reason, channel, detail): one bad record per reason, after the channels
            for channel, value in values.items():
                if type(value) is not float or not -MAX_VALUE <= value <= MAX_VALUE:
                    value, reason, detail = check_value(value, MAX_VALUE)  # as the sources judge theirs
                    if reason is not None:
                        rejected = _with(rejected, (reason, channel, detail))
                        continue
                stream = streams.get((device, channel))
                if stream is None:
                    problem = _name_problem(device, channel)  # checked once, where a stream would be made
                    if problem:
                        rejected = _with(rejected, problem)
                        continue
                    stream, detail = self._new_stream(device, channel, known)
                    if stream is None:
                        rejected = _with(rejected, (BadReason.STREAM_LIMIT, channel, detail))
                        continue
                last = stream.last_ts
                if last is not None and ts <= last:
                    reason = BadReason.DUPLICATE_TIMESTAMP if ts == last else BadReason.OUT_OF_ORDER_TIMESTAMP
                    rejected = _with(rejected, (reason, channel, f"ts {ts!r} after {last!r}"))
                    continue
                stream.last_ts = ts
                if placed == 0:
                    first = (i, stream, value)
                elif placed == 1:
                    entries = [first, (i, stream, value)]
                else:
                    entries.append((i, stream, value))
                placed += 1
            if rejected:
                bad.extend(by_reason(device, rejected, reading.ref))
            if placed == 1:  # the common case, inline: the stream's next round
                key = id(first[1])
                k = next_round.get(key, 0)
                next_round[key] = k + 1
                if k == len(rounds):
                    rounds.append([first])
                else:
                    rounds[k].append(first)
            elif placed:
                _place(entries, rounds, next_round)
            else:
                continue
            accepted[i] = True
            changed(device)
            if idle:
                before = latest_ts.get(device)
                if before is None:
                    before = self._restored_ts.pop(device, None)
                if before is not None and ts - before >= idle:
                    self._resumed_ts[device] = ts
                latest_ts[device] = ts
        return rounds, accepted

    @staticmethod
    def _library_ts(reading: Reading, bad: list[BadRecord]) -> float | None:
        """A timestamp as the sources would pass it (a finite float), or None and a bad record."""
        ts = reading.ts
        if isinstance(ts, Real) and not isinstance(ts, bool):  # numpy's numbers too
            try:
                ts = float(ts)
            except OverflowError:  # an int beyond float range
                ts = math.inf
            if math.isfinite(ts):
                return ts
        bad.append(BadRecord(BadReason.BAD_TIMESTAMP, f"device {reading.device!r}: ts {str(reading.ts)[:40]!r} "
                             "is not a finite number", reading.ref))
        return None

    def _advance(self, rounds, results) -> tuple[int, float]:
        """Score live streams round by round and buffer warming ones; adapt those whose window
        filled.  Returns how many were adapted and the seconds it took.

        They are adapted together after the last round, their later readings then scored in
        rounds of their own: a fleet's cold start is one batched adaptation, however its
        devices' readings interleave.  With online updates on, a stream whose device already
        has a live channel is adapted before the next round instead, so that each later
        reading meets all of its device's live channels in one round: whether the reading is
        flagged as a whole, and so left out of every channel's learning, must not depend on
        the batch boundaries."""
        pending: list[_Stream] = []
        eager: list[_Stream] = []
        online = bool(self.config.online_every)
        adapted, seconds = 0, 0.0

        def go_live(streams: list[_Stream]) -> None:
            nonlocal adapted, seconds
            started = time.perf_counter()
            self._go_live(streams, results)
            adapted, seconds = adapted + len(streams), seconds + time.perf_counter() - started
        for observations in rounds:
            live = []
            for obs in observations:
                i, stream, value = obs
                state = stream.state
                if state is Lifecycle.LIVE:
                    live.append(obs)
                elif state is Lifecycle.WARMING:
                    stream.buffer.append(value)
                    if len(stream.buffer) >= self.config.warmup:
                        self._set_state(stream, Lifecycle.ADAPTING)
                        if online and any(s.state is Lifecycle.LIVE for s in self._devices[stream.device]):
                            eager.append(stream)
                        else:
                            pending.append(stream)
                else:
                    stream.backlog.append((i, value))
            if live:
                self._observe_round(live, results)
            if eager:
                go_live(eager)
                eager = []
        if pending:
            go_live(pending)
        return adapted, seconds

    def _observe_round(self, live, results) -> None:
        """Score one reading of each of these streams, then re-adapt the ones whose drift
        window just filled and update the ones due an online update, so that their next
        readings meet the new model (whatever the batch boundaries)."""
        self._observe(live, results)
        if self._drifted:
            self._readapt()
        if self._due:
            self._update_online()

    def _verdicts(self, readings, accepted, results, scores: list[Score]) -> None:
        """One ``Score`` per accepted reading, or None while warming: the joint surprise of its
        live channels (or the worst one's), with the worst channel's forecast and value."""
        alarm = self._alarm_surprise
        joint = self.config.scoring.channel_combination == "joint"
        peaks = self.config.scoring.peak_window
        n_anomalies = n_scored = 0
        for i, reading in enumerate(readings):
            if not accepted[i]:
                continue
            channels = results[i]
            if channels is None:
                scores.append(Score(reading.device, reading.ts, None, None, ref=reading.ref))
                continue
            if len(channels) == 1:
                (channel, (surprise, forecast, value)), = channels.items()
            else:
                channel = max(channels, key=lambda c: (channels[c][0], c))  # ties: not by scoring order
                surprise, forecast, value = channels[channel]
                if joint:
                    surprise = joint_surprise([c[0] for c in channels.values()])
            if not surprise <= MAX_SURPRISE:  # inf or NaN
                surprise = MAX_SURPRISE
            if peaks:  # of the device's reading, not per channel: a quiet channel is not a 0 to combine
                tracker = self._peaks.get(reading.device)
                if tracker is None:
                    tracker = self._peaks[reading.device] = NewPeaks(peaks)
                surprise = tracker.surprise_learn_one(surprise)
            score = score_of(surprise)
            anomaly = surprise >= alarm  # not the score, which rounds to 1.0 past a surprise of ~16
            n_scored += 1
            n_anomalies += anomaly
            scores.append(Score(reading.device, reading.ts, score, anomaly, channel, forecast, value, reading.ref,
                                surprise))
        self.counts["readings"] += len(scores)
        self.counts["scored"] += n_scored
        self.counts["anomalies"] += n_anomalies

    def _new_stream(self, device: str, channel: str, device_known: bool) -> tuple[_Stream | None, str]:
        """A new warming stream, or None and why not (``stream_limit``)."""
        if len(self._streams) >= self.config.max_streams:
            return None, f"already {self.config.max_streams} streams"
        if len(self._devices.get(device, ())) >= self.config.max_channels:
            return None, f"the device already has {self.config.max_channels} channels"
        if device_known:
            self.counts["late_channel"] += 1
        stream = self._make_stream(device, channel)
        self._attach(device, channel, stream)
        return stream, ""

    def _attach(self, device: str, channel: str, stream: _Stream) -> None:
        """``stream``, warming, joins the pipeline and its device's streams, fed or restored alike."""
        self._streams[(device, channel)] = stream
        self._state_counts[Lifecycle.WARMING] += 1
        channels = self._devices.setdefault(device, [])
        channels.append(stream)
        if len(channels) == 2:
            self.several_channels_seen = True

    def _make_stream(self, device: str, channel: str) -> _Stream:
        """A new stream, warming, with the scoring and drift objects the configuration asks for."""
        config, scoring = self.config, self.config.scoring
        return _Stream(device, channel, ResidualScorer(scoring),
                       PageHinkley(config.drift_threshold) if config.drift_threshold else None,
                       RangeNovelty(scoring.novelty_unit, scoring.novelty_window) if scoring.novelty_unit else None)

    def _observe(self, live: list[tuple[int, _Stream, float]],
                 results: list[dict[str, tuple[float, float, float]] | None]) -> None:
        rows = torch.tensor([s.row for _, s, _ in live], dtype=torch.long)
        values = torch.tensor([v for _, _, v in live], dtype=torch.float64)
        forecasts, residuals = self.fleet.observe(rows, values)
        cap, window = self.config.drift_cap, self.config.drift_window
        online, alarm, flagged = self.config.online_every, self._alarm_surprise, []
        novelty = self.config.scoring.novelty_unit
        # readings with several channels: their rows in this round, to leave out whole when flagged jointly
        joint_rows: dict[int, list[int]] | None = \
            {} if online and self.config.scoring.channel_combination == "joint" else None
        for (i, stream, value), forecast, residual in zip(live, forecasts.tolist(), residuals.tolist()):
            surprise = stream.scorer.surprise_learn_one(residual)
            if novelty:
                surprise = max(surprise, stream.novelty.surprise_learn_one(value))
            if online and surprise >= alarm:
                flagged.append(stream.row)
            elif joint_rows is not None:
                joint_rows.setdefault(i, []).append(stream.row)
            if stream.drift is not None:
                if stream.rebuffer is not None:
                    stream.rebuffer.append(value)
                    if len(stream.rebuffer) >= window:  # >=: a snapshot may come from a longer window
                        self._drifted.append(stream)
                elif stream.drift.update(min(abs(residual), cap)):
                    stream.rebuffer = []
            channels = results[i]
            if channels is None:
                channels = results[i] = {}
            channels[stream.channel] = (surprise, forecast, value)
        if online:
            for i, rows_of_reading in (joint_rows or {}).items():
                channels = results[i]
                if len(channels) > 1 and joint_surprise([c[0] for c in channels.values()]) >= alarm:
                    flagged.extend(rows_of_reading)  # the reading is flagged: none of its channels is learned
            if flagged:
                self.fleet.unlearnable_last(torch.tensor(flagged, dtype=torch.long))
            due = self.fleet.due(rows, online).nonzero().flatten().tolist()
            self._due.extend(live[j][1] for j in due)

    def _go_live(self, streams: list[_Stream], results: list) -> None:
        """Adapt all newly full streams, ``adapt_batch`` at a time, place them in the fleet,
        score their backlog."""
        step = self.config.adapt_batch
        for start in range(0, len(streams), step):
            chunk = streams[start:start + step]
            self._adapt(chunk, [s.buffer for s in chunk])
        # their readings that came after the window filled, in rounds as ``_route`` makes them
        # (a channel of such a reading that was live already has been scored in ``_advance``)
        by_reading: dict[int, list[tuple[int, _Stream, float]]] = {}
        for s in streams:
            for i, value in s.backlog:
                by_reading.setdefault(i, []).append((i, s, value))
            s.backlog = []
        rounds: list[list[tuple[int, _Stream, float]]] = []
        next_round: dict[int, int] = {}
        for i in sorted(by_reading):
            _place(by_reading[i], rounds, next_round)
        for observations in rounds:
            self._observe_round(observations, results)

    def _readapt(self) -> None:
        """Adapt drifted streams afresh on their newest ``drift_window`` readings."""
        drifted, self._drifted = self._drifted, []  # filled and emptied within one feed
        window, step = self.config.drift_window, self.config.adapt_batch
        for start in range(0, len(drifted), step):
            chunk = drifted[start:start + step]
            self.fleet.remove(torch.tensor([s.row for s in chunk], dtype=torch.long))
            windows = []
            for s in chunk:
                windows.append(s.rebuffer[-window:])
                s.rebuffer = None
                s.drift.reset()
            # The scorer is kept (its stage-2 calibration above all) and primed with the new
            # model's window residuals like a new stream's; a fresh scorer judged too strictly
            # at first (more false alarms on NAB: docs/evaluation.md, "Drift re-adaptation").
            self._adapt(chunk, windows)
        self.counts["readapted"] += len(drifted)

    def _update_online(self) -> None:
        """One online update of each due stream: ``online_steps`` steps on its newest
        ``online_window`` readings, the anomalous ones left out of the loss."""
        due, self._due = self._due, []
        step, fleet = self.config.adapt_batch, self.fleet
        for start in range(0, len(due), step):
            rows = torch.tensor([s.row for s in due[start:start + step]], dtype=torch.long)
            rows = rows[fleet.due(rows, self.config.online_every)]  # re-adapted meanwhile: fresh already
            if not rows.numel():
                continue
            recent, learnable, _ = fleet.history_of(rows)
            with torch.no_grad():
                params = adapt(fleet.params_of(rows), recent, self._online_config, self._online_lr, mask=learnable)
            fleet.update(rows, params)
            self.counts["updated"] += rows.numel()
            if self.progress is not None:
                self.progress()

    def _adapt(self, streams: list[_Stream], windows: list[list[float]]) -> None:
        """Fit scaling and weights to each stream's window and place it in the fleet, live."""
        norm = self.init.normalization
        windows = torch.from_numpy(np.array(windows, dtype=np.float64))
        center, scale = norm.fit(windows)
        scaled = norm.apply(windows, center, scale)
        clipped = scaled.clamp(-norm.clip, norm.clip).to(self.fleet.dtype)
        with torch.no_grad():
            params = adapt(self.init.params, clipped, self.adapt_config, self.init.inner_lr)
            pred, state = forecast_sequence(params, clipped)
        # Prime the score statistics with the adapted model's residuals on the window
        # (past the cold-state burn-in), so the first live readings are judged fairly.
        residuals = scaled[:, 1:] - pred[:, :-1].to(torch.float64)
        first = max(self.adapt_config.burn_in, residuals.shape[1] - self.config.seed_residuals)
        lows, highs = windows.min(dim=1).values.tolist(), windows.max(dim=1).values.tolist()
        for stream, row_residuals, low, high in zip(streams, residuals[:, first:].tolist(), lows, highs):
            for r in row_residuals:
                stream.scorer.prime_one(r)
            if stream.novelty is not None:
                stream.novelty.learn_range(low, high)
        # the window seeds the online-update history as all learnable, flagged readings of a
        # drift window included: the re-adaptation has just fitted all of them anyway
        rows = self.fleet.add(params, center, scale, state, forecast=pred[:, -1], recent=clipped)
        for stream, row in zip(streams, rows.tolist()):
            stream.row = row
            stream.buffer = None
            self._set_state(stream, Lifecycle.LIVE)
        if self.progress is not None:
            self.progress()

    # ---- state ------------------------------------------------------------
    def take_changed(self, among: set[str] | None = None) -> set[str]:
        """Devices whose state changed since they were last taken (what a checkpoint must
        write), all of them or those ``among`` the given ones."""
        if among is None:
            changed, self._changed = self._changed & self._devices.keys(), set()
        else:
            changed = self._changed & among & self._devices.keys()
            self._changed -= among
        return changed

    def mark_changed(self, devices: Iterable[str]) -> None:
        """Have the next checkpoint write these devices (known ones) even if nothing reaches them."""
        self._changed.update(d for d in devices if d in self._devices)

    def export_devices(self, devices: Iterable[str], offsets: dict[str, int] | None = None) -> list[DeviceState]:
        """Snapshots of these devices (unknown ones are skipped); ``offsets`` gives
        the input offset each snapshot covers (-1 if not given).

        >>> from monitor.forecaster import LSTMSpec
        >>> init = Initialization.random(LSTMSpec(hidden=4))
        >>> a = Pipeline(init, PipelineConfig(warmup=16))
        >>> _ = a.feed([Reading("pump", float(t), {"temp": t % 5}) for t in range(20)])
        >>> b = Pipeline(init, PipelineConfig(warmup=16))
        >>> b.import_devices(a.export_devices(["pump"]))
        1
        >>> nxt = [Reading("pump", 20.0, {"temp": 0.0})]
        >>> a.feed(nxt).scores[0].surprise == b.feed(nxt).scores[0].surprise
        True
        """
        offsets = offsets or {}
        by_device = {d: self._devices[d] for d in devices if d in self._devices}
        live = [s for streams in by_device.values() for s in streams if s.state is Lifecycle.LIVE]
        rows = torch.tensor([s.row for s in live], dtype=torch.long)
        params, (h, c), center, scale, forecast = self.fleet.rows_state(rows)
        # one view per row, taken in bulk: indexing tensors row by row costs more than the rest
        params = {k: v.unbind(0) for k, v in params.items()}
        h, c = h.unbind(1), c.unbind(1)
        center, scale, forecast = center.tolist(), scale.tolist(), forecast.tolist()
        recent = learnable = since = None
        if self.fleet.history:
            recent, learnable, since = self.fleet.history_of(rows)
            recent, learnable, since = recent.unbind(0), learnable.unbind(0), since.tolist()
        index = {id(s): j for j, s in enumerate(live)}
        out = []
        for device, streams in by_device.items():
            states = []
            for s in streams:
                if s.state is Lifecycle.LIVE:
                    j = index[id(s)]
                    states.append(StreamState(s.channel, "live", s.last_ts, params={k: v[j] for k, v in params.items()},
                                              h=h[j], c=c[j], center=center[j], scale=scale[j],
                                              forecast=forecast[j], scorer=s.scorer.state(),
                                              drift=s.drift.state() if s.drift else None,
                                              rebuffer=list(s.rebuffer) if s.rebuffer is not None else None,
                                              recent=recent[j] if recent else None,
                                              learnable=learnable[j] if recent else None,
                                              since_update=since[j] if recent else 0,
                                              novelty=s.novelty.state() if s.novelty else None))
                else:  # between feeds nothing is adapting: the batch that filled a window adapted it
                    states.append(StreamState(s.channel, "warming", s.last_ts, buffer=list(s.buffer)))
            tracker = self._peaks.get(device)
            out.append(DeviceState(device, offsets.get(device, -1), states,
                                   peaks=tracker.state() if tracker is not None else None,
                                   resumed=self._resumed_ts.get(device)))
        return out

    def import_devices(self, states: Iterable[DeviceState]) -> int:
        """Take over devices from snapshots (replacing any state held for them); returns streams
        restored.  A device whose streams do not all fit under ``max_streams`` is left out whole:
        restored without some channels, its next snapshot would save it without them."""
        states = list(states)
        names = {s.device for s in states}
        changed = self._changed & names  # as before: a replaced device still due a write stays so
        self.drop_devices(names)
        self._changed |= changed
        live: list[tuple[_Stream, StreamState]] = []
        n = 0
        peak_window = self.config.scoring.peak_window
        room = self.config.max_streams - len(self._streams)
        for ds in states:
            if len(ds.streams) > room:
                continue
            room -= len(ds.streams)
            restored_ts = [ss.last_ts for ss in ds.streams if ss.last_ts is not None]
            if self.config.channel_idle_timeout_s and restored_ts:
                # its first reading here tells a silence across the restart or move, as one here
                # would; until it comes none of its channels is quiet: a device no reading reaches
                # here (a frozen copy of a moved one) is not rewritten
                self._restored_ts[ds.device] = max(restored_ts)
                if ds.resumed is not None:  # its channels quiet from the end of its latest silence, as here
                    self._resumed_ts[ds.device] = ds.resumed
            if peak_window and ds.peaks is not None:
                tracker = self._peaks[ds.device] = NewPeaks(peak_window)  # without them nothing is recent yet
                tracker.restore(ds.peaks)
            for ss in ds.streams:
                stream = self._make_stream(ds.device, ss.channel)
                stream.last_ts = ss.last_ts
                self._attach(ds.device, ss.channel, stream)
                if ss.stage == "live":
                    stream.scorer = ResidualScorer.from_state(ss.scorer, self.config.scoring)
                    if stream.drift is not None and ss.drift is not None:  # else: the test starts afresh
                        stream.drift.restore(ss.drift)
                        stream.rebuffer = None if ss.rebuffer is None else list(ss.rebuffer)
                    if stream.novelty is not None and ss.novelty is not None:  # else its range starts afresh
                        stream.novelty.restore(ss.novelty)
                    live.append((stream, ss))
                else:
                    # a snapshot taken under a longer warm-up keeps its newest values, one short of
                    # full: windows adapted together must have one length, and the next reading fills it
                    stream.buffer = array("d", ss.buffer[-(self.config.warmup - 1):])
                n += 1
        if live:
            params = {k: torch.stack([ss.params[k] for _, ss in live]) for k in self.init.params}
            state = (torch.stack([ss.h for _, ss in live], dim=1), torch.stack([ss.c for _, ss in live], dim=1))
            f64 = dict(dtype=torch.float64)
            rows = self.fleet.add(params, torch.tensor([ss.center for _, ss in live], **f64),
                                  torch.tensor([ss.scale for _, ss in live], **f64), state,
                                  forecast=torch.tensor([ss.forecast for _, ss in live], **f64),
                                  **self._histories([ss for _, ss in live]))
            for (stream, _), row in zip(live, rows.tolist()):
                stream.row = row
                stream.buffer = None
                self._set_state(stream, Lifecycle.LIVE)
        return n

    def _histories(self, states: list[StreamState]) -> dict[str, torch.Tensor]:
        """The online-update histories of snapshots as ``FleetForecaster.add`` takes them:
        each right-aligned in one row, what it lacks (all of it without one) unlearnable."""
        size = self.fleet.history
        if not size:
            return {}
        recent = torch.zeros((len(states), size), dtype=self.fleet.dtype)
        learnable = torch.zeros((len(states), size), dtype=torch.bool)
        for i, ss in enumerate(states):
            if ss.recent is not None and len(ss.recent):
                take = min(size, len(ss.recent))
                recent[i, size - take:] = ss.recent[-take:]
                learnable[i, size - take:] = ss.learnable[-take:]
        since = torch.tensor([ss.since_update if ss.recent is not None else 0 for ss in states], dtype=torch.long)
        return dict(recent=recent, learnable=learnable, since_update=since)

    # ---- membership ------------------------------------------------------
    def drop_quiet_channels(self) -> dict[str, int]:
        """Forget the channels on which a device has sent nothing for ``channel_idle_timeout_s``
        of its own timestamps while it kept sending others; returns device -> channels
        forgotten.  A device whose channel names change (a sensor replaced, a disk id in the
        name) would otherwise fill ``max_channels`` with dead streams, then have every new one
        refused, for good: its snapshot restores them.  The devices are marked changed, so that
        their next snapshot leaves those channels out.  A channel that comes back warms afresh.
        Quiet counts from the reading that ended the device's latest silence of that long (or
        forward jump of its clock), so a device back from one keeps the channels it has not
        sent yet, and one reading stamped far ahead makes none of the others quiet.

        >>> from monitor.forecaster import LSTMSpec
        >>> pipe = Pipeline(Initialization.random(LSTMSpec(hidden=4)),
        ...                 PipelineConfig(warmup=16, channel_idle_timeout_s=60.0))
        >>> _ = pipe.feed([Reading("srv-1", t, {"disk-a": 1.0, "cpu": 2.0}) for t in range(3)])
        >>> _ = pipe.feed([Reading("srv-1", t, {"disk-b": 1.0, "cpu": 2.0}) for t in range(3, 100)])
        >>> pipe.drop_quiet_channels(), sorted(s.channel for s in pipe._devices["srv-1"])
        ({'srv-1': 1}, ['cpu', 'disk-b'])
        """
        quiet_for = self.config.channel_idle_timeout_s
        forgotten: dict[str, int] = {}
        if not quiet_for:
            return forgotten
        rows = []
        for device, streams in self._devices.items():
            latest = self._latest_ts.get(device)  # None: restored, no reading since (or tracking off)
            if latest is None or len(streams) < 2:  # a device's last channel goes with the device
                continue
            since = self._resumed_ts.get(device, -math.inf)
            quiet = [s for s in streams if s.last_ts is not None and latest - max(s.last_ts, since) >= quiet_for]
            if not quiet or len(quiet) == len(streams):  # never all: the latest reading's are not quiet
                continue
            self._unlink(quiet, rows)
            streams[:] = [s for s in streams if s not in quiet]
            forgotten[device] = len(quiet)
            self._changed.add(device)
        if rows:
            self.fleet.remove(torch.tensor(rows, dtype=torch.long))
        return forgotten

    def drop_devices(self, devices: Iterable[str]) -> int:
        """Forget devices (for instance when their partition moves away); returns streams dropped."""
        rows, dropped = [], 0
        for device in set(devices):
            self._peaks.pop(device, None)
            self._changed.discard(device)  # else kept for good where nothing takes them (state.store = none)
            self._latest_ts.pop(device, None)
            self._resumed_ts.pop(device, None)
            self._restored_ts.pop(device, None)
            dropped += self._unlink(self._devices.pop(device, ()), rows)
        if rows:
            self.fleet.remove(torch.tensor(rows, dtype=torch.long))
        return dropped

    def _unlink(self, streams: Iterable[_Stream], rows: list[int]) -> int:
        """Take these streams out of the pipeline's indexes; their fleet rows, if live, are
        added to ``rows`` for the caller to free at once.  Returns how many there were."""
        n = 0
        for stream in streams:
            self._streams.pop((stream.device, stream.channel), None)
            self._state_counts[stream.state] -= 1
            if stream.state is Lifecycle.LIVE:
                rows.append(stream.row)
            n += 1
        return n
