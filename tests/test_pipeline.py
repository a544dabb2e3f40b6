import json
import math
from collections import Counter
from dataclasses import asdict

import pytest
import torch

from monitor.adapt import AdaptConfig
from monitor.checkpoint import Initialization
from monitor.forecaster import LSTMSpec
from monitor.pipeline import Pipeline, PipelineConfig
from monitor.readings import BadReason, Reading, parse_message
from monitor.scoring import MAX_SURPRISE, ScoringConfig, joint_surprise


@pytest.fixture(scope="module")
def init():
    return Initialization.random(LSTMSpec(hidden=8), seed=0, adapt=AdaptConfig(steps=2, lr=0.05))


def _wave(device, n, start=0, channel="v", period=6.0, noise_seed=0):
    g = torch.Generator().manual_seed(noise_seed)
    noise = (0.05 * torch.randn(n, generator=g)).tolist()
    return [Reading(device, float(t), {channel: math.sin(t / period) + noise[i]})
            for i, t in enumerate(range(start, start + n))]


def test_lifecycle_warming_then_live_and_scores_in_input_order(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    readings = _wave("a", 40)
    first = pipe.feed(readings[:31])
    assert [s.score for s in first.scores] == [None] * 31
    assert pipe.streams_by_state() == {"warming": 1, "adapting": 0, "live": 0}
    rest = pipe.feed(readings[31:])
    assert rest.adapted == 1
    assert rest.scores[0].score is None  # the 32nd reading completes the window
    assert all(0.0 <= s.score <= 1.0 for s in rest.scores[1:])
    assert [s.ts for s in rest.scores] == [r.ts for r in readings[31:]]
    assert pipe.streams_by_state() == {"warming": 0, "adapting": 0, "live": 1}


def test_adapting_a_burst_in_small_batches_scores_like_one_batch(init):
    fleet = [r for i in range(5) for r in _wave(f"d{i}", 50, noise_seed=i, period=3.0 + i)]
    fleet.sort(key=lambda r: r.ts)
    whole = Pipeline(init, PipelineConfig(warmup=32)).feed(fleet)
    in_twos = Pipeline(init, PipelineConfig(warmup=32, adapt_batch=2)).feed(fleet)
    assert whole.adapted == in_twos.adapted == 5
    assert [s.score for s in in_twos.scores] == pytest.approx([s.score for s in whole.scores], abs=1e-6)


def test_each_slice_of_an_adaptation_burst_reports_progress(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32, adapt_batch=2))
    calls = []
    pipe.progress = lambda: calls.append(pipe.streams_by_state()["live"])
    pipe.feed([r for d in range(5) for r in _wave(f"d{d}", 32)])
    assert calls == [2, 4, 5]


def test_one_big_batch_scores_exactly_like_one_reading_at_a_time(init):
    devices = [_wave(f"d{i}", 60, noise_seed=i, period=4.0 + i) for i in range(3)]
    interleaved = [r for group in zip(*devices) for r in group]
    together = Pipeline(init, PipelineConfig(warmup=32)).feed(interleaved).scores
    alone_pipe = Pipeline(init, PipelineConfig(warmup=32))
    one_by_one = []
    for r in interleaved:
        one_by_one.extend(alone_pipe.feed([r]).scores)
    assert [(s.device, s.ts) for s in together] == [(s.device, s.ts) for s in one_by_one]
    for a, b in zip(together, one_by_one):
        if a.score is None:
            assert b.score is None
        else:
            assert a.score == pytest.approx(b.score, abs=1e-4)
            assert a.forecast == pytest.approx(b.forecast, rel=1e-4, abs=1e-6)


def test_a_jump_scores_high_and_is_flagged(init):
    pipe = Pipeline(init, PipelineConfig(warmup=64))
    pipe.feed(_wave("a", 200))
    spike = pipe.feed([Reading("a", 200.0, {"v": 25.0})]).scores[0]
    assert spike.anomaly and spike.score > 0.999 and spike.channel == "v"
    assert spike.value == 25.0 and abs(spike.forecast) < 2


def test_an_alarm_surprise_past_where_scores_round_to_one_flags_by_the_surprise(init):
    """Scores round to 1.0 past a surprise of ~16, so operating points such as NAB's (64) exist
    only as surprises: a reading is flagged when its surprise reaches detector.alarm_surprise."""
    def spike_scores(scoring):
        pipe = Pipeline(init, PipelineConfig(warmup=64, scoring=scoring))
        pipe.feed(_wave("a", 200))
        return pipe.feed([Reading("a", 200.0, {"v": 25.0}), Reading("a", 201.0, {"v": 1.0})]).scores

    spike, _ = spike_scores(ScoringConfig())
    assert spike.score == 1.0 and 16 < spike.surprise < MAX_SURPRISE and spike.anomaly
    level = spike.surprise
    at, below = spike_scores(ScoringConfig(alarm_surprise=level))[0], spike_scores(ScoringConfig(
        alarm_surprise=level * 1.01))[0]
    assert at.anomaly and not below.anomaly
    assert at.score == below.score == 1.0  # which a score threshold could not tell apart
    # a threshold and the surprise it stands for flag alike
    flags = {}
    for name, scoring in (("threshold", ScoringConfig(threshold=0.99)), ("surprise", ScoringConfig(alarm_surprise=2))):
        flags[name] = [s.anomaly for s in Pipeline(init, PipelineConfig(warmup=32, scoring=scoring)).feed(
            _wave("a", 400, noise_seed=3)).scores if s.score is not None]
    assert flags["threshold"] == flags["surprise"] and 0 < sum(flags["surprise"]) < len(flags["surprise"]) / 10


