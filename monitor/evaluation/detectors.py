"""Detectors the harness compares, each turning a recording into one score per row.

Forewarn's own variants run through the very ``Pipeline`` the daemon uses; the
baselines are what people would otherwise pick, run on the same rows:

* ``zscore``        rolling z-score of each channel (River ``Rolling(Var)``), max over channels
* ``hst``           River ``HalfSpaceTrees`` behind a ``MinMaxScaler``, all channels as features
* ``pad-hw``        River ``PredictiveAnomalyDetection`` around ``HoltWinters`` (its squared error over
                    its threshold, uncapped: ``ErrorRatioPAD``), max over channels
* ``novelty``       how far a value lies beyond the range of its channel's last 4,000 values, as a
                    share of it, max over channels: a detector of new extremes, nothing else

Every detector skips a channel's non-finite values (gaps), as the pipeline does.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from river import anomaly, preprocessing, stats, time_series, utils

from monitor.checkpoint import Initialization
from monitor.pipeline import Pipeline, PipelineConfig
from monitor.readings import Reading
from monitor.scoring import RangeNovelty, ScoringConfig

NOVELTY_WINDOW = 4000  # readings; picked with the unit below on the even-indexed NAB series
NOVELTY_UNIT = 1 / 30_000

# rows -> (values [T, C], number of leading rows that are warm-up only, not scored)
ScoreFn = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class Detector:
    """A named scoring function: rows ``[T, C]`` in, one anomaly score per row out.

    >>> det = BASELINES["zscore"]
    >>> values = np.tile([[1.0, 5.0], [2.0, 6.0]], (30, 1))
    >>> values[50, 1] = 40.0  # a spike on the second channel only: the score is the worst channel's
    >>> scores = det.score(values, 0)
    >>> det.name, det.family, scores.shape, int(scores.argmax())
    ('zscore', 'baseline', (60,), 50)
    """

    name: str
    score: ScoreFn
    family: str = "baseline"
    notes: str = ""
    options: dict = field(default_factory=dict)


def forewarn_detector(name: str, init: Initialization, warmup: int = 256, adapt_steps: int | None = None,
                      notes: str = "", scoring: ScoringConfig | None = None, **pipeline_options) -> Detector:
    """Forewarn's ``Pipeline`` as a detector; ``pipeline_options`` are further ``PipelineConfig`` fields."""
    def score(values: np.ndarray, _skip: int) -> np.ndarray:
        adapt = init.adapt if adapt_steps is None else replace(init.adapt, steps=adapt_steps)
        pipe = Pipeline(init, PipelineConfig(warmup=warmup, adapt=adapt, scoring=scoring or ScoringConfig(),
                                             **pipeline_options))
        channels = [f"c{j}" for j in range(values.shape[1])]
        out = np.zeros(len(values))
        batch = 2000
        for start in range(0, len(values), batch):
            chunk = values[start:start + batch]
            readings = [Reading("series", float(start + i), {c: v for c, v in zip(channels, row) if math.isfinite(v)})
                        for i, row in enumerate(chunk.tolist())]
            for s in pipe.feed([r for r in readings if r.values]).scores:
                if s.surprise is not None:  # ranks like the score, without ties at 1.0
                    out[int(s.ts)] = s.surprise
        return out

    return Detector(name, score, "forewarn", notes)


def _zscore(values: np.ndarray, _skip: int, window: int = 100) -> np.ndarray:
    out = np.zeros(len(values))
    rolls = [utils.Rolling(stats.Var, window_size=window) for _ in range(values.shape[1])]
    means = [utils.Rolling(stats.Mean, window_size=window) for _ in range(values.shape[1])]
    for t, row in enumerate(values.tolist()):
        worst = 0.0
        for var, mean, x in zip(rolls, means, row):
            if not math.isfinite(x):  # a gap: one NaN in River's rolling sums would blind the channel for good
                continue
            if var.n >= 10:  # a spread from fewer values means little
                std = math.sqrt(max(var.get(), 0.0))
                if std > 0:
                    worst = max(worst, abs(x - mean.get()) / std)
            var.update(x)
            mean.update(x)
        out[t] = math.erf(worst / math.sqrt(2))
    return out


