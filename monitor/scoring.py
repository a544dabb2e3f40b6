"""Anomaly scores from forecast residuals, one small River-style object per stream.

Two stages, both exponentially weighted running statistics of the stream's own past:

1. the residual is standardized by the mean and spread of past residuals: ``z``;
2. ``|z|`` is compared with how large ``|z|`` usually is *for this stream*
   (a much slower mean and spread of past ``|z|``): ``q``.  The second stage is
   what makes scores comparable across streams: a forecaster that fits one
   stream badly gives it large ``|z|`` all the time, which stage 1 alone would
   flag forever.  Stage 2 is deliberately not winsorized: after a burst of
   anomalies the stream is less easily surprised for a while, so one incident
   raises one alarm, not hundreds.  (On NAB: corpus score 0 -> ~38; README.)

``q`` becomes the *surprise*, -log10 of its one-sided normal tail probability
(3 means 1 in 1,000), and the score in [0, 1] is ``1 - 10**-surprise``.  The
surprise has no ties where the [0, 1] float rounds to 1.0, so the worst
anomalies can still be ranked.  What stage 1 learns is winsorized (at
``learn_clip`` spreads), so one huge anomaly does not widen the band enough to
hide the next; stage 2 learns ``|z|`` as it is, capped only at
``CALIBRATION_CAP`` so that its statistics cannot overflow.

The statistics are kept as plain floats (River's formulas, Finch 2009) rather
than River's Rust-backed ``EWMean``/``EWVar``, whose state cannot be read back
out for the per-device snapshots the daemon checkpoints.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from monitor.checks import require

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_HALF_NORMAL_MEAN = math.sqrt(2.0 / math.pi)   # of |z| for z ~ N(0, 1)
_HALF_NORMAL_VAR = 1.0 - 2.0 / math.pi


CHANNEL_COMBINATIONS = ("joint", "max")


@dataclass(frozen=True)
class ScoringConfig:
    """How residuals become scores.

    >>> ScoringConfig().threshold, ScoringConfig().alarm_level
    (0.999, 3.0)
    >>> ScoringConfig(alarm_surprise=64.0).alarm_level   # a score of 1 - 1e-64 would round to 1.0
    64.0
    >>> ScoringConfig(threshold=1e-13).alarm_level > 0   # 12 significant digits, not decimals
    True

    Stage 2 (``calibration_fading`` > 0, 0.002 chosen on NAB) makes scores comparable
    across streams and raises one alarm per incident; it is off by default because a
    sustained fault then stops scoring high after its onset, which alert rules with
    ``for:`` and point-wise metrics (SMD) need.  The README has both sets of numbers.
    """

    fading_factor: float = 0.01         # weight of the newest residual (about 1/fading_factor readings of memory)
    calibration_fading: float = 0.0     # same for the stage-2 statistics of |z|; 0 = stage 2 off (see below)
    threshold: float = 0.999            # a score at or above it flags an anomaly
    # The same threshold given as a surprise (0 = the threshold's, -log10(1 - threshold)):
    # beyond a surprise of ~16 the score rounds to 1.0, so operating points such as NAB's
    # (surprises of 10-100 with peak_window) can only be set this way.
    alarm_surprise: float = 0.0
    min_std: float = 0.05               # floor on the residual spread, in scaled units
    min_calibration_std: float = 0.25   # floor on the spread of |z|
    learn_clip: float = 4.0             # what stage 1 learns is clipped to this many spreads
    # Range novelty (0 = off): a value beyond the range of the stream's last novelty_window
    # values (0: all of them), by a share e of that range, has surprise e / novelty_unit, and
    # the reading's surprise is the larger of this and the forecast's (RangeNovelty).
    novelty_unit: float = 0.0
    novelty_window: int = 0
    # Smoothing (0 = off): the forecast's surprise, capped at SURPRISE_CAP, as an exponentially
    # weighted mean over about smoothing_span readings (weight 2 / (span + 1) on the newest), as Telemanom
    # smooths its errors: a sustained rise counts for more than a lone spike.  Everything
    # downstream sees the smoothed surprise, online updates' choice of flagged readings too.
    smoothing_span: int = 0
    # New peaks only (0 = off): a device's surprise (its channels combined, range novelty
    # included) counts only when it tops every one of its last ~peak_window (NewPeaks), else it
    # is 0: a rising incident raises one alarm and then one per new height, not one per
    # reading, which is what NAB's scoring rewards.  Alert rules with ``for:`` need the score
    # to stay high, so it is off by default.
    peak_window: int = 0
    # How a device's channels make its score: "joint", the probability of all of them being
    # this surprising together (Fisher's method) or of one being so (Bonferroni's), whichever
    # is stronger (``joint_surprise``), or "max", its worst
    # channel's alone, which flags a reading whenever any one of many noisy channels strays.
    channel_combination: str = "joint"

    def __post_init__(self) -> None:
        if not 0 < self.fading_factor <= 1:
            raise ValueError(f"fading_factor must be in (0, 1], got {self.fading_factor}")
        if not 0 <= self.calibration_fading <= 1:
            raise ValueError(f"calibration_fading must be in [0, 1], got {self.calibration_fading}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.alarm_surprise <= MAX_SURPRISE:  # NaN too; past the cap no surprise could reach it
            raise ValueError(f"alarm_surprise must be in 0..{MAX_SURPRISE:g}, got {self.alarm_surprise}")
        if not self.alarm_level > 0:  # 1 - threshold rounds to 1: a level of 0 would flag every reading
            raise ValueError(f"threshold must be in (0, 1) and not so small that 1 - threshold rounds to 1, "
                             f"got {self.threshold}")
        require(self, ("min_std", self.min_std > 0, "> 0"), ("min_calibration_std", self.min_calibration_std > 0, "> 0"),
                ("learn_clip", self.learn_clip > 0, "> 0"))
        if not (math.isfinite(self.novelty_unit) and self.novelty_unit >= 0):
            raise ValueError(f"novelty_unit must be finite and >= 0, got {self.novelty_unit}")
        if not (self.novelty_window == 0 or self.novelty_window >= RangeNovelty.BLOCKS):
            raise ValueError(f"novelty_window must be 0 or >= {RangeNovelty.BLOCKS}, got {self.novelty_window}")
        if self.smoothing_span < 0:
            raise ValueError(f"smoothing_span must be >= 0, got {self.smoothing_span}")
        if not (self.peak_window == 0 or self.peak_window >= NewPeaks.BLOCKS):
            raise ValueError(f"peak_window must be 0 or >= {NewPeaks.BLOCKS}, got {self.peak_window}")
        if self.channel_combination not in CHANNEL_COMBINATIONS:
            raise ValueError(f"channel_combination must be one of {', '.join(CHANNEL_COMBINATIONS)}, "
                             f"got {self.channel_combination!r}")

    @property
    def alarm_level(self) -> float:
        """The surprise at or above which a reading is an anomaly (``score_of`` it is the
        score threshold; exact where the score can still tell, rounded to 1.0 beyond)."""
        if self.alarm_surprise:
            return self.alarm_surprise
        return float(f"{-math.log10(1.0 - self.threshold):.12g}")  # 0.999 gives 3, not 2.9999999999999996

    def to_dict(self) -> dict:
        return asdict(self)


class EWStats:
    """Exponentially weighted mean and variance, state in plain attributes.

    >>> s = EWStats(0.5)
    >>> for x in [1, 3, 5]:
    ...     s.update(x)
    >>> s.mean, s.var, s.n
    (3.5, 2.75, 3)
    """

    __slots__ = ("fading_factor", "mean", "var", "n")

    def __init__(self, fading_factor: float, mean: float = 0.0, var: float = 0.0, n: int = 0) -> None:
        self.fading_factor = fading_factor
        self.mean, self.var, self.n = mean, var, n

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean = x
        else:
            diff = x - self.mean
            incr = self.fading_factor * diff
            self.mean += incr
            self.var = (1.0 - self.fading_factor) * (self.var + diff * incr)
        self.n += 1

    def std(self, floor: float) -> float:
        return math.sqrt(self.var) if self.var > floor * floor else floor


class PageHinkley:
    """River's ``drift.PageHinkley`` test for an increase in the mean (``mode="up"``),
    state in four plain floats so it can be snapshotted; the same formulas.

    >>> from river import drift
    >>> ours, rivers = PageHinkley(threshold=5.0), drift.PageHinkley(threshold=5.0, mode="up")
    >>> data = [0.2, 0.4, 0.3] * 20 + [1.5] * 10
    >>> [i for i, x in enumerate(data) if ours.update(x)] == [i for i, x in enumerate(data)
    ...                                                       if rivers.update(x) or rivers.drift_detected]
    True
    """

    __slots__ = ("threshold", "delta", "alpha", "min_instances", "n", "mean", "sum", "min")

    def __init__(self, threshold: float = 50.0, delta: float = 0.005, alpha: float = 1 - 0.0001,
                 min_instances: int = 30) -> None:
        self.threshold, self.delta, self.alpha, self.min_instances = threshold, delta, alpha, min_instances
        self.reset()

    def reset(self) -> None:
        self.n, self.mean, self.sum, self.min = 0, 0.0, 0.0, math.inf

    def update(self, x: float) -> bool:
        """Learn ``x``; True when the mean has risen (then the test starts afresh)."""
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.sum = self.alpha * self.sum + (x - self.mean) - self.delta
        if self.sum < self.min:
            self.min = self.sum
        if self.n >= self.min_instances and self.sum - self.min > self.threshold:
            self.reset()
            return True
        return False

    def state(self) -> list[float]:
        """Four finite floats, for snapshots (the minimum of an empty test is stored as 0)."""
        return [float(self.n), self.mean, self.sum, self.min if self.n else 0.0]

    def restore(self, state: list[float]) -> None:
        self.n, self.mean, self.sum, self.min = int(state[0]), state[1], state[2], state[3]
        if self.n == 0:
            self.min = math.inf


# Stage 2 learns |z| up to here, so that its variance (a square) stays finite: a library caller's
# 1e300 would otherwise make it inf and blind the stream for good.  Far above any real stream's
# |z| (NAB's largest, a series flat through its warm-up, is ~3e15), because lower caps change
# what calibration does: after an absurd |z| a calibrated stream stays quiet while its stage 1
# catches up, and capping at 1e5 instead costs NAB's odd-indexed series 31 points (README).
CALIBRATION_CAP = 1e100


class ResidualScorer:
    """Scores one stream's residuals against their own running statistics.

    >>> scorer = ResidualScorer()
    >>> for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 50:
    ...     scorer.learn_one(r)
    >>> scorer.score_one(0.02) < 0.5
    True
    >>> scorer.score_one(3.0) > ScoringConfig().threshold
    True

    With ``smoothing_span=9`` a lone spike counts for about a fifth (2 / (9 + 1)) of
    its surprise, and a sustained rise builds up:

    >>> plain, smooth = ResidualScorer(), ResidualScorer(ScoringConfig(smoothing_span=9))
    >>> for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 50:
    ...     plain.learn_one(r)
    ...     smooth.learn_one(r)
    >>> spike = smooth.surprise_learn_one(1.0)
    >>> round(spike / plain.surprise_learn_one(1.0), 1)
    0.2
    >>> smooth.surprise_learn_one(1.0) > spike   # the fault goes on: the surprise builds up
    True

    What is averaged is capped at ``SURPRISE_CAP`` (50), so one absurd residual raises the
    smoothed surprise by at most a fifth of that, and for a few readings, not a hundred.
    """

    __slots__ = ("config", "residuals", "magnitudes", "smoothed", "_weight")

    def __init__(self, config: ScoringConfig | None = None) -> None:
        self.config = config or ScoringConfig()
        self.residuals = EWStats(self.config.fading_factor)
        # Stage 2 starts from what |z| of a well-calibrated stream looks like (half-normal),
        # so the first live readings are judged sanely while the stream's own |z| take over.
        self.magnitudes = EWStats(self.config.calibration_fading, _HALF_NORMAL_MEAN, _HALF_NORMAL_VAR, 1)
        span = self.config.smoothing_span
        self._weight = 2.0 / (span + 1) if span > 1 else 0.0  # 0: no smoothing
        self.smoothed = 0.0

    def state(self) -> list[float]:
        """The statistics and the smoothed surprise as seven floats, for snapshots."""
        r, m = self.residuals, self.magnitudes
        return [r.mean, r.var, float(r.n), m.mean, m.var, float(m.n), self.smoothed]

    @classmethod
    def from_state(cls, state: list[float], config: ScoringConfig | None = None) -> "ResidualScorer":
        """The scorer ``state()`` was taken from.

        >>> a = ResidualScorer()
        >>> for r in [0.3, -0.1, 0.2]:
        ...     a.learn_one(r)
        >>> b = ResidualScorer.from_state(a.state())
        >>> b.surprise_learn_one(1.0) == a.surprise_learn_one(1.0)
        True
        """
        scorer = cls(config)
        r, m = scorer.residuals, scorer.magnitudes
        r.mean, r.var, r.n, m.mean, m.var, m.n = state[0], state[1], int(state[2]), state[3], state[4], int(state[5])
        # snapshots from before smoothing have six floats; with smoothing off a stale value is not kept
        scorer.smoothed = state[6] if len(state) > 6 and scorer._weight else 0.0
        return scorer

    def _z(self, residual: float) -> tuple[float, float]:
        std = self.residuals.std(self.config.min_std)
        return (residual - self.residuals.mean) / std, std

    def _surprise(self, z: float) -> float:
        if self.config.calibration_fading == 0:
            return two_sided_surprise(z)
        m = self.magnitudes
        return surprise((abs(z) - m.mean) / m.std(self.config.min_calibration_std))

    def score_one(self, residual: float) -> float:
        """Score in [0, 1] of ``residual``, without learning it: what ``surprise_learn_one``
        would score it, smoothing included."""
        out = self._surprise(self._z(residual)[0])
        if self._weight:
            out = self.smoothed + self._weight * (min(out, SURPRISE_CAP) - self.smoothed)
        return score_of(out)

    def learn_one(self, residual: float) -> None:
        self.surprise_learn_one(residual)

    def surprise_learn_one(self, residual: float) -> float:
        """The surprise of ``residual``, then learn it: the per-reading hot path."""
        cfg = self.config
        z, std = self._z(residual)
        out = self._surprise(z)
        clip = cfg.learn_clip  # _learn_residual, written out: a call costs ~5% of this hot path
        learned = self.residuals.mean + math.copysign(clip * std, z) if abs(z) > clip else residual
        if learned > CALIBRATION_CAP:  # comparisons, not min/max: a NaN is learned as before
            learned = CALIBRATION_CAP
        elif learned < -CALIBRATION_CAP:
            learned = -CALIBRATION_CAP
        self.residuals.update(learned)
        if cfg.calibration_fading:
            magnitude = abs(z)
            self.magnitudes.update(magnitude if magnitude < CALIBRATION_CAP else CALIBRATION_CAP)
        if self._weight:
            self.smoothed += self._weight * (min(out, SURPRISE_CAP) - self.smoothed)
            return self.smoothed
        return out

    def prime_one(self, residual: float) -> None:
        """Learn a residual of the window the model was fitted on: stage 1 only, since
        in-sample ``|z|`` understate the live ones and would make stage 2 jumpy."""
        self._learn_residual(residual, *self._z(residual))

    def _learn_residual(self, residual: float, z: float, std: float) -> None:
        clip = self.config.learn_clip  # winsorized: one huge residual does not hide the next
        learned = self.residuals.mean + math.copysign(clip * std, z) if abs(z) > clip else residual
        # capped as stage 2's |z| is: winsorizing bounds one reading, not a run of them, whose
        # spread grows ~7% a reading until its variance overflows to inf and blinds the stream
        if learned > CALIBRATION_CAP:
            learned = CALIBRATION_CAP
        elif learned < -CALIBRATION_CAP:
            learned = -CALIBRATION_CAP
        self.residuals.update(learned)


class RangeNovelty:
    """How far each value lies beyond the range of the stream's recent values, as a surprise.

    A value beyond that range by a share ``e`` of it has surprise ``e / unit``; within it, 0.
    The range is that of the last ``window`` values (0: every value so far), kept as the
    extremes of ``BLOCKS`` blocks of ``window // BLOCKS`` values, so a few floats per stream
    (the block being filled adds up to one block more).  No value is novel until the range
    holds a window (``learn_range``) or ``MIN_VALUES`` values: a range of the first few
    values of a stream restored without one would make every next value look novel.
    New extremes are most of what NAB labels; a forecaster that follows a slow climb does
    not flag them (docs/evaluation.md).

    >>> novelty = RangeNovelty(unit=0.01)
    >>> novelty.learn_range(0.0, 10.0)   # a warm-up window's extremes
    >>> [novelty.surprise_learn_one(v) for v in (5.0, 10.5, 10.5, -1.05)]
    [0.0, 5.0, 0.0, 10.0]
    >>> recent = RangeNovelty(unit=0.01, window=32)   # blocks of 2 values
    >>> recent.learn_range(0.0, 10.0)
    >>> [recent.surprise_learn_one(4.0 + t % 2) for t in range(34)][-1]   # the 10 has left the window
    0.0
    >>> again = RangeNovelty(unit=0.01, window=32)
    >>> again.restore(recent.state())
    >>> again.state() == recent.state()
    True
    >>> recent.surprise_learn_one(6.0)   # beyond [4, 5] by its width
    100.0
    """

    BLOCKS = 16
    MIN_VALUES = 64
    __slots__ = ("unit", "block", "highs", "lows", "past_high", "past_low", "high", "low", "count", "ready")

    def __init__(self, unit: float, window: int = 0) -> None:
        self.unit = unit
        self.block = max(1, window // self.BLOCKS) if window else 0  # 0: one block, never closed
        self.highs: list[float] = []   # extremes of the last closed blocks
        self.lows: list[float] = []
        self.past_high, self.past_low = -math.inf, math.inf
        self.high, self.low, self.count = -math.inf, math.inf, 0  # the block being filled
        self.ready = False

    def surprise_learn_one(self, value: float) -> float:
        """The surprise of ``value`` against the range so far, then take it into the range."""
        high = self.high if self.high > self.past_high else self.past_high
        low = self.low if self.low < self.past_low else self.past_low
        span = high - low
        out = 0.0
        if self.ready and 0 < span < math.inf:
            if value > high:
                out = (value - high) / span / self.unit
            elif value < low:
                out = (low - value) / span / self.unit
        if value > self.high:
            self.high = value
        if value < self.low:
            self.low = value
        self.count += 1
        if not self.ready:  # the closed blocks count too: with blocks under 64 values, count alone never gets there
            self.ready = self.count + self.block * len(self.highs) >= self.MIN_VALUES
        if self.block and self.count >= self.block:
            self._close_block()
        return out

    def learn_range(self, low: float, high: float) -> None:
        """Take in a window's extremes (a warm-up window) as one block of its own."""
        self.high, self.low = max(self.high, high), min(self.low, low)
        self.ready = True
        if self.block:
            self._close_block()

    def _close_block(self) -> None:
        self.highs.append(self.high)
        self.lows.append(self.low)
        if len(self.highs) > self.BLOCKS:
            del self.highs[0], self.lows[0]
        self.past_high, self.past_low = max(self.highs), min(self.lows)
        self.high, self.low, self.count = -math.inf, math.inf, 0

    def state(self) -> list[float]:
        """Finite floats, for snapshots: whether it is ready, the open block (count, whether
        it holds a value, high, low), then the closed blocks' highs and lows."""
        ready = 1.0 if self.ready else 0.0
        if self.high == -math.inf:
            return [ready, float(self.count), 0.0, 0.0, 0.0, *self.highs, *self.lows]
        return [ready, float(self.count), 1.0, self.high, self.low, *self.highs, *self.lows]

    def restore(self, state: list[float]) -> None:
        ready, count, filled, high, low, rest = state[0], int(state[1]), state[2], state[3], state[4], state[5:]
        self.ready = bool(ready)
        self.high, self.low, self.count = (high, low, count) if filled else (-math.inf, math.inf, count)
        half = len(rest) // 2
        self.highs, self.lows = list(rest[:half][-self.BLOCKS:]), list(rest[half:][-self.BLOCKS:])
        # a state with no closed block replaces the range this object held, if any
        self.past_high, self.past_low = (max(self.highs), min(self.lows)) if self.highs else (-math.inf, math.inf)


