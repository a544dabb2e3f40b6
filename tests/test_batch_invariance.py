"""Scores do not depend on how readings are cut into batches, whatever the options.

The daemon's batches are whatever a Kafka poll returns, and ``replay`` cuts files its own
way: the same readings must get the same verdicts either way.  Hypothesis draws fleets
of devices whose channels come and go at their own pace, with faults, bad values and
duplicate timestamps and level shifts, and a way of cutting them into batches; every scoring and
adaptation option is checked against feeding the whole stream at once.  The same holds
when the devices move to a new pipeline between two batches (a restart, a rebalance).
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.adapt import AdaptConfig
from monitor.checkpoint import Initialization
from monitor.forecaster import LSTMSpec
from monitor.pipeline import Pipeline, PipelineConfig
from monitor.readings import Reading
from monitor.scoring import ScoringConfig

INIT = Initialization.random(LSTMSpec(hidden=8), seed=0, adapt=AdaptConfig(steps=2, lr=0.05))
WARMUP = 16

OPTIONS = {
    "default": {},
    "max": dict(scoring=ScoringConfig(channel_combination="max")),
    "calibrated, novelty, peaks": dict(scoring=ScoringConfig(calibration_fading=0.002, novelty_unit=0.01,
                                                             novelty_window=32, peak_window=8)),
    "smoothed": dict(scoring=ScoringConfig(smoothing_span=5)),
    "drift": dict(drift_threshold=2.0, drift_window=16),
    "online": dict(online_every=3, online_window=16),
    "online, max": dict(online_every=3, online_window=16, scoring=ScoringConfig(channel_combination="max")),
}

channel_plan = st.tuples(st.integers(1, 3), st.integers(0, 30))  # (reports every k-th tick, from tick s)
device_plan = st.lists(channel_plan, min_size=1, max_size=3)


@st.composite
def fleets(draw):
    devices = draw(st.lists(device_plan, min_size=1, max_size=3))
    ticks = 90
    faults = draw(st.sets(st.integers(WARMUP, ticks - 1), max_size=12))
    glitches = draw(st.sets(st.integers(0, ticks - 1), max_size=4))  # a NaN value or a repeated timestamp
    shift = draw(st.one_of(st.none(), st.integers(WARMUP + 10, ticks - 20)))  # a level shift, for drift
    readings = []
    for t in range(ticks):
        for d, channels in enumerate(devices):
            level = 3.0 if shift is not None and t >= shift else 0.0
            values = {f"c{j}": math.sin(t / (3 + j) + d) + level + (4.0 * (-1) ** t if t in faults else 0.0)
                      for j, (every, start) in enumerate(channels) if t >= start and (t - start) % every == 0}
            if not values:
                continue
            if t in glitches and d == 0:
                values = {**values, "c0": float("nan")} if t % 2 else values
                if not t % 2:
                    readings.append(Reading(f"d{d}", float(t), values))  # the same timestamp twice
            readings.append(Reading(f"d{d}", float(t), values))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(readings) - 1)), max_size=8)))
    return readings, cuts


def _verdicts(config: PipelineConfig, readings: list[Reading], cuts: list[int]):
    pipe, out, bad, start = Pipeline(INIT, config), [], [], 0
    for end in [*cuts, len(readings)]:
        result = pipe.feed(readings[start:end])
        out += [(s.device, s.ts, s.surprise, s.channel, s.anomaly) for s in result.scores]
        bad += [b.reason for b in result.bad]
        start = end
    return out, bad


@pytest.mark.parametrize("name", OPTIONS)
def test_verdicts_do_not_depend_on_the_batch_boundaries(name):
    config = PipelineConfig(warmup=WARMUP, **OPTIONS[name])

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(fleets())
    def check(fleet):
        readings, cuts = fleet
        assert _verdicts(config, readings, cuts) == _verdicts(config, readings, [])
    check()


@pytest.mark.parametrize("name", OPTIONS)
def test_a_device_handed_over_between_batches_continues_exactly(name):
    """Every device exported after one batch and imported into a new pipeline (a restart,
    or its partition moving to another instance) scores the rest as if nothing happened:
    whatever a stream keeps between readings is in its state, for every option.  (Snapshots
    also round the weights to float16; ``tests/test_state.py`` covers the encoding.)"""
    config = PipelineConfig(warmup=WARMUP, **OPTIONS[name])

    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(fleets(), st.integers(1, 300))
    def check(fleet, cut):
        readings, _ = fleet
        cut = min(cut, len(readings) - 1)
        whole, _ = _verdicts(config, readings, [cut])
        first = Pipeline(INIT, config)
        before = [(s.device, s.ts, s.surprise, s.channel, s.anomaly) for s in first.feed(readings[:cut]).scores]
        second = Pipeline(INIT, config)
        second.import_devices(first.export_devices(first.devices()))
        after = [(s.device, s.ts, s.surprise, s.channel, s.anomaly) for s in second.feed(readings[cut:]).scores]
        assert before + after == whole
    check()