def _hst(values: np.ndarray, _skip: int) -> np.ndarray:
    model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(n_trees=25, height=10, window_size=250, seed=42)
    out = np.zeros(len(values))
    for t, row in enumerate(values.tolist()):
        x = {j: v for j, v in enumerate(row) if math.isfinite(v)}
        if x:
            out[t] = model.score_one(x)
            model.learn_one(x)
    return out


class ErrorRatioPAD(anomaly.PredictiveAnomalyDetection):
    """River's ``PredictiveAnomalyDetection`` scoring the squared error as a multiple of its threshold.

    River's own ``score_one`` caps the score at 1.0, so every error past the threshold ties with
    every other, and one corpus-wide threshold must flag all of them or none; and a channel whose
    errors are all zero (a constant one) scores 1.0 on every reading, since 0 >= 0.  Here a zero
    error scores 0, the ratio is not capped, and it counts only once the threshold has seen 10
    errors (the first one after the warm-up has a threshold of 0); the model, its threshold and
    their updates are River's.

    >>> pad = ErrorRatioPAD(time_series.HoltWinters(alpha=0.3, beta=0.1), horizon=1, warmup_period=5)
    >>> scores = []
    >>> for y in [2.0] * 30 + [9.0]:
    ...     scores.append(pad.score_one(None, y) if pad.iter >= 2 else 0.0)  # Holt-Winters needs two values
    ...     pad.learn_one(None, y)
    >>> scores[-2], scores[-1] > 1000  # River's own: 1.0 and 1.0
    (0.0, True)
    """

    def score_one(self, x: dict | None, y: float) -> float:
        squared_error = (self.predictive_model.forecast(self.horizon)[0] - y) ** 2
        threshold = self.dynamic_mae.get() + self.n_std * math.sqrt(self.dynamic_se_variance.get())
        if self.iter < self.warmup_period:
            return 0.0
        seen = self.dynamic_mae.n
        self.dynamic_mae.update(squared_error)
        self.dynamic_se_variance.update(squared_error)
        if seen < 10 or squared_error == 0:
            return 0.0
        # a channel flat until now has a threshold of ~0, so its first change scores very high, as
        # PAD's own threshold judges it; finite, so that an error past float range still ranks
        return min(squared_error / max(threshold, 1e-12), sys.float_info.max)


def _pad_holt_winters(values: np.ndarray, _skip: int) -> np.ndarray:
    models = [ErrorRatioPAD(time_series.HoltWinters(alpha=0.3, beta=0.1), horizon=1, n_std=3.0, warmup_period=50)
              for _ in range(values.shape[1])]
    out = np.zeros(len(values))
    for t, row in enumerate(values.tolist()):
        worst = 0.0
        for model, y in zip(models, row):
            if not math.isfinite(y):  # a gap: a NaN would stay in Holt-Winters' level for good
                continue
            if model.iter >= 2:  # Holt-Winters forecasts only after it has seen values
                worst = max(worst, model.score_one(None, y))
            model.learn_one(None, y)
        out[t] = worst
    return out


def _novelty(values: np.ndarray, _skip: int, window: int = NOVELTY_WINDOW) -> np.ndarray:
    """Forewarn's own range-novelty term alone (``monitor.scoring.RangeNovelty``), max over channels."""
    out = np.zeros(len(values))
    trackers = [RangeNovelty(unit=1.0, window=window) for _ in range(values.shape[1])]
    for t, row in enumerate(values.tolist()):
        out[t] = max((n.surprise_learn_one(x) for n, x in zip(trackers, row) if math.isfinite(x)), default=0.0)
    return out


BASELINES = {
    "zscore": Detector("zscore", _zscore, notes="rolling z-score, window 100"),
    "hst": Detector("hst", _hst, notes="River HalfSpaceTrees (25 trees, height 10, window 250) + MinMaxScaler"),
    "pad-hw": Detector("pad-hw", _pad_holt_winters, notes="River PredictiveAnomalyDetection + HoltWinters(0.3, 0.1)"),
    "novelty": Detector("novelty", _novelty, notes=f"range novelty alone: extension beyond the range of the last "
                                                   f"{NOVELTY_WINDOW} values, as a share of it"),
}