class NewPeaks:
    """Lets a surprise through only when it tops every surprise of the last readings.

    Anything else becomes 0, so a rising incident raises one alarm and then one per new
    height instead of one per reading.  The recent surprises are kept as the maxima of
    ``BLOCKS`` blocks of ``window // BLOCKS`` readings and of the block being filled, so a
    surprise is compared with those of about the last ``window`` readings (up to a block
    more).  Surprises are taken as at most ``MAX_SURPRISE``, a NaN as that (loud, as
    ``joint_surprise`` counts it): a run of them alarms once, not at every reading.

    >>> peaks = NewPeaks(window=8)   # blocks of 2
    >>> [peaks.surprise_learn_one(s) for s in (0.5, 6.0, 7.0, 6.5, 5.0, 0.3, 0.1, 0.4, 4.0, 0.2)]
    [0.5, 6.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    >>> [peaks.surprise_learn_one(s) for s in (0.2, 0.1, 6.0, 6.0)]   # the 7.0 and 6.5 have left the window
    [0.0, 0.0, 6.0, 0.0]
    >>> again = NewPeaks(window=8)
    >>> again.restore(peaks.state())
    >>> [again.surprise_learn_one(s) for s in (5.5, 6.5)], [peaks.surprise_learn_one(s) for s in (5.5, 6.5)]
    ([0.0, 6.5], [0.0, 6.5])
    """

    BLOCKS = 4
    __slots__ = ("block", "maxima", "past", "current", "count")

    def __init__(self, window: int) -> None:
        self.block = max(1, window // self.BLOCKS)
        self.maxima: list[float] = []  # of the last closed blocks, oldest first
        self.past = -1.0               # surprises are >= 0: -1 is "nothing yet"
        self.current, self.count = -1.0, 0

    def surprise_learn_one(self, surprise: float) -> float:
        """``surprise`` if it tops the recent ones, else 0; then remember it."""
        capped = surprise if surprise <= MAX_SURPRISE else MAX_SURPRISE  # inf and NaN too
        recent = self.current if self.current > self.past else self.past
        out = surprise if capped > recent else 0.0
        if capped > self.current:
            self.current = capped
        self.count += 1
        if self.count >= self.block:
            self.maxima.append(self.current)
            if len(self.maxima) > self.BLOCKS:
                del self.maxima[0]
            self.past = max(self.maxima)
            self.current, self.count = -1.0, 0
        return out

    def state(self) -> list[float]:
        """Finite floats, for snapshots: the open block (count, maximum), then the closed blocks' maxima."""
        return [float(self.count), self.current, *self.maxima]

    def restore(self, state: list[float]) -> None:
        self.count, self.current = int(state[0]), state[1]
        self.maxima = list(state[2:][-self.BLOCKS:])
        self.past = max(self.maxima, default=-1.0)


_LN10 = math.log(10.0)
_LOG10_SQRT_2PI = math.log10(math.sqrt(2 * math.pi))


def surprise(q: float) -> float:
    """-log10 of the one-sided normal tail probability beyond ``q``.

    >>> round(surprise(3.0902), 3), round(surprise(0.0), 3), round(surprise(10.0), 2), round(surprise(50.0), 1)
    (3.0, 0.301, 23.12, 545.0)
    """
    if q < 37.0:
        return -math.log10(0.5 * math.erfc(q * _INV_SQRT2))
    # erfc underflows: its asymptotic series, phi(q) / q (1 - 1/q^2 + 3/q^4 - 15/q^6 + 105/q^8), exact
    # to ~1e-13 here (phi(q) / q alone was 3e-4 low at 37: surprise(37) < surprise(36.99999999))
    r = 1.0 / (q * q)
    series = 1 - r * (1 - 3 * r * (1 - 5 * r * (1 - 7 * r)))
    return (q * q / 2) / _LN10 + math.log10(q) + _LOG10_SQRT_2PI - math.log10(series)


# Beyond 1e-50 a normal tail probability says more about the residual model than about the
# reading: a channel flat through its warm-up reaches 1e-1000000 with its first move.  Surprises
# are capped here before they are averaged or combined, so that one such channel cannot outvote
# the rest of its device, nor hold a smoothed surprise high for a hundred readings.  (50 was
# picked on the SMD meta-training machines' test splits, among 30, 50, 100 and 300.)
SURPRISE_CAP = 50.0

# The largest surprise a verdict carries.  Absurd values from a library caller overflow a
# surprise to inf, which JSON cannot carry; a NaN (weights gone bad) is raised to it too, as
# ``joint_surprise`` counts a NaN as its cap: loud, not silent.
MAX_SURPRISE = 1e300


def alarm_caveat(config: ScoringConfig) -> str | None:
    """What an operator should hear about ``alarm_surprise``, if anything, once a device with
    several channels comes (a fleet of single metrics is not capped: nothing to say there).

    >>> alarm_caveat(ScoringConfig(alarm_surprise=64.0))[:59]
    'alarm surprise 64 is above 49.7, the most one channel alone'
    >>> alarm_caveat(ScoringConfig(alarm_surprise=64.0, channel_combination="max")) is None
    True
    """
    one_of_two = SURPRISE_CAP - math.log10(2)  # joint_surprise: one channel of two at the cap
    if config.alarm_surprise <= one_of_two or config.channel_combination != "joint":
        return None
    return (f"alarm surprise {config.alarm_surprise:g} is above {one_of_two:.3g}, the most one channel alone "
            f"gives a device with several (its surprise capped at {SURPRISE_CAP:g}, less log10 of their number): "
            "such a device reaches it only when more than one channel is surprised at once (a device with one "
            "channel is not capped)")


def joint_surprise(surprises: Sequence[float]) -> float:
    """-log10 of the probability that a device's channels are this surprising: the stronger
    of two tests, all of them together (Fisher's) and any one of them (Bonferroni's).

    Fisher's method: where the forecasts are calibrated, a channel's surprise is exponential
    with mean 1 / ln 10, so ln 10 times the sum x over n independent channels is Gamma(n, 1),
    whose tail is exp(-x) (1 + x + x^2 / 2! + ... + x^(n-1) / (n-1)!).  It adds up many small
    surprises, but many quiet channels dilute one surprised channel: a device with a hundred
    idle metrics could not flag one gone wild.  Bonferroni's, the largest surprise less
    log10(n), cannot be diluted so.  Taking the stronger of the two flags, where the channels
    are calibrated, up to twice what a threshold says (tested at 38 channels); doubling the
    probability (a union bound, conservative) would tie every reading below 0.3 at 0, which
    costs SMD's PA%K.  Each surprise is capped at ``SURPRISE_CAP`` first.  One channel: its
    own surprise.  Smoothed surprises are combined as they are: their spread is smaller than
    that of single ones, so the joint surprise errs low, toward fewer alarms.

    >>> joint_surprise([7.25])
    7.25
    >>> round(joint_surprise([3.0, 0.1]), 2), round(joint_surprise([3.0, 3.0]), 2)
    (2.7, 4.83)

    One surprised channel among nineteen quiet ones, or among 199, still counts; twenty
    that are all a little surprised add up:

    >>> round(joint_surprise([6.0] + [0.2] * 19), 2), round(joint_surprise([50.0] + [0.0] * 199), 2)
    (4.7, 47.7)
    >>> round(joint_surprise([1.5] * 20), 2)
    12.0
    """
    n = len(surprises)
    if n == 1:
        return surprises[0]
    cap = SURPRISE_CAP
    # a NaN (weights gone bad; inputs are checked) fails s < cap and counts as the cap: loud, not silent
    capped = [s if s < cap else cap for s in surprises]
    any_one = max(capped) - math.log10(n)
    # fsum: exact, so the result does not depend on the order the channels come in
    x = _LN10 * math.fsum(capped)
    if x <= 0.0:
        return max(0.0, any_one)
    log_x, log_fact, exp = math.log(x), _log_factorials(n), math.exp
    # the sum of x^k / k! (k < n) without overflow: each term relative to the largest, at k = floor(x)
    top_k = min(n - 1, int(x))
    top = top_k * log_x - log_fact[top_k]
    total = sum([exp(k * log_x - log_fact[k] - top) for k in range(n)])
    return max(0.0, (x - top - math.log(total)) / _LN10, any_one)


_LOG_FACTORIALS = [0.0]  # log k!, k < its length


def _log_factorials(n: int) -> list[float]:
    """log k! for k < n at least; a longer table is built aside and then swapped in whole,
    so that a thread reading the old one never sees it half grown."""
    global _LOG_FACTORIALS
    table = _LOG_FACTORIALS
    if len(table) < n:
        table = list(table)
        while len(table) < n:
            table.append(table[-1] + math.log(len(table)))
        _LOG_FACTORIALS = table
    return table


def two_sided_surprise(z: float) -> float:
    """-log10 of the two-sided normal tail probability beyond ``|z|``.

    >>> round(two_sided_surprise(3.2905), 3), round(two_sided_surprise(-3.2905), 3)
    (3.0, 3.0)
    """
    return surprise(abs(z)) - _LOG10_2


_LOG10_2 = math.log10(2.0)


def score_of(surprise_value: float) -> float:
    """The [0, 1] score of a surprise: 1 - 10**-surprise.

    >>> round(score_of(3.0), 6)
    0.999
    """
    return -math.expm1(-surprise_value * _LN10)