def test_device_score_names_its_most_surprised_channel(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    for t in range(100):
        pipe.feed([Reading("m", float(t), {"calm": math.sin(t / 5), "wild": math.cos(t / 7)})])
    score = pipe.feed([Reading("m", 100.0, {"calm": math.sin(20), "wild": 40.0})]).scores[0]
    assert score.channel == "wild" and score.anomaly


@pytest.mark.parametrize("combination", ["joint", "max"])
def test_device_surprise_combines_what_its_channels_score_alone(init, combination):
    """A device's channels are scored as the same channels would be, each a device of its
    own; the device's surprise is their joint surprise (or the worst one)."""
    config = PipelineConfig(warmup=32, scoring=ScoringConfig(channel_combination=combination))
    together, apart = Pipeline(init, config), Pipeline(init, config)
    channels = {"a": 5.0, "b": 7.0, "c": 3.0}
    for t in range(80):
        values = {c: math.sin(t / p) + (4.0 if t == 70 and c != "c" else 0.0) for c, p in channels.items()}
        device = together.feed([Reading("m", float(t), values)]).scores[0]
        alone = {c: apart.feed([Reading(f"m-{c}", float(t), {c: v})]).scores[0] for c, v in values.items()}
        if device.surprise is None:
            continue
        surprises = [alone[c].surprise for c in channels]
        combined = joint_surprise(surprises) if combination == "joint" else max(surprises)
        assert device.surprise == pytest.approx(combined, rel=1e-12)
        worst = max(channels, key=lambda c: alone[c].surprise)
        assert (device.channel, device.forecast, device.value) == (worst, alone[worst].forecast, alone[worst].value)
    assert device.ts == 79.0


def test_duplicate_and_out_of_order_timestamps_are_rejected_per_stream(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    result = pipe.feed([Reading("a", 5.0, {"v": 1.0}), Reading("a", 5.0, {"v": 2.0}),
                        Reading("a", 3.0, {"v": 3.0}), Reading("b", 3.0, {"v": 3.0})])
    assert [b.reason for b in result.bad] == [BadReason.DUPLICATE_TIMESTAMP, BadReason.OUT_OF_ORDER_TIMESTAMP]
    assert [s.device for s in result.scores] == ["a", "b"]
    assert pipe.bad_counts[BadReason.DUPLICATE_TIMESTAMP] == 1


def test_a_wide_message_refused_on_many_channels_is_one_bad_record_per_reason(init):
    """A 40-channel message sent twice is one dead letter naming its channels, not forty copies
    of the message, and counts once against the bad-record rate."""
    pipe = Pipeline(init, PipelineConfig(warmup=32, max_channels=38))
    wide = Reading("m", 5.0, {f"c{i}": float(i) for i in range(40)}, ref="sensors/0@7")
    first = pipe.feed([wide])
    again = pipe.feed([wide, Reading("m", 4.0, {"c0": 1.0, "c1": math.nan, "c2": "x", "c3": math.inf})])
    assert [(b.reason, b.ref) for b in first.bad] == [(BadReason.STREAM_LIMIT, "sensors/0@7")]
    assert first.bad[0].detail == "device 'm' channels 'c38', 'c39': the device already has 38 channels"
    assert [b.reason for b in again.bad] == [BadReason.DUPLICATE_TIMESTAMP, BadReason.STREAM_LIMIT,
                                             BadReason.OUT_OF_ORDER_TIMESTAMP, BadReason.NON_FINITE_VALUE,
                                             BadReason.NON_NUMERIC_VALUE]
    assert again.bad[0].detail == \
        f"device 'm' channels {', '.join(repr(f'c{i}') for i in range(38))}: ts 5.0 after 5.0"  # each named
    assert again.bad[3].detail == "device 'm' channels 'c1': nan; 'c3': inf (Infinity, or a number beyond float range)"
    assert pipe.bad_counts[BadReason.DUPLICATE_TIMESTAMP] == 1 and pipe.bad_counts[BadReason.STREAM_LIMIT] == 2
    parsed = parse_message(json.dumps({"device": "m", "ts": 6, "values": {f"c{i}": None for i in range(40)}}))
    assert [(b.reason, b.detail.endswith("'c39': null value")) for b in parsed.bad] == [(BadReason.MISSING_VALUE, True)]


def test_a_late_channel_warms_up_on_its_own(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed([Reading("m", float(t), {"a": math.sin(t)}) for t in range(40)])
    late = pipe.feed([Reading("m", float(t), {"a": math.sin(t), "b": 1.0 + t % 3}) for t in range(40, 50)])
    assert pipe.counts["late_channel"] == 1
    assert pipe.streams_by_state() == {"warming": 1, "adapting": 0, "live": 1}
    assert all(s.score is not None and s.channel == "a" for s in late.scores)


def test_stream_limit_rejects_new_streams_with_a_reason(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32, max_streams=2))
    result = pipe.feed([Reading(f"d{i}", 0.0, {"v": 1.0}) for i in range(3)])
    assert [b.reason for b in result.bad] == [BadReason.STREAM_LIMIT]
    assert len(result.scores) == 2


def test_a_non_finite_value_from_a_library_caller_is_refused_not_learned(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    readings = _wave("a", 40)
    readings[10].values["v"], readings[35].values["v"] = math.nan, math.inf
    result = pipe.feed(readings)
    assert [b.reason for b in result.bad] == [BadReason.NON_FINITE_VALUE] * 2
    later = pipe.feed(_wave("a", 5, start=40)).scores
    assert all(s.surprise is not None and math.isfinite(s.surprise) for s in later)


@pytest.mark.parametrize("calibration_fading", [0.0, 0.002])
def test_an_absurd_value_from_a_library_caller_is_flagged_with_a_finite_surprise(init, calibration_fading):
    pipe = Pipeline(init, PipelineConfig(warmup=32, scoring=ScoringConfig(calibration_fading=calibration_fading)))
    pipe.feed(_wave("a", 40))
    for t in (40.0, 41.0):  # the second: the statistics the first left behind still work
        score = pipe.feed([Reading("a", t, {"v": 1e300})]).scores[0]
        assert score.anomaly and score.surprise == MAX_SURPRISE
        json.dumps(asdict(score), allow_nan=False)  # an event can carry it
        assert all(math.isfinite(x) for x in pipe._streams[("a", "v")].scorer.state())


def test_what_a_library_caller_passes_that_is_not_a_number_is_a_bad_record_not_an_exception(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    result = pipe.feed([Reading("a", 0.0, {"v": 1.0}), Reading("a", 1.0, {"v": True}),
                        Reading("a", 2.0, {"v": "71.2", "w": None}), Reading("a", math.nan, {"v": 1.0}),
                        Reading("a", "3", {"v": 1.0}), Reading("a", 4, {"v": 2}), Reading("a", 1.0, {"v": 1.0})])
    assert [b.reason for b in result.bad] == [BadReason.NON_NUMERIC_VALUE] * 2 + [BadReason.MISSING_VALUE] + [
        BadReason.BAD_TIMESTAMP] * 2 + [BadReason.OUT_OF_ORDER_TIMESTAMP]  # a NaN timestamp did not switch the
    # ordering check off; None is a missing value, as a JSON null is
    assert [s.ts for s in result.scores] == [0.0, 4.0]  # ints are numbers
    assert list(pipe._streams[("a", "v")].buffer) == [1.0, 2.0]


def test_names_a_library_caller_passes_that_no_source_would_are_bad_records(init):
    """Device 17, None, "", a lone surrogate or an unhashable list made streams (or an exception)
    that every output would fail on later: snapshots, CSV rows, metric labels."""
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    result = pipe.feed([Reading(17, 0.0, {"v": 1.0}), Reading(None, 0.0, {"v": 1.0}), Reading("", 0.0, {"v": 1.0}),
                        Reading("d\ud800", 0.0, {"v": 1.0}), Reading(["d"], 0.0, {"v": 1.0, "w": 2.0}),
                        Reading("d", 0.0, {"": 1.0, 5: 1.0, "v": 1.0})])
    assert [b.reason for b in result.bad] == [BadReason.BAD_DEVICE] * 5 + [BadReason.BAD_CHANNEL]
    assert result.bad[0].detail == "device 17 channel 'v': a device name must be a non-empty string"
    assert result.bad[5].detail == "device 'd' channels '', 5: a channel name must be a non-empty string"
    assert pipe.devices() == {"d"} and list(pipe._devices["d"][0].buffer) == [1.0]
    assert [(s.device, s.ts) for s in result.scores] == [("d", 0.0)]
    np = pytest.importorskip("numpy")  # str subclasses are names: numpy's write as str everywhere
    result = pipe.feed([Reading(np.str_("pump"), 1.0, {np.str_("temp"): 1.0})])
    assert result.bad == [] and ("pump", "temp") in pipe._streams


def test_a_device_whose_every_value_is_refused_is_not_held(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32, max_streams=1))
    pipe.feed([Reading("a", 0.0, {"v": 1.0})] + [Reading(f"spam-{i}", 0.0, {"v": 1.0}) for i in range(50)])
    assert pipe.devices() == {"a"}
    assert pipe.export_devices(["spam-0"]) == []
    fresh = Pipeline(init, PipelineConfig(warmup=32))
    fresh.feed([Reading("d", 0.0, {"x": math.nan})])
    fresh.feed([Reading("d", 1.0, {"x": 1.0})])
    assert fresh.counts["late_channel"] == 0  # its first accepted channel is not late


def test_one_device_cannot_hold_more_than_max_channels(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32, max_channels=2))
    first = pipe.feed([Reading("wide", 0.0, {f"c{i}": 1.0 for i in range(3)}), Reading("narrow", 0.0, {"v": 1.0})])
    later = pipe.feed([Reading("wide", 1.0, {"c0": 1.0, "new": 2.0})])  # a channel appearing later counts too
    assert [b.reason for b in first.bad + later.bad] == [BadReason.STREAM_LIMIT] * 2
    assert "already has 2 channels" in first.bad[0].detail
    assert len(first.scores) == 2 and len(later.scores) == 1  # the device's other channels go on
    assert pipe.streams_by_state()["warming"] == 3


def test_dropped_devices_free_their_rows_and_start_over(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed(_wave("a", 40) + _wave("b", 40))
    assert len(pipe.fleet) == 2
    assert pipe.drop_devices(["a"]) == 1
    assert len(pipe.fleet) == 1 and pipe.devices() == {"b"}
    again = pipe.feed(_wave("a", 1, start=100))
    assert again.scores[0].score is None


def test_a_lasting_level_shift_readapts_the_stream_so_it_forecasts_and_detects_again(init):
    """A shift far outside the warm-up range leaves the old model forecasting from clipped
    inputs: large errors for good, and the scorer's spread grows to match, so later spikes
    go unseen.  Re-adapted on the new level, the stream forecasts it again, its spread
    shrinks back as it forgets the shift, and a later spike is caught."""
    def run(drift_threshold: float) -> tuple[Pipeline, list]:
        pipe = Pipeline(init, PipelineConfig(warmup=64, drift_threshold=drift_threshold, drift_window=48))
        level = [r.values["v"] + (30.0 if r.ts >= 300 else 0.0) + (2.0 if r.ts == 900 else 0.0)
                 for r in _wave("a", 1000)]
        return pipe, pipe.feed([Reading("a", float(t), {"v": v}) for t, v in enumerate(level)]).scores
    with_drift, scores = run(20.0)
    without, scores_without = run(0.0)
    assert with_drift.counts["readapted"] == 1 and without.counts["readapted"] == 0
    assert scores[300].anomaly and scores_without[300].anomaly  # the shift itself is flagged either way

    def mean_error(scores) -> float:
        return sum(abs(s.forecast - s.value) for s in scores[450:850]) / 400
    assert mean_error(scores) < 1.0 < 10.0 < mean_error(scores_without)
    assert scores[900].anomaly and not scores_without[900].anomaly


def test_a_series_far_from_zero_is_judged_by_its_spread_not_its_level():
    """A counter in the billions that moves by thousands: a scale of 0.1% of its level
    (5e6) would hide a surge of ten times its usual increments."""
    init = Initialization.default()
    g = torch.Generator().manual_seed(3)
    steps = (1e4 * (1 + 0.1 * torch.randn(400, generator=g, dtype=torch.float64))).tolist()
    for t in range(300, 310):
        steps[t] *= 10
    level, readings = 5e9, []
    for t, step in enumerate(steps):
        level += step
        readings.append(Reading("counter", float(t), {"bytes": level}))
    scores = Pipeline(init, PipelineConfig(warmup=64)).feed(readings).scores
    assert any(s.anomaly for s in scores[300:311])


LIVE_READINGS = 600 - 64


@pytest.mark.parametrize("options, expected", [
    (dict(drift_threshold=20.0, drift_window=48), {"readapted": 2, "updated": 0}),
    (dict(online_every=16, online_window=48), {"readapted": 0, "updated": LIVE_READINGS // 16}),
    # due after every reading: the two readings whose round re-adapted the stream are not
    # also updated (its new weights are fresh), all the others are
    (dict(drift_threshold=20.0, drift_window=48, online_every=1, online_window=48),
     {"readapted": 2, "updated": LIVE_READINGS - 2}),
])
def test_readaptation_and_online_updates_do_not_depend_on_batch_boundaries(init, options, expected):
    config = PipelineConfig(warmup=64, **options)
    readings = [Reading("a", float(t), {"v": math.sin(t / 6.0) + (30.0 if t >= 200 else 0.0)
                                        + (-25.0 if t >= 400 else 0.0) + (5.0 if t == 300 else 0.0)})
                for t in range(600)]

    def surprises(batch: int) -> tuple[list, dict]:
        pipe = Pipeline(init, config)
        out = [s.surprise for start in range(0, len(readings), batch)
               for s in pipe.feed(readings[start:start + batch]).scores]
        return out, {k: pipe.counts[k] for k in expected}
    whole, counts = surprises(len(readings))
    assert counts == expected
    for batch in (1, 37):
        assert surprises(batch) == (pytest.approx(whole, abs=1e-9), counts)


def _changing_wave(n: int, spike_at: int | None = None) -> list[Reading]:
    """A wave whose period stretches slowly: what a model fitted once falls behind on."""
    return [Reading("a", float(t), {"v": math.sin(t / (4.0 + t / 150)) + (6.0 if t == spike_at else 0.0)})
            for t in range(n)]


def test_online_updates_follow_a_stream_that_changes_after_its_warmup():
    init = Initialization.default()
    readings = [Reading("a", float(t), {"v": math.sin(t / 8) if t < 400 else math.sin(t / 2)}) for t in range(1500)]

    def late_error(online_every: int) -> tuple[float, int]:
        pipe = Pipeline(init, PipelineConfig(warmup=64, online_every=online_every, online_window=64, online_steps=4))
        scores = pipe.feed(readings).scores
        return sum(abs(s.forecast - s.value) for s in scores[1000:]) / 500, pipe.counts["updated"]
    frozen, none = late_error(0)
    following, updates = late_error(32)
    assert none == 0 and updates == (1500 - 64) // 32
    assert following < 0.8 * frozen


def test_online_updates_leave_out_the_readings_flagged_anomalous(init):
    pipe = Pipeline(init, PipelineConfig(warmup=64, online_every=1000, online_window=96))
    scores = pipe.feed(_changing_wave(140, spike_at=120)).scores
    flagged = {int(s.ts) for s in scores if s.anomaly}
    assert 120 in flagged and len(flagged) <= 3  # the spike, and the forecasts made from it
    recent, learnable, since = pipe.fleet.history_of(torch.tensor([pipe._streams[("a", "v")].row]))
    assert since.item() == 140 - 64
    # the ring holds t = 44..139, oldest first (warm-up readings included): only the flagged are left out
    assert learnable[0].tolist() == [t not in flagged for t in range(44, 140)]


def test_online_updates_leave_out_every_channel_of_a_reading_flagged_jointly(init):
    """Twelve channels each a little off at once: the device is flagged though no channel is
    on its own, and then none of its channels learns that reading; a channel flagged on its
    own is left out as before."""
    config = PipelineConfig(warmup=64, online_every=1000, online_window=96)
    together, apart = Pipeline(init, config), Pipeline(init, config)
    waves = [_wave("m", 140, channel=f"c{j}", period=4.0 + j, noise_seed=j) for j in range(12)]
    left_out: dict[str, set[int]] = {f"c{j}": set() for j in range(12)}
    joint_only = 0
    for t in range(140):
        values = {f"c{j}": waves[j][t].values[f"c{j}"] + (0.15 if 100 <= t < 104 else 0.0) for j in range(12)}
        device = together.feed([Reading("m", float(t), values)]).scores[0]
        alone = {c: apart.feed([Reading(f"m-{c}", float(t), {c: v})]).scores[0] for c, v in values.items()}
        joint_only += bool(device.anomaly) and not any(a.anomaly for a in alone.values())
        for c, a in alone.items():
            if device.anomaly or a.anomaly:
                left_out[c].add(t)
    assert joint_only >= 1
    for c, flagged in left_out.items():
        _, learnable, _ = together.fleet.history_of(torch.tensor([together._streams[("m", c)].row]))
        assert learnable[0].tolist() == [t not in flagged for t in range(44, 140)]


@pytest.mark.parametrize("options", [{}, dict(online_every=4, online_window=32),
                                     dict(scoring=ScoringConfig(peak_window=8))])
def test_readings_that_carry_some_of_their_devices_channels_score_alike_in_any_batches(init, options):
    """Channel b comes with every other reading: in one batch a's values outnumber b's, yet a
    reading's channels are scored together, so its joint surprise (summed exactly, in any
    order) and the online updates' choice of what to leave out do not depend on the batching."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(232, 2, generator=g).tolist()
    readings = []
    for t in range(232):
        shift = 2.3 if t % 20 == 0 and t >= 32 else 0.0
        values = {"a": noise[t][0] + shift, "b": noise[t][1] + shift} if t % 2 == 0 or t < 32 else {"a": noise[t][0]}
        readings.append(Reading("dev", float(t), values))
    config = PipelineConfig(warmup=32, **options)
    whole = Pipeline(init, config).feed(readings).scores
    alone = Pipeline(init, config)
    one_by_one = [s for r in readings for s in alone.feed([r]).scores]
    assert [s.surprise for s in whole] == [s.surprise for s in one_by_one]
    assert [s.channel for s in whole] == [s.channel for s in one_by_one]
    if "online_every" in options:
        assert alone.counts["updated"] > 0 and any(s.anomaly for s in whole)


def test_a_channel_that_goes_live_after_its_devices_other_one_scores_alike_in_any_batches():
    """Channel b reports every other reading, so it goes live long after a.  With online
    updates, whether a reading is flagged as a whole (and so left out of every channel's
    learning) must be decided with all its live channels, even when b goes live in the
    middle of a batch in which a has been live all along."""
    init = Initialization.default()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(200, 2, generator=g).mul(0.1).tolist()
    readings = [Reading("d", float(t), {"a": math.sin(t / 5) + noise[t][0]}
                        | ({"b": math.sin(t / 6) + noise[t][1]} if t % 2 == 0 else {})) for t in range(200)]
    config = PipelineConfig(warmup=32, online_every=4, online_window=32)

    def scores(splits: list[int]) -> list[float | None]:
        pipe, out, start = Pipeline(init, config), [], 0
        for end in [*splits, len(readings)]:
            out += [s.surprise for s in pipe.feed(readings[start:end]).scores]
            start = end
        return out
    whole = scores([])
    assert scores([40]) == whole  # a live from the start of the second batch, b goes live within it
    assert scores(list(range(1, 200))) == whole


def test_range_novelty_flags_new_extremes_that_the_forecaster_follows():
    """A slow climb out of the warm-up's range: each step is well forecast, so the residuals
    never alarm; range novelty flags the readings that pass the highest value seen."""
    init = Initialization.default()
    readings = [Reading("a", float(t), {"v": math.sin(t / 6) + (0.01 * (t - 400) if t >= 400 else 0.0)})
                for t in range(700)]

    def flagged(novelty_unit: float) -> list[int]:
        pipe = Pipeline(init, PipelineConfig(warmup=64, scoring=ScoringConfig(novelty_unit=novelty_unit)))
        return [int(s.ts) for s in pipe.feed(readings).scores if s.anomaly]
    assert flagged(0.0) == []
    with_novelty = flagged(0.01)
    assert with_novelty and min(with_novelty) > 400
    peaks = [t for t in range(1, 699) if readings[t].values["v"] > max(r.values["v"] for r in readings[:t])]
    assert set(with_novelty) <= set(peaks)


def _fault_without_and_with_peaks(init, readings):
    """Scores by timestamp without and with peak_window 48, for readings with a fault at
    300..319: every reading of it alarms without; with, the onset alarms, then at most two
    more, and every other surprise is either the same or 0."""
    def scores(peak_window: int):
        pipe = Pipeline(init, PipelineConfig(warmup=64, scoring=ScoringConfig(peak_window=peak_window)))
        return {int(s.ts): s for s in pipe.feed(readings).scores if s.score is not None}
    plain, peaks = scores(0), scores(48)
    assert all(plain[t].anomaly for t in range(300, 320))
    onset = [t for t in range(300, 320) if peaks[t].anomaly]
    assert onset[0] == 300 and len(onset) <= 3
    assert all(peaks[t].surprise in (0.0, plain[t].surprise) for t in plain)
    return plain, peaks


def test_with_peak_window_a_sustained_fault_alarms_at_its_onset_not_at_every_reading():
    """A fault the forecaster cannot follow (values swinging by +-4) for 20 readings: with
    the default scoring every one of its readings alarms; with only new peaks counting, the
    rising onset alarms and the rest, no more surprising, score 0.  A later spike, once the
    fault has left the window, alarms again."""
    init = Initialization.default()

    def fault(t: int) -> float:
        return 4.0 * (-1) ** t if 300 <= t < 320 else (4.0 if t == 400 else 0.0)
    readings = [Reading("a", float(t), {"v": math.sin(t / 5) + fault(t)}) for t in range(420)]
    plain, peaks = _fault_without_and_with_peaks(init, readings)
    assert peaks[400].anomaly and peaks[400].surprise == plain[400].surprise


def test_with_peak_window_a_device_is_thinned_as_a_whole_and_names_its_worst_channel():
    """Three channels, a fault on all of them: the device's joint surprise is what is thinned
    (a channel's quiet reading is not a 0 to combine), so the onset alarms with the same
    surprise as without the option, and the channel named stays the most surprised one."""
    init = Initialization.default()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(420, 3, generator=g).mul(0.1).tolist()

    def fault(t: int, j: int) -> float:
        return (3.0 + j) * (-1) ** t if 300 <= t < 320 else 0.0
    readings = [Reading("m", float(t), {f"c{j}": math.sin(t / 5 + j) + noise[t][j] + fault(t, j) for j in range(3)})
                for t in range(420)]
    plain, peaks = _fault_without_and_with_peaks(init, readings)
    assert peaks[300].surprise == plain[300].surprise
    assert [peaks[t].channel for t in plain] == [plain[t].channel for t in plain]


def test_with_online_updates_a_cold_start_is_still_one_batched_adaptation(monkeypatch):
    """Only a stream whose device already has a live channel is adapted mid-batch: new
    devices whose warm-ups fill in different rounds of one batch are adapted together."""
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=16, online_every=4, online_window=16))
    calls = []
    original = pipe._adapt
    monkeypatch.setattr(pipe, "_adapt", lambda streams, windows: (calls.append(len(streams)),
                                                                  original(streams, windows)))
    readings = [Reading(f"d{k}", float(t), {"v": math.sin(t / 4 + k)}) for t in range(40) for k in range(3)
                if t % (k + 1) == 0]  # d0 fills its warm-up at t = 15, d1 at 30, d2 at 45 (not in this batch)
    assert pipe.feed(readings).adapted == 2 and calls == [2]
    late = [Reading("d0", float(t), {"v": 0.1 * t, **({"w": 1.0 + 0.1 * t} if t >= 40 else {})}) for t in range(40, 60)]
    assert pipe.feed(late).adapted == 1 and calls == [2, 1]  # d0's late channel w, beside its live v


def test_a_series_in_small_units_is_judged_as_the_same_series_in_large_ones(init):
    """A scale floor of 1e-6 applied to every warm-up window: a series spread over 1e-9
    (amperes, farads) was scaled to a hair of its own spread, and its spikes went unflagged."""
    def scaled(unit):
        readings = _wave("d", 200)
        for t in (120, 160):
            readings[t].values["v"] += 1.0
        pipe = Pipeline(init, PipelineConfig(warmup=64))
        return pipe.feed([Reading(r.device, r.ts, {"v": r.values["v"] * unit}) for r in readings]).scores
    base = scaled(1.0)
    assert {s.ts for s in base if s.anomaly} >= {120.0, 160.0}
    for unit in (1e-9, 1e9):
        scores = scaled(unit)
        assert [s.anomaly for s in scores] == [s.anomaly for s in base], unit
        assert [s.surprise for s in scores] == pytest.approx([s.surprise for s in base], rel=1e-6, abs=1e-9), unit
    # a channel at 0 but for rounding residue is not a series in tiny units
    residue = [Reading("z", float(t), {"v": (0.1 + 0.2 - 0.3) * (t % 7 == 0)}) for t in range(200)]
    assert not any(s.anomaly for s in Pipeline(init, PipelineConfig(warmup=64)).feed(residue).scores)



def test_idle_channels_do_not_hide_one_gone_wild_in_the_joint_surprise(init):
    """Fisher's method counted each idle channel as one that looked and saw nothing: among
    150 of them one channel a million spreads off scored below the alarm.  The joint
    surprise is now the stronger of Fisher's and Bonferroni's (any one channel)."""
    def device(idle):
        readings = []
        for r, s in zip(_wave("d", 120), _wave("d", 120, channel="w", noise_seed=1)):
            values = {"v": r.values["v"], "w": s.values["w"], **{f"idle{k}": 0.0 for k in range(idle)}}
            readings.append(Reading("d", r.ts, values))
        readings[100].values["v"] = 1e6
        readings[110].values["idle0"] = 5.0  # an idle channel moves: surprising on its own
        return Pipeline(init, PipelineConfig(warmup=64)).feed(readings).scores
    for idle in (0, 150):
        scores = {s.ts: s for s in device(idle)}
        assert scores[100.0].anomaly and scores[100.0].channel == "v", idle
        assert scores[110.0].anomaly == (idle > 0), idle


def test_a_device_with_several_channels_is_noticed_fed_or_restored(init):
    """What the alarm caveat waits for: a fleet of single metrics is not warned of."""
    pipe = Pipeline(init, PipelineConfig(warmup=16))
    pipe.feed([Reading(f"d{i}", float(t), {"v": 1.0}) for t in range(20) for i in range(3)])
    assert not pipe.several_channels_seen
    pipe.feed([Reading("d0", 20.0, {"v": 1.0, "w": 2.0})])
    assert pipe.several_channels_seen
    restored = Pipeline(init, PipelineConfig(warmup=16))
    restored.import_devices(pipe.export_devices(["d1"]))
    assert not restored.several_channels_seen
    restored.import_devices(pipe.export_devices(["d0"]))
    assert restored.several_channels_seen


def _json_text(pairs: list[tuple[str, str]]) -> str:
    """An object's text from (name, value text) pairs: a name may come twice, as on the wire."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


def test_the_fast_json_path_reads_every_message_as_the_exact_parser_does():
    """parse_message reads most messages with orjson and the rest with the standard library's
    parser, which refuses names given twice and says why a message is bad: the two must agree
    on every reading and every bad record, or the fast path changed what a message means."""
    pytest.importorskip("orjson")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import monitor.readings as readings
    numbers = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.floats(allow_nan=False).map(json.dumps),
                        st.sampled_from(["NaN", "-Infinity", "1e400", "-0", "1E5", "0.1e-400", "18446744073709551616",
                                         "-123456789012345678901234567890", "9223372036854775807"]))
    texts = st.one_of(st.text(max_size=8).map(json.dumps),
                      st.sampled_from(['"12:00"', '"\\ud800"', '"a\\"b"', '"x\\u003ay"', '"2024-01-01T00:00:00Z"']))
    scalars = st.one_of(numbers, texts, st.sampled_from(["null", "true", "[]", "[1, {\"x\": 2}]"]))
    names = st.sampled_from(["a", "b", "c:d", "e", "f:g", "h", "a"])  # "a" twice: a name may come twice
    plain = st.floats(-1e6, 1e6).map(json.dumps)  # what sensors send: most readings come from these
    channels = st.lists(st.tuples(names, st.one_of(plain, plain, numbers, scalars)), max_size=4).map(_json_text)
    nested = st.integers(1, 80).map(lambda depth: '{"x": ' * depth + "1" + "}" * depth)  # past _MAX_DEPTH too
    # a reading's skeleton, mostly well formed so that readings come out of both ways
    skeleton = st.tuples(
        st.one_of(st.text(min_size=1, max_size=6).map(json.dumps), numbers, st.just('"dev:1"')),
        st.one_of(numbers, st.just('"2024-01-01T00:00:00Z"'), st.just("17")),
        st.one_of(channels, channels, plain, numbers),
        st.lists(st.tuples(st.sampled_from(["extra", "b:c", "x", "y", "z", "device", "ts"]),
                           st.one_of(scalars, channels, nested)), max_size=2),
        st.booleans())
    messages = skeleton.map(lambda p: _json_text([("device", p[0]), ("ts", p[1]),
                                                  ("values" if p[4] else "value", p[2]), *p[3]]))
    fast_readings = []

    @settings(max_examples=800, deadline=None, derandomize=True)  # the count below holds run after run
    @given(messages, st.booleans())
    def agree(text, as_bytes):
        raw = text.encode("utf-8", "surrogatepass") if as_bytes else text
        fast = parse_message(raw, ref="r")
        exact_parsed = readings._fast_json
        readings._fast_json = lambda _raw: None
        try:
            exact = parse_message(raw, ref="r")
        finally:
            readings._fast_json = exact_parsed
        assert fast == exact, text[:300]
        if fast.reading is not None and exact_parsed(raw) is not None:
            fast_readings.append(text)

    agree()
    for depth in (900, 994, 995, 996, 1100):  # the exact parser runs out of stack near 995: so must the fast way
        for opened, closed in (('{"x": ', "}"), ("[", "]")):
            agree.hypothesis.inner_test('{"device": "d", "ts": 5, "value": 1, "x": ' + opened * depth + "1"
                                        + closed * depth + "}", True)
    assert len(fast_readings) >= 60  # the fast way was compared where it gives readings, not only refusals
    # the fast path is taken where it can be: not every message fell back
    taken = []
    real = readings._orjson_loads
    readings._orjson_loads = lambda raw: taken.append(raw) or real(raw)
    try:
        assert parse_message(b'{"device": "p1", "ts": 5, "values": {"a": 1.5, "b": 2}}').reading.values == \
            {"a": 1.5, "b": 2.0}
    finally:
        readings._orjson_loads = real
    assert taken and readings._fast_json(taken[0]) is not None


@pytest.mark.parametrize("as_bytes", [True, False])
def test_a_message_nested_100000_deep_is_malformed_and_never_reaches_orjson(as_bytes, monkeypatch):
    """orjson before 3.9.15 has no depth limit: 60,000 nested objects (300 KB) overran its C stack,
    a segfault no handler sees, and the daemon died on that record at every restart."""
    import monitor.readings as readings
    given = []
    real = readings._orjson_loads
    monkeypatch.setattr(readings, "_orjson_loads", lambda raw: given.append(raw) or real(raw))
    text = '{"device": "d", "ts": 5, "value": 1, "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001
    parsed = parse_message(text.encode() if as_bytes else text, ref="r")
    assert parsed.reading is None and [b.reason for b in parsed.bad] == [BadReason.MALFORMED]
    assert "recursion" in parsed.bad[0].detail and not given
    parse_message(b'{"device": "d", "ts": 5, "value": 1}')
    assert given  # a reading still goes the fast way


@pytest.mark.parametrize("glitch, warmup, glitches", [(1e5, 256, 1), (1e15, 256, 1), (1e15, 256, 3),
                                                        (1e15, 64, 1), (1e15, 16, 1)])
def test_one_glitch_in_the_warm_up_does_not_blind_the_stream(init, glitch, warmup, glitches):
    """The scale's std floor took the glitch's std: at 1e15 the scale was 6e12, and a step of 20
    spreads later was never flagged, for the stream's whole life (short warm-ups, and up to 1% of
    the window glitched, as well)."""
    pipe = Pipeline(init, PipelineConfig(warmup=warmup))
    warm = _wave("a", warmup)
    for i in range(glitches):
        t = warmup // 2 + 7 * i
        warm[t] = Reading("a", warm[t].ts, {"v": glitch})
    pipe.feed(warm)
    step = [Reading("a", r.ts, {"v": r.values["v"] + 20.0}) for r in _wave("a", 20, start=warmup)]
    flagged = [s.anomaly for s in pipe.feed(step).scores]
    assert sum(flagged) >= 15


def test_a_library_callers_values_past_1e300_are_refused_and_1e300_snapshots(init):
    """At 1.7e308 a window's scale overflowed to inf, its forecasts were -inf, and its snapshot
    raised: such values are refused as out of range, as the sources refuse theirs past 1e15."""
    from monitor.state import StateCodec
    pipe = Pipeline(init, PipelineConfig(warmup=16))
    result = pipe.feed([Reading("d", float(t), {"v": 1.7e308 if t % 2 else -1.7e308}) for t in range(20)])
    assert [b.reason for b in result.bad] == [BadReason.VALUE_OUT_OF_RANGE] * 20 and not pipe.streams_by_state()["live"]
    result = pipe.feed([Reading("e", float(t), {"v": 1e300 if t % 2 else -1e300}) for t in range(20)])
    assert not result.bad and all(math.isfinite(s.forecast) for s in result.scores if s.score is not None)
    assert StateCodec(init).encode_many(pipe.export_devices(["e"]))


def test_a_spike_or_two_in_an_otherwise_constant_warm_up_keeps_its_spread():
    """There the spikes are all the spread the window has: clamped away, a counter at 1e6 with two
    +500 spikes would take the constant window's scale (1,000) and miss a +50 bump."""
    from monitor.normalize import Normalization
    counter = torch.full((1, 256), 1e6, dtype=torch.float64)
    counter[0, [5, 50]] += 500
    assert Normalization().fit(counter)[1].item() == pytest.approx(0.1 * counter.std().item())


def test_a_reading_without_values_from_a_library_caller_is_a_bad_record_not_lost(init):
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    result = pipe.feed([Reading("a", 0.0, {}), Reading("b", 0.0, None), Reading("c", 0.0, {"v": 1.0})])
    assert [b.reason for b in result.bad] == [BadReason.MISSING_VALUE] * 2  # the sources' own verdict
    assert [s.device for s in result.scores] == ["c"] and pipe.devices() == {"c"}


def test_dropped_devices_are_no_longer_held_as_changed(init):
    """With no state store nothing takes the changed set: forgotten devices must leave it."""
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed([Reading(f"d{i}", 0.0, {"v": 1.0}) for i in range(100)])
    pipe.drop_devices([f"d{i}" for i in range(100)])
    assert not pipe._changed  # take_changed() hides them (it answers for devices held): the set itself grew


def test_a_device_whose_channel_names_change_keeps_being_scored_once_quiet_channels_go(init):
    """A channel renamed every 40 readings (a replaced sensor, a disk id in the name): without
    forgetting the quiet ones, the dead streams fill max_channels and every new one is refused."""
    def run(idle: float) -> Counter:
        pipe = Pipeline(init, PipelineConfig(warmup=16, max_channels=4, channel_idle_timeout_s=idle))
        bad = Counter()
        for t in range(400):
            result = pipe.feed([Reading("srv", float(t), {"cpu": float(t % 7), f"disk-{t // 40}": float(t % 5)})])
            bad.update(b.reason for b in result.bad)
            if t % 10 == 9:
                pipe.drop_quiet_channels()
        return bad

    kept_bad, forgot_bad = run(0.0), run(20.0)  # 0: never
    assert kept_bad[BadReason.STREAM_LIMIT] > 200 and not forgot_bad  # each refused reading lost its disk value


def _two_channel_device(init, idle: float = 25.0) -> Pipeline:
    pipe = Pipeline(init, PipelineConfig(warmup=16, channel_idle_timeout_s=idle))
    pipe.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3, "mem": 2.0 + t % 2}) for t in range(60)])
    return pipe


def _channels(pipe: Pipeline) -> list[str]:
    return [s.channel for s in pipe.export_devices(["srv"])[0].streams]


def test_a_channel_is_forgotten_once_its_device_sent_others_for_the_timeout_without_it(init):
    pipe = _two_channel_device(init)
    pipe.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3}) for t in range(60, 80)])
    assert pipe.drop_quiet_channels() == {}                      # 20 s without mem: not yet
    pipe.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3}) for t in range(80, 90)])
    assert pipe.drop_quiet_channels() == {"srv": 1} and _channels(pipe) == ["cpu"]
    assert sum(pipe.streams_by_state().values()) == 1
    assert pipe.drop_quiet_channels() == {}


