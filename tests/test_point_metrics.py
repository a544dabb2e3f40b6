import numpy as np
import pytest

from monitor.evaluation.point_metrics import (average_precision, best_pointwise_f1, evaluate_scores, event_f1,
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
