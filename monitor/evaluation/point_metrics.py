"""Detection metrics for point-labelled data (SMD and its train/test/test_label layout).

Point-adjusted F1 marks a whole labelled segment detected as soon as one of its
points is flagged, which rewards even random scores on SMD; it is reported only
next to the metrics that do not inflate: point-wise F1, event-wise F1, PA%K
(Kim et al., AAAI 2022: a segment is adjusted only when more than K% of its
points are flagged) and the area under the precision-recall curve.  Each is
reported at its own best threshold (an oracle threshold, as the SMD literature
does): these numbers rank detectors, they are not what a fixed threshold gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PA_K = (0, 20, 40, 60, 80, 100)


def segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) runs of 1s.

    >>> segments(np.array([0, 1, 1, 0, 1]))
    [(1, 2), (4, 4)]
    """
    padded = np.concatenate([[0], np.asarray(labels, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def point_adjust(pred: np.ndarray, labels: np.ndarray, k: float = 0.0) -> np.ndarray:
    """PA%K: a labelled segment with more than ``k`` percent of its points flagged
    (any point, for k = 0) counts as flagged throughout.

    >>> point_adjust(np.array([0, 1, 0, 0, 0]), np.array([1, 1, 1, 1, 0]), k=20).tolist()
    [1, 1, 1, 1, 0]
    >>> point_adjust(np.array([0, 1, 0, 0, 0]), np.array([1, 1, 1, 1, 0]), k=50).tolist()
    [0, 1, 0, 0, 0]
    """
    out = np.asarray(pred, dtype=np.int8).copy()
    for a, b in segments(labels):
        # counted, not averaged: a segment flagged at exactly k percent (11 of 20 at k = 55)
        # must stay unadjusted, which a floating-point share can miss
        if int(out[a:b + 1].sum()) * 100 > k * (b - a + 1):
            out[a:b + 1] = 1
    return out


def pointwise_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    pred = np.asarray(pred, dtype=bool)
    labels = np.asarray(labels, dtype=bool)
    tp = int((pred & labels).sum())
    return f1(tp, int((pred & ~labels).sum()), int((~pred & labels).sum()))


def event_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Event-wise (composite) F1 of Garg et al. (2021): point-wise precision with
    event-wise recall, the share of labelled segments with at least one flagged
    point.  Counting flagged *runs* as events instead would let one flag over the
    whole series score a perfect 1.

    >>> event_f1(np.array([1, 0, 0, 1, 1, 0]), np.array([0, 0, 0, 1, 0, 0]))
    0.5
    """
    pred = np.asarray(pred, dtype=bool)
    labels = np.asarray(labels, dtype=np.int8)
    true_segs = segments(labels)
    flagged = int(pred.sum())
    if not true_segs or flagged == 0:
        return 0.0
    precision = float((pred & labels.astype(bool)).sum()) / flagged
    recall = sum(bool(pred[a:b + 1].any()) for a, b in true_segs) / len(true_segs)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _finite(scores) -> np.ndarray:
    """Scores as floats, refused if any is NaN or infinite: no threshold is NaN, so a NaN
    score would otherwise count as a threshold of its own."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (a warm-up row scores as low as the detector allows, not NaN)")
    return scores


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(thresholds, tp, fp) at every distinct score, highest first, and the number of positives."""
    scores = _finite(scores)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of equal scores
    return s[last], np.cumsum(y)[last], np.cumsum(~y)[last], int(labels.sum())


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as average precision).

    >>> average_precision(np.array([0.9, 0.8, 0.1, 0.7]), np.array([1, 0, 0, 1]))
    0.8333333333333333
    """
    precision, recall = precision_recall_curve(scores, labels)
    if np.asarray(labels).sum() == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_pointwise_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The best point-wise F1 over every threshold, and that threshold."""
    thresholds, tp, fp, positives = _ranked_counts(scores, labels)
    f1s = np.where(tp > 0, 2 * tp / np.maximum(tp + fp + positives, 1), 0.0)
    i = int(np.argmax(f1s))
    return float(f1s[i]), float(thresholds[i])


@dataclass
class DetectionReport:
    """Every metric of one score series against its labels, each at its own best threshold.

    >>> r = evaluate_scores(np.array([0.9, 0.1, 0.2, 0.1]), np.array([1, 1, 0, 0]))
    >>> {k: round(f, 2) for k, f in r.pa_k_f1.items()}  # the segment is half flagged: adjusted up to K = 40
    {0: 1.0, 20: 1.0, 40: 1.0, 60: 0.67, 80: 0.67, 100: 0.67}
    >>> round(r.pa_k_auc, 3), r.auprc
    (0.833, 0.75)
    """

    pointwise_f1: float
    event_f1: float
    pa_f1: float
    pa_k_f1: dict[int, float]      # K -> F1 (best threshold per K)
    pa_k_auc: float                 # mean F1 over K = 0..100 (trapezoid)
    auprc: float


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> DetectionReport:
    """Every metric, each at its own best threshold over every distinct score (an oracle
    threshold, as the SMD literature reports it; say so wherever it is shown).

    >>> r = evaluate_scores(np.array([0.9, 0.1, 0.2, 0.1]), np.array([1, 1, 0, 0]))
    >>> r.pointwise_f1, r.event_f1, r.pa_f1, r.pa_k_f1[60]
    (0.6666666666666666, 1.0, 1.0, 0.6666666666666666)
    """
    scores = _finite(scores)
    labels = np.asarray(labels, dtype=np.int8)
    thresholds = np.unique(scores)[::-1]  # pred = scores >= threshold, highest first
    flagged = _at_or_above(scores, thresholds)
    anomalous = labels.astype(bool)
    tp = _at_or_above(scores[anomalous], thresholds)
    fp, positives = flagged - tp, int(anomalous.sum())
    runs = segments(labels)
    lengths = np.array([b - a + 1 for a, b in runs], dtype=np.int64)
    # each segment's scores, highest first: the m-th is the lowest threshold at which m are flagged
    ranked = [np.sort(scores[a:b + 1])[::-1] for a, b in runs]
    point_of = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]) if runs else np.zeros(0, np.int64)
    segment_scores = np.concatenate([scores[a:b + 1] for a, b in runs]) if runs else np.zeros(0)

    def adjusted_f1(k: int) -> float:
        """PA%K: a segment with more than k% of its points flagged counts whole.  It is adjusted at
        every threshold up to its m-th highest score, m = floor(k * length / 100) + 1, and then its
        points count as its length instead of those flagged (flagged while both hold)."""
        need = (k * lengths) // 100 + 1
        reach = np.array([r[m - 1] if m <= len(r) else -np.inf for r, m in zip(ranked, need)])
        whole = _weighted_at_or_above(reach, lengths, thresholds)
        counted = _at_or_above(np.minimum(segment_scores, reach[point_of]), thresholds)
        return _best_f1(tp + whole - counted, fp, positives)

    found = _at_or_above(np.array([r[0] for r in ranked]), thresholds)  # segments with a flagged point
    precision = np.where(flagged > 0, tp / np.maximum(flagged, 1), 0.0)
    recall = found / max(len(runs), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        event = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    pa_k = {k: adjusted_f1(k) for k in PA_K}
    f1s = [pa_k[k] for k in PA_K]
    auc = sum((f1s[i] + f1s[i + 1]) / 2 * (PA_K[i + 1] - PA_K[i]) for i in range(len(PA_K) - 1)) / 100.0
    return DetectionReport(_best_f1(tp, fp, positives), float(event.max()) if runs else 0.0, pa_k[0], pa_k, auc,
                           average_precision(scores, labels))


def _at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``values`` are >= each threshold."""
    ordered = np.sort(values)
    return len(ordered) - np.searchsorted(ordered, thresholds, side="left")


def _weighted_at_or_above(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The summed ``weights`` of the ``values`` >= each threshold."""
    order = np.argsort(values)
    cumulative = np.r_[0, np.cumsum(weights[order])]
    return cumulative[-1] - cumulative[np.searchsorted(values[order], thresholds, side="left")]


def _best_f1(tp: np.ndarray, fp: np.ndarray, positives: int) -> float:
    f1s = np.where(tp > 0, 2 * tp / np.maximum(tp + fp + positives, 1), 0.0)
    return float(f1s.max()) if len(f1s) else 0.0


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Point-wise (precision, recall) at every distinct threshold, highest threshold first."""
    _, tp, fp, positives = _ranked_counts(scores, labels)
    return tp / (tp + fp), tp / max(positives, 1)
