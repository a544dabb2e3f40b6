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
        hit = out[a:b + 1].mean() * 100
        if (k == 0 and hit > 0) or (k > 0 and hit > k):
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


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(thresholds, tp, fp) at every distinct score, highest first, and the number of positives."""
    scores = np.asarray(scores, dtype=np.float64)
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
    pointwise_f1: float
    event_f1: float
    pa_f1: float
    pa_k_f1: dict[int, float]      # K -> F1 (best threshold per K)
    pa_k_auc: float                 # mean F1 over K = 0..100 (trapezoid)
    auprc: float


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, n_thresholds: int = 100) -> DetectionReport:
    """Every metric, each at its own best threshold from a quantile grid (an oracle
    threshold, as the SMD literature reports it; say so wherever it is shown)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int8)
    thresholds = np.unique(np.quantile(scores, np.linspace(0.5, 1.0, n_thresholds)))
    best_event = 0.0
    best_pa = {k: 0.0 for k in PA_K}
    for th in thresholds:
        pred = (scores >= th).astype(np.int8)
        best_event = max(best_event, event_f1(pred, labels))
        for k in PA_K:
            best_pa[k] = max(best_pa[k], pointwise_f1(point_adjust(pred, labels, k), labels))
    f1s = [best_pa[k] for k in PA_K]
    auc = sum((f1s[i] + f1s[i + 1]) / 2 * (PA_K[i + 1] - PA_K[i]) for i in range(len(PA_K) - 1)) / 100.0
    return DetectionReport(best_pointwise_f1(scores, labels)[0], best_event, best_pa[0], best_pa, auc,
                           average_precision(scores, labels))


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Point-wise (precision, recall) at every distinct threshold, highest threshold first."""
    _, tp, fp, positives = _ranked_counts(scores, labels)
    return tp / (tp + fp), tp / max(positives, 1)
