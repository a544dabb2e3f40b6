"""Anomaly scores from forecast residuals, one small River-style object per stream.

A residual is standardized by River's exponentially weighted mean and variance
of the stream's own past residuals, and the two-sided normal tail turns it into
a score in [0, 1]: 0.999 means a residual as far out as 1 in 1,000 normal
residuals.  Beside it goes the *surprise*, -log10 of that tail probability
(3 for a score of 0.999): the same order, but without the ties a [0, 1] float
has past |z| ~ 8.3, where every score rounds to 1.0, so the worst anomalies
can still be ranked.  What the statistics learn is winsorized at ``learn_clip`` standard
deviations, so one huge anomaly does not widen the band enough to hide the next.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from river import stats

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class ScoringConfig:
    """How residuals become scores.

    >>> ScoringConfig().threshold
    0.999
    """

    fading_factor: float = 0.01   # weight of the newest residual (about 1/fading_factor readings of memory)
    threshold: float = 0.999      # a score at or above it flags an anomaly
    min_std: float = 0.05         # floor on the residual spread, in scaled units
    learn_clip: float = 4.0       # residuals are clipped to this many stds before learning

    def __post_init__(self) -> None:
        if not 0 < self.fading_factor <= 1:
            raise ValueError(f"fading_factor must be in (0, 1], got {self.fading_factor}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.min_std <= 0 or self.learn_clip <= 0:
            raise ValueError("min_std and learn_clip must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualScorer:
    """Scores one stream's residuals against their own running statistics.

    >>> scorer = ResidualScorer()
    >>> for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 20:
    ...     scorer.learn_one(r)
    >>> round(scorer.score_one(0.02), 2)
    0.09
    >>> scorer.score_one(3.0) > ScoringConfig().threshold
    True
    """

    __slots__ = ("config", "_mean", "_var", "_min_var")

    def __init__(self, config: ScoringConfig | None = None) -> None:
        self.config = config or ScoringConfig()
        self._min_var = self.config.min_std ** 2
        self._mean = stats.EWMean(self.config.fading_factor)
        self._var = stats.EWVar(self.config.fading_factor)

    def _std(self) -> float:
        var = self._var.get()
        return math.sqrt(var) if var > self._min_var else self.config.min_std

    def score_one(self, residual: float) -> float:
        """Score in [0, 1]: the two-sided normal probability mass inside ``|z|``."""
        z = (residual - self._mean.get()) / self._std()
        return math.erf(abs(z) * _INV_SQRT2)

    def learn_one(self, residual: float) -> None:
        self.surprise_learn_one(residual)

    def surprise_learn_one(self, residual: float) -> float:
        """The surprise of ``residual``, then learn it: the per-reading hot path."""
        mean = self._mean.get()
        std = self._std()
        z = (residual - mean) / std
        clip = self.config.learn_clip
        if abs(z) > clip:
            residual = mean + math.copysign(clip * std, z)
        self._mean.update(residual)
        self._var.update(residual)
        return surprise(z)


_LN10 = math.log(10.0)
_LOG10_SQRT_2PI = math.log10(math.sqrt(2 * math.pi))


def surprise(z: float) -> float:
    """-log10 of the two-sided normal tail probability beyond ``|z|``.

    >>> round(surprise(3.2905), 3), round(surprise(10.0), 2), round(surprise(50.0), 1)
    (3.0, 22.82, 544.7)
    """
    a = abs(z)
    if a < 37.0:
        return -math.log10(math.erfc(a * _INV_SQRT2))
    # erfc underflows: its asymptotic form, 2 phi(a) / a, exact to ~1e-3 here
    return (a * a / 2) / _LN10 + math.log10(a) + _LOG10_SQRT_2PI - math.log10(2.0)


def score_of(surprise_value: float) -> float:
    """The [0, 1] score of a surprise: 1 - 10**-surprise.

    >>> round(score_of(3.0), 6)
    0.999
    """
    return -math.expm1(-surprise_value * _LN10)
