import numpy as np
import pytest

from monitor.evaluation.point_metrics import (PA_K, average_precision, best_pointwise_f1, evaluate_scores, event_f1,
                                              point_adjust, pointwise_f1)

LABELS = np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0])


def test_point_adjustment_inflates_and_pa_k_limits_it():
    pred = np.zeros(12, dtype=np.int8)
    pred[2] = 1  # one point of the first 4-point segment
    assert pointwise_f1(pred, LABELS) == pytest.approx(2 / 7)           # tp 1, fn 5
    assert pointwise_f1(point_adjust(pred, LABELS), LABELS) == pytest.approx(8 / 10)  # tp 4, fn 2
    assert pointwise_f1(point_adjust(pred, LABELS, 20), LABELS) == pytest.approx(8 / 10)  # 25% > 20%
    assert pointwise_f1(point_adjust(pred, LABELS, 40), LABELS) == pytest.approx(2 / 7)  # 25% < 40%


def test_event_f1_is_point_precision_with_segment_recall():
    pred = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    # flagged points 0, 2, 11: precision 1/3; labelled segments: 1 of 2 found
    assert event_f1(pred, LABELS) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # flagging everything finds every segment but its precision is the label rate
    everything = np.ones(12, dtype=np.int8)
    assert event_f1(everything, LABELS) == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_best_pointwise_f1_and_average_precision():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.3, 0.1, 0.1, 0.6, 0.5, 0.55, 0.1])
    # ranked: P P P P N(0.55) P P(0.3) N ...; at 0.3: tp 6, fp 1, fn 0 -> F1 12/13 (0.6: 8/10, 0.5: 10/12)
    f1, threshold = best_pointwise_f1(scores, LABELS)
    assert (f1, threshold) == (pytest.approx(12 / 13), 0.3)
    # precision at each recall step: 1, 1, 1, 1, then 5/6 and 6/7
    assert average_precision(scores, LABELS) == pytest.approx(4 / 6 + (1 / 6) * (5 / 6) + (1 / 6) * (6 / 7))
    report = evaluate_scores(scores, LABELS)
    # at 0.6 one point in each segment is flagged and no negative: point adjustment makes it perfect
    assert report.pa_f1 == pytest.approx(1.0) and report.pointwise_f1 == pytest.approx(12 / 13)
    assert report.pa_k_f1[100] <= report.pa_k_f1[0]


def _brute_force(scores, labels):
    """Every metric at every distinct threshold, from the single-threshold definitions."""
    best = {"pointwise": 0.0, "event": 0.0, **{k: 0.0 for k in PA_K}}
    for th in np.unique(scores):
        pred = (scores >= th).astype(np.int8)
        best["pointwise"] = max(best["pointwise"], pointwise_f1(pred, labels))
        best["event"] = max(best["event"], event_f1(pred, labels))
        for k in PA_K:
            best[k] = max(best[k], pointwise_f1(point_adjust(pred, labels, k), labels))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_every_metric_is_at_its_best_over_every_distinct_threshold(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = np.zeros(n, dtype=np.int8)
    for start in rng.choice(n - 20, size=5, replace=False):
        labels[start:start + rng.integers(1, 15)] = 1
    scores = np.round(rng.normal(size=n) + 1.5 * labels * rng.random(n), 1)  # rounded: ties too
    report, best = evaluate_scores(scores, labels), _brute_force(scores, labels)
    assert report.pointwise_f1 == pytest.approx(best["pointwise"])
    assert report.event_f1 == pytest.approx(best["event"])
    assert [report.pa_k_f1[k] for k in PA_K] == pytest.approx([best[k] for k in PA_K])
    assert report.pa_k_f1[100] == pytest.approx(report.pointwise_f1)  # nothing is more than 100% flagged


def test_the_best_threshold_may_be_the_highest_score_of_a_long_series():
    """A quantile grid from the median up in steps of 0.5% cannot pick the top 3 of 2,000 rows."""
    labels = np.zeros(2000, dtype=np.int8)
    labels[1000:1003] = 1
    scores = np.linspace(0.0, 1.0, 2000)
    scores[1000:1003] = [2.0, 2.1, 2.2]
    report = evaluate_scores(scores, labels)
    assert report.event_f1 == report.pa_f1 == report.pa_k_auc == 1.0


@pytest.mark.parametrize("metric", [evaluate_scores, best_pointwise_f1, average_precision])
def test_scores_that_are_not_finite_are_refused(metric):
    # a NaN score would count as a threshold of its own: best_pointwise_f1 gave (0.8, nan)
    with pytest.raises(ValueError, match="finite"):
        metric(np.array([0.1, np.nan, 0.9]), np.array([0, 1, 1]))


@pytest.mark.parametrize("length, flagged, k", [(20, 11, 55), (25, 7, 28), (50, 7, 14)])
def test_pa_k_leaves_a_segment_flagged_at_exactly_k_percent(length, flagged, k):
    # exactly k percent is not more than k: a floating-point share adjusted these
    pred = np.r_[np.ones(flagged, dtype=int), np.zeros(length - flagged, dtype=int)]
    assert point_adjust(pred, np.ones(length, dtype=int), k=k).sum() == flagged
    assert point_adjust(pred, np.ones(length, dtype=int), k=k - 1).sum() == length


def test_pa_k_adjusts_a_segment_only_above_k_percent_flagged():
    # One point of a five-point segment is exactly 20% flagged: adjusted for K = 0, not for K = 20
    # (Kim et al.: strictly more than K%).  The negatives make flagging everything a poor threshold.
    scores = np.r_[0.9, np.full(4, 0.1), np.full(50, 0.1)]
    labels = np.r_[np.ones(5, dtype=int), np.zeros(50, dtype=int)]
    assert point_adjust((scores >= 0.9).astype(int), labels, k=20).tolist() == (scores >= 0.9).astype(int).tolist()
    report = evaluate_scores(scores, labels)
    assert report.pa_k_f1[0] == 1.0
    assert report.pa_k_f1[20] == pytest.approx(2 / 6)  # one true positive of five, no false one
    assert report.pa_k_f1[40] == pytest.approx(2 / 6)
