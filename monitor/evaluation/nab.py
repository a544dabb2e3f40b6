"""The Numenta Anomaly Benchmark score, implemented from NAB's published rules.

Per series: the first ``min(floor(0.15 N), 750)`` rows are a probationary period
and are not scored.  Each labelled window rewards its *earliest* detection by a
scaled sigmoid of where it falls (an early detection earns nearly the full true
positive weight, one at the right edge almost nothing); a window without any
detection costs the false-negative weight; a detection outside every window
costs the false-positive weight, less when it comes shortly after a window.
The threshold on the anomaly score is one per profile for the whole corpus,
the one that maximizes the corpus total, and the total is normalized so the
null detector (no detection) scores 0 and the perfect one 100.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    """The weights of a true positive, a false positive and a missed window in NAB's score.

    >>> PROFILES["reward_low_FP"]
    Profile(tp=1.0, fp=0.22, fn=1.0)
    >>> # a flag before any window costs the profile's full false-positive weight
    >>> [sweep_rows(range(10), [0.0] * 10, [], "s", PROFILES[p])[0].worth for p in ("standard", "reward_low_FP")]
    [-0.11, -0.22]
    """

    tp: float
    fp: float
    fn: float


PROFILES = {
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP": Profile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN": Profile(tp=1.0, fp=0.11, fn=2.0),
}
PROBATION_SHARE = 0.15
PROBATION_CAP = 750  # 0.15 of 5,000 rows


def probation_length(n_rows: int) -> int:
    """Rows at the start of a series that are never scored.

    >>> probation_length(1000), probation_length(22695)
    (150, 750)
    """
    return int(min(math.floor(PROBATION_SHARE * n_rows), PROBATION_SHARE * 5000))


def scaled_sigmoid(position: float) -> float:
    """NAB's reward curve: ~0.987 at a window's left edge (-1), 0 at its right edge
    (0), toward -1 for positions after it; -1 from 3 window widths on.

    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), scaled_sigmoid(3.01)
    (0.98661, 0.0, -1.0)
    """
    if position > 3.0:  # as NAB's sweeper: at exactly 3 the curve's own value, -0.9999994
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


@dataclass
class ScoredRow:
    """One scorable row: its detector score, what a detection there is worth, its window.

    >>> rows = sweep_rows(range(10), [0.0] * 10, [(6, 8)], "s", PROFILES["standard"])
    >>> len(rows)  # the first row is probation
    9
    >>> [(round(r.worth, 2), r.window) for r in rows[-4:]]  # earlier in the window is worth more
    [(1.0, 's|6'), (0.94, 's|6'), (0.69, 's|6'), (-0.09, None)]
    """

    anomaly_score: float
    worth: float
    window: str | None


def sweep_rows(timestamps: Sequence[float], scores: Sequence[float], windows: Sequence[tuple[float, float]],
               name: str, profile: Profile) -> list[ScoredRow]:
    """Rows after probation with the weighted value of a detection at each."""
    ts = np.asarray(timestamps, dtype=np.float64)
    n = len(ts)
    if len(scores) != n:
        raise ValueError(f"{name}: {n} timestamps but {len(scores)} scores")
    if not np.isfinite(np.asarray(scores, dtype=np.float64)).all():  # a NaN threshold would never be passed
        raise ValueError(f"{name}: scores must be finite")
    # window -> inclusive row range; a window is entered at its first row
    spans = []
    for start, end in sorted(windows):
        left = int(np.searchsorted(ts, start, side="left"))
        right = int(np.searchsorted(ts, end, side="right")) - 1
        if left <= right:
            spans.append((left, right, f"{name}|{start}"))
    owner: list[tuple[int, int, str] | None] = [None] * n
    for span in spans:
        for i in range(span[0], span[1] + 1):
            owner[i] = span
    probation = probation_length(n)
    rows = []
    prev_right = prev_width = None
    for i in range(n):
        span = owner[i]
        if span is not None:
            left, right, window = span
            width = right - left + 1
            worth = scaled_sigmoid(-(right - i + 1) / width) * profile.tp / MAX_TP
            if i == right:
                prev_right, prev_width = right, width
        else:
            window = None
            if prev_right is None:  # no window before it: a false positive at full weight
                worth = -profile.fp
            else:
                worth = scaled_sigmoid(abs(prev_right - i) / max(prev_width - 1, 1)) * profile.fp
        if i >= probation:
            rows.append(ScoredRow(float(scores[i]), worth, window))
    return rows


@dataclass(frozen=True)
class ThresholdScore:
    """The corpus total when every row scoring at least ``threshold`` is a detection.

    >>> rows = [ScoredRow(0.9, 0.5, "w"), ScoredRow(0.7, -0.11, None), ScoredRow(0.2, 0.9, "w")]
    >>> for s in score_by_threshold(rows, PROFILES["standard"]):  # the window's earliest row scores lowest
    ...     print(s)
    ThresholdScore(threshold=0.9, score=0.5, tp=1, fp=0)
    ThresholdScore(threshold=0.7, score=0.39, tp=1, fp=1)
    ThresholdScore(threshold=0.2, score=0.79, tp=2, fp=1)
    """

    threshold: float
    score: float
    tp: int
    fp: int


def score_by_threshold(rows: Sequence[ScoredRow], profile: Profile) -> list[ThresholdScore]:
    """The total score for every distinct threshold (detection: score >= threshold), highest first.

    Only a window's earliest detection counts: a window's value is the largest
    worth among its detections, and worth falls with position in the window.
    """
    ordered = sorted(rows, key=lambda r: r.anomaly_score, reverse=True)
    parts = {r.window: -profile.fn for r in rows if r.window is not None}
    fp_total = 0.0
    window_total = sum(parts.values())
    out = []
    tp = fp = 0
    i = 0
    while i < len(ordered):
        threshold = ordered[i].anomaly_score
        while i < len(ordered) and ordered[i].anomaly_score == threshold:
            row = ordered[i]
            if row.window is None:
                fp += 1
                fp_total += row.worth
            else:
                tp += 1
                if row.worth > parts[row.window]:
                    window_total += row.worth - parts[row.window]
                    parts[row.window] = row.worth
            i += 1
        out.append(ThresholdScore(threshold, window_total + fp_total, tp, fp))
    return out


@dataclass(frozen=True)
class CorpusScore:
    """A detector's NAB total over a corpus at one threshold, with the null and perfect totals.

    >>> CorpusScore("standard", threshold=0.9, raw=0.5, null=-1.0, perfect=1.0).normalized
    75.0
    >>> CorpusScore("standard", threshold=math.inf, raw=-1.0, null=-1.0, perfect=1.0).normalized  # no detection
    0.0
    """

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float

    @property
    def normalized(self) -> float:
        if self.perfect == self.null:  # no window at all: nothing to find, nothing found
            return 0.0
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


def _corpus_rows(results, windows, profile: Profile) -> tuple[list[ScoredRow], float, float]:
    """The scored rows of a corpus with its null and perfect totals."""
    rows: list[ScoredRow] = []
    for name, (timestamps, scores) in results.items():
        rows.extend(sweep_rows(timestamps, scores, windows.get(name, ()), name, profile))
    # as NAB's runner: the null score counts the windows that can be scored (a window wholly in
    # probation is nobody's miss), the perfect score every window of the label file
    n_windows = len({r.window for r in rows if r.window is not None})
    null = -profile.fn * n_windows
    perfect = profile.tp * sum(len(windows.get(name, ())) for name in results)
    return rows, null, perfect


def _total_at(by_threshold: Sequence[ThresholdScore], threshold: float, null: float) -> float:
    """What flags at ``threshold`` is what flags at the lowest score reaching it (highest first)."""
    reached = [t for t in by_threshold if t.threshold >= threshold]
    return reached[-1].score if reached else null


def score_corpus(results: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 windows: Mapping[str, Sequence[tuple[float, float]]],
                 profile_name: str = "standard", threshold: float | None = None) -> CorpusScore:
    """NAB score of a detector over a corpus: ``results[name] = (timestamps, scores)``.

    The threshold is the one that maximizes the corpus total (one per profile,
    as NAB chooses it, on the labels it scores); with no detection at all the
    score is the null score.  ``threshold`` fixes it instead: an operating point
    chosen on other data, as a deployment would run (detection: score >= it).
    """
    profile = PROFILES[profile_name]
    rows, null, perfect = _corpus_rows(results, windows, profile)
    by_threshold = score_by_threshold(rows, profile)
    if threshold is not None:
        return CorpusScore(profile_name, threshold, _total_at(by_threshold, threshold, null), null, perfect)
    best = max(by_threshold, key=lambda s: s.score, default=None)
    if best is None or best.score < null:
        return CorpusScore(profile_name, math.inf, null, null, perfect)
    return CorpusScore(profile_name, best.threshold, best.score, null, perfect)


def normalized_at(results: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  windows: Mapping[str, Sequence[tuple[float, float]]], profile_name: str,
                  thresholds: Sequence[float]) -> list[float]:
    """The normalized score at each of these fixed thresholds: ``score_corpus(..., threshold=t)``
    for every ``t``, from one sweep of the corpus."""
    profile = PROFILES[profile_name]
    rows, null, perfect = _corpus_rows(results, windows, profile)
    by_threshold = score_by_threshold(rows, profile)
    return [CorpusScore(profile_name, t, _total_at(by_threshold, t, null), null, perfect).normalized
            for t in thresholds]
