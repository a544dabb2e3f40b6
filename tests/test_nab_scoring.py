"""NAB scoring against cases computed by hand from NAB's rules.

Series of 100 rows at t = 0..99; probation = floor(0.15 * 100) = 15 rows; one
window over rows 40..49 (width 10).  Constants: the sigmoid reward at the left
edge is 2/(1+e^-5) - 1 = 0.986614 (NAB's maxTP).
"""
import pytest

from monitor.evaluation.nab import PROFILES, normalized_at, score_by_threshold, score_corpus, sweep_rows

T = [float(t) for t in range(100)]
WINDOW = [(40.0, 49.0)]


def detections(*rows):
    return [1.0 if i in rows else 0.0 for i in range(100)]


def score_at(threshold, scores, profile="standard"):
    rows = sweep_rows(T, scores, WINDOW, "s", PROFILES[profile])
    return next(s.score for s in score_by_threshold(rows, PROFILES[profile]) if s.threshold == threshold)


def test_detection_at_the_left_edge_of_the_window_is_a_full_true_positive():
    assert score_at(1.0, detections(40)) == pytest.approx(1.0)
    corpus = score_corpus({"s": (T, detections(40))}, {"s": WINDOW})
    assert corpus.normalized == pytest.approx(100.0)


def test_detection_halfway_inside_the_window():
    # position -(49 - 45 + 1) / 10 = -0.5: (2/(1+e^-2.5) - 1) / 0.986614 = 0.848284 / 0.986614
    assert score_at(1.0, detections(45)) == pytest.approx(0.859793, abs=1e-5)
    assert score_corpus({"s": (T, detections(45))}, {"s": WINDOW}).normalized == pytest.approx(92.98965, abs=1e-3)


def test_only_the_earliest_detection_in_a_window_counts():
    # row 42: position -0.8 -> (2/(1+e^-4) - 1) / 0.986614 = 0.964028 / 0.986614
    assert score_at(1.0, detections(42, 47)) == pytest.approx(0.977107, abs=1e-5)


def test_detection_before_the_window_is_a_false_positive_and_the_window_a_miss():
    # no window before row 30: full false-positive cost 0.11; the missed window -1
    assert score_at(1.0, detections(30)) == pytest.approx(-1.11)
    assert score_at(1.0, detections(30), "reward_low_FP") == pytest.approx(-1.22)
    assert score_at(1.0, detections(30), "reward_low_FN") == pytest.approx(-2.11)
    # the best threshold is then "detect nothing": the null score, normalized 0
    assert score_corpus({"s": (T, detections(30))}, {"s": WINDOW}).normalized == pytest.approx(0.0)


def test_detection_after_the_window_costs_less_the_closer_it_is():
    # row 55: position |49 - 55| / (10 - 1) = 0.6667 -> 2/(1+e^3.3333) - 1 = -0.931109, times 0.11
    assert score_at(1.0, detections(55)) == pytest.approx(-1.0 - 0.102422, abs=1e-5)
    assert score_at(1.0, detections(50)) > score_at(1.0, detections(55)) > score_at(1.0, detections(90))
    # three window widths after the window the cost is the full 0.11
    assert score_at(1.0, detections(79)) == pytest.approx(-1.11)


def test_the_probationary_period_is_not_scored():
    rows = sweep_rows(T, detections(5), WINDOW, "s", PROFILES["standard"])
    assert len(rows) == 85 and all(r.anomaly_score == 0.0 for r in rows)  # the detection is not scored
    early_window = {"s": [(2.0, 8.0)]}
    rows = sweep_rows(T, detections(), early_window["s"], "s", PROFILES["standard"])
    assert len(rows) == 85 and all(r.window is None for r in rows)


def test_one_threshold_for_the_whole_corpus():
    # series a flags its window start at 0.9; series b has a false positive at 0.95:
    # at 0.95 only b's FP (-0.11, two misses); at 0.9 both (a's window found)
    a = [0.9 if i == 40 else 0.1 for i in range(100)]
    b = [0.95 if i == 20 else 0.1 for i in range(100)]
    corpus = score_corpus({"a": (T, a), "b": (T, b)}, {"a": WINDOW, "b": [(60.0, 69.0)]})
    assert corpus.threshold == pytest.approx(0.9)
    assert corpus.raw == pytest.approx(1.0 - 0.11 - 1.0)
    assert corpus.null == -2.0 and corpus.perfect == 2.0
    assert corpus.normalized == pytest.approx(100 * (1.0 - 0.11 - 1.0 + 2.0) / 4.0)


def test_a_fixed_threshold_scores_what_flags_at_it_not_the_best():
    # the corpus above at a threshold chosen elsewhere: 0.92 keeps b's false positive and loses
    # a's detection; 0.5 flags both; above every score, nothing flags (the null score)
    a = [0.9 if i == 40 else 0.1 for i in range(100)]
    b = [0.95 if i == 20 else 0.1 for i in range(100)]
    results, windows = {"a": (T, a), "b": (T, b)}, {"a": WINDOW, "b": [(60.0, 69.0)]}
    assert score_corpus(results, windows, threshold=0.92).raw == pytest.approx(-0.11 - 2.0)
    assert score_corpus(results, windows, threshold=0.9).raw == pytest.approx(1.0 - 0.11 - 1.0)
    assert score_corpus(results, windows, threshold=0.5).raw == pytest.approx(1.0 - 0.11 - 1.0)
    at_none = score_corpus(results, windows, threshold=2.0)
    assert (at_none.raw, at_none.normalized, at_none.threshold) == (-2.0, 0.0, 2.0)
    # a threshold at or under every score flags every row after probation
    everything = score_corpus(results, windows, threshold=0.0)
    assert everything.raw < score_corpus(results, windows, threshold=0.5).raw
    thresholds = [0.0, 0.5, 0.9, 0.92, 2.0]
    assert normalized_at(results, windows, "standard", thresholds) == pytest.approx(
        [score_corpus(results, windows, threshold=t).normalized for t in thresholds])


def test_a_window_inside_the_probation_period_counts_toward_perfect_as_nab_counts_it():
    """NAB's runner: the perfect score counts every window of the label file, the null score only
    those that can be scored; a perfect detector of the other windows scores 66.67, not 100."""
    ts = [float(t) for t in range(100)]
    results = {"a": (ts, [1.0 if t == 40 else 0.0 for t in range(100)]), "b": (ts, [0.0] * 100)}
    windows = {"a": [(40.0, 49.0)], "b": [(2.0, 8.0)]}  # b's window lies in its first 15 rows
    assert score_corpus(results, windows).normalized == pytest.approx(200 / 3)
    assert score_corpus({"b": results["b"]}, {"b": windows["b"]}).normalized == 0.0


def test_scores_that_are_not_finite_are_refused_not_swept_forever():
    with pytest.raises(ValueError, match="a: scores must be finite"):
        score_corpus({"a": ([0.0, 1.0, 2.0], [0.1, float("nan"), 0.2])}, {"a": []})