def test_a_device_back_from_silence_keeps_the_channels_it_has_not_sent_yet(init):
    """Quiet counts from the end of a silence of the timeout's length: a device whose producers
    were away, back with one message of its channels, has not dropped the others."""
    pipe = _two_channel_device(init)
    pipe.feed([Reading("srv", 100.0, {"cpu": 1.0})])             # 40 s of nothing at all, then cpu alone
    assert pipe.drop_quiet_channels() == {} and _channels(pipe) == ["cpu", "mem"]
    pipe.feed([Reading("srv", float(t), {"cpu": 1.0 + t % 3}) for t in range(101, 126)])
    assert pipe.drop_quiet_channels() == {"srv": 1}              # then 25 s of cpu without it


def test_a_restored_device_back_from_silence_keeps_the_channels_it_has_not_sent_yet(init):
    snapshot = _two_channel_device(init).export_devices(["srv"])
    pipe = Pipeline(init, PipelineConfig(warmup=16, channel_idle_timeout_s=25.0))
    pipe.import_devices(snapshot)
    pipe.feed([Reading("srv", 100.0, {"cpu": 1.0})])             # silent across the restart, then cpu alone
    assert pipe.drop_quiet_channels() == {} and _channels(pipe) == ["cpu", "mem"]


def test_one_reading_stamped_far_ahead_makes_no_other_channel_quiet(init):
    pipe = _two_channel_device(init)
    pipe.feed([Reading("srv", 1e9, {"clock": 0.0})])             # the latest reading, at the check
    assert pipe.drop_quiet_channels() == {}
    pipe.feed([Reading("srv", 60.0, {"cpu": 1.0, "mem": 2.0})])  # and after it, back to normal
    assert pipe.drop_quiet_channels() == {} and _channels(pipe) == ["cpu", "mem", "clock"]


def test_a_restored_device_no_reading_has_reached_keeps_its_channels_and_is_not_rewritten(init):
    """A frozen copy of a moved device, restored where its readings no longer arrive: rewriting
    it would make it newer than the live device's own snapshot elsewhere."""
    pipe = _two_channel_device(init)
    pipe.feed([Reading("srv", float(t), {"cpu": 1.0}) for t in range(60, 100)])   # mem quiet for 40 s
    restored = Pipeline(init, PipelineConfig(warmup=16, channel_idle_timeout_s=25.0))
    restored.import_devices(pipe.export_devices(["srv"]))
    restored.take_changed()
    assert restored.drop_quiet_channels() == {} and not restored.take_changed()
    restored.feed([Reading("srv", 100.0, {"cpu": 1.0})])          # once a reading reaches it here
    assert restored.drop_quiet_channels() == {"srv": 1}
