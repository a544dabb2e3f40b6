import decimal
import math
import random
from decimal import Decimal

import pytest

from monitor.scoring import SURPRISE_CAP, RangeNovelty, ResidualScorer, ScoringConfig, joint_surprise

LN10 = math.log(10.0)


def _exact_joint(surprises: list[float]) -> float:
    """Fisher's combination in 60-digit decimals: -log10 of exp(-x) * sum_{k<n} x^k / k!."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        x = Decimal(LN10) * sum(Decimal(min(s, SURPRISE_CAP)) for s in surprises)
        tail = (-x).exp() * sum(x ** k / math.factorial(k) for k in range(len(surprises)))
        return float(-tail.log10())


@pytest.mark.parametrize("surprises", [
    [3.0, 0.1], [3.0, 3.0], [1.0] * 5, [0.6] * 38, [1.0] * 38, [6.0] + [0.2] * 19, [1.5] * 20,
    [12.0, 9.0, 0.3, 0.0], [40.0] * 10, [math.inf, 0.0, 1e300], [0.01] * 1024, [2.0] * 1024, [50.0] * 1024,
])
def test_joint_surprise_is_the_stronger_of_fishers_and_bonferronis_methods(surprises):
    any_one = min(max(surprises), SURPRISE_CAP) - math.log10(len(surprises))
    exact = max(0.0, _exact_joint(surprises), any_one)
    assert joint_surprise(surprises) == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_joint_surprise_grows_with_every_channel_surprise():
    rng = random.Random(3)
    for _ in range(200):
        surprises = [rng.expovariate(1.0) * rng.choice([0.1, 1.0, 30.0]) for _ in range(rng.randint(2, 64))]
        raised = list(surprises)
        raised[rng.randrange(len(raised))] += 0.5
        assert joint_surprise(raised) >= joint_surprise(surprises)


def test_joint_surprise_does_not_depend_on_the_order_of_the_channels():
    rng = random.Random(3)
    for _ in range(200):
        surprises = [rng.expovariate(1.0) * rng.choice([0.1, 1.0, 30.0]) for _ in range(rng.randint(2, 40))]
        shuffled = rng.sample(surprises, len(surprises))
        assert joint_surprise(shuffled) == joint_surprise(surprises)


def test_range_novelty_without_a_window_range_gets_ready_whatever_its_block_size():
    """A stream restored from a snapshot taken with novelty off has no range: it must collect
    64 values first, across blocks when they are smaller than that."""
    for window in (0, 256, 4000):
        novelty = RangeNovelty(unit=0.01, window=window)
        for t in range(200):
            novelty.surprise_learn_one(math.sin(t / 4))
        assert novelty.ready
        assert novelty.surprise_learn_one(100.0) > 1000


def test_a_nan_surprise_counts_as_the_cap_loud_rather_than_silent():
    assert joint_surprise([math.nan, 0.4, 0.4]) == joint_surprise([SURPRISE_CAP, 0.4, 0.4])


def test_under_calibrated_channels_the_joint_score_flags_what_its_threshold_says():
    """With 38 well-calibrated channels (surprise = -log10 of a uniform draw) a threshold of
    0.999 should flag one reading in 1,000: the stronger of two tests, each flagging that,
    flags up to twice as many.  The worst channel alone flags 38 times as many."""
    rng = random.Random(7)
    n, channels = 40_000, 38
    joint_flags = worst_flags = 0
    for _ in range(n):
        surprises = [-math.log10(1.0 - rng.random()) for _ in range(channels)]
        joint_flags += joint_surprise(surprises) >= 3.0
        worst_flags += max(surprises) >= 3.0
    assert 0.001 < joint_flags / n < 0.0025
    assert 0.03 < worst_flags / n < 0.045


def test_one_absurd_channel_does_not_outvote_several_surprised_ones():
    quiet = [0.4] * 30
    one_absurd = joint_surprise([1e9, *quiet[:-1]])  # a channel flat in its warm-up that moved
    five_surprised = joint_surprise([20.0] * 5 + quiet[:-5])
    assert five_surprised > one_absurd >= joint_surprise([SURPRISE_CAP, *quiet[:-1]])


def test_a_single_channel_keeps_its_own_surprise_uncapped():
    assert joint_surprise([1234.5]) == 1234.5


@pytest.mark.parametrize("options", [{}, {"smoothing_span": 9}, {"calibration_fading": 0.002, "smoothing_span": 3}])
def test_score_one_gives_the_score_learning_would_give_without_learning(options):
    """score_one ignored smoothing: with a span it gave the raw score (1.000000), the hot path
    its average (0.999773)."""
    from monitor.scoring import score_of
    rng = random.Random(3)
    scorer = ResidualScorer(ScoringConfig(**options))
    for _ in range(300):
        scorer.learn_one(rng.gauss(0, 1))
    for residual in (0.1, 2.5, 8.0):
        before = scorer.state()
        scored = scorer.score_one(residual)
        assert scorer.state() == before  # nothing learnt
        assert scored == score_of(scorer.surprise_learn_one(residual)), (options, residual)


def test_smoothing_averages_capped_surprises_so_one_absurd_residual_fades_within_readings():
    scorer = ResidualScorer(ScoringConfig(smoothing_span=9))
    for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 50:
        scorer.learn_one(r)
    before = scorer.smoothed
    after_spike = scorer.surprise_learn_one(1e6)  # uncapped: a surprise of ~1e13
    assert after_spike <= before + 0.2 * SURPRISE_CAP + 1e-9
    for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 3:
        later = scorer.surprise_learn_one(r)
    assert later < 3.0  # 18 readings on, no longer an alarm


def test_an_unknown_channel_combination_is_refused():
    with pytest.raises(ValueError, match="channel_combination must be one of joint, max"):
        ScoringConfig(channel_combination="mean")


def test_a_long_run_of_absurd_residuals_leaves_stage_1_finite_and_sighted():
    """Winsorizing bounds what one reading teaches, not a run: at the clip every reading
    widened the spread ~7% until its variance overflowed to inf after ~5,000 readings of a
    library caller's 1e160 (scaled), and from then on every z was 0 (blind for good) and
    the device's snapshot could not be written."""
    scorer = ResidualScorer()
    for r in [0.1, -0.2, 0.05, 0.15, -0.1, 0.0] * 50:
        scorer.learn_one(r)
    for _ in range(6000):
        scorer.surprise_learn_one(1e160)
    assert all(math.isfinite(v) for v in scorer.state())
    assert scorer.surprise_learn_one(-1e160) > 3   # still sees a move of the same size


def test_the_surprise_does_not_step_down_where_erfc_gives_way_to_its_asymptotic_form():
    from monitor.scoring import surprise
    below = math.nextafter(37.0, 0.0)
    assert surprise(below) <= surprise(37.0) <= surprise(math.nextafter(37.0, 38.0))
    assert surprise(math.inf) == math.inf
