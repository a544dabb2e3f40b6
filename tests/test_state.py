"""Device snapshots: a restored device forecasts and scores like the one it was taken from."""
from __future__ import annotations

import json
import logging
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from monitor.checkpoint import Initialization
from monitor.forecaster import LSTMSpec
from monitor.pipeline import Pipeline, PipelineConfig
from monitor.readings import Reading
from monitor.scoring import ScoringConfig
from monitor.state import _PREFIX, DeviceState, StateCodec, StateError


def _readings(t0: int, t1: int, devices=("a", "b")) -> list[Reading]:
    return [Reading(d, float(t), {"temp": math.sin(t / 5 + i), "load": (t * 7 + i) % 11 / 4.0})
            for t in range(t0, t1) for i, d in enumerate(devices)]


def test_restored_devices_continue_like_the_originals():
    init = Initialization.default()
    original = Pipeline(init, PipelineConfig(warmup=64))
    original.feed(_readings(0, 100))
    original.feed([Reading("c", 0.0, {"temp": 1.0})])  # one device still warming
    codec = StateCodec(init)
    blobs = [codec.encode(s) for s in original.export_devices(["a", "b", "c"], {"a": 7})]
    per_channel = 2 * init.spec.n_params + 1_000  # float16 weight deltas, then state and header
    assert all(len(b) < 2 * per_channel for b in blobs)  # two channels
    restored = Pipeline(init, PipelineConfig(warmup=64))
    assert restored.import_devices(codec.decode(b) for b in blobs) == 5
    assert codec.decode(blobs[0]).offset == 7
    assert restored.streams_by_state() == original.streams_by_state() == {"warming": 1, "adapting": 0, "live": 4}
    later = _readings(100, 130)
    for x, y in zip(original.feed(later).scores, restored.feed(later).scores):
        assert y.forecast == pytest.approx(x.forecast, rel=1e-3, abs=1e-3)
        assert y.surprise == pytest.approx(x.surprise, rel=0.02, abs=0.02)
    dup = restored.feed([Reading("a", 129.0, {"temp": 0.0})])  # last_ts came back too
    assert dup.bad and dup.bad[0].reason.value == "duplicate_timestamp"


def test_a_restored_stream_keeps_the_range_its_novelty_is_judged_against():
    init = Initialization.default()
    config = PipelineConfig(warmup=64, scoring=ScoringConfig(novelty_unit=0.01))
    original = Pipeline(init, config)
    original.feed([Reading("a", float(t), {"v": math.sin(t / 5) * (3.0 if t >= 80 else 1.0)}) for t in range(100)])
    codec = StateCodec(init)
    restored = Pipeline(init, config)
    restored.import_devices([codec.decode(codec.encode(s)) for s in original.export_devices(["a"])])
    # 3.1 is a new extreme only against the live range (up to ~3), not the warm-up's ([-1, 1])
    nxt = [Reading("a", 100.0, {"v": 3.1})]
    a, b = original.feed(nxt).scores[0], restored.feed(nxt).scores[0]
    assert b.surprise == pytest.approx(a.surprise, rel=1e-6)
    ranges = [p._streams[("a", "v")].novelty.state() for p in (original, restored)]
    assert ranges[0] == ranges[1] and ranges[0][3:5] == [3.1, pytest.approx(-3.0, abs=0.05)]


def test_a_restored_stream_carries_its_smoothed_surprise_and_older_snapshots_start_it_at_zero():
    init = Initialization.default()
    config = PipelineConfig(warmup=64, scoring=ScoringConfig(smoothing_span=9))
    original = Pipeline(init, config)
    original.feed([Reading("a", float(t), {"v": math.sin(t / 5) + (4.0 if t >= 97 else 0.0)}) for t in range(100)])
    smoothed = original._streams[("a", "v")].scorer.smoothed
    assert smoothed > 1.0  # the fault of the last three readings is building up
    codec = StateCodec(init)
    restored = Pipeline(init, config)
    restored.import_devices([codec.decode(codec.encode(s)) for s in original.export_devices(["a"])])
    assert restored._streams[("a", "v")].scorer.smoothed == pytest.approx(smoothed, rel=1e-9)
    nxt = [Reading("a", 100.0, {"v": 4.5})]
    assert restored.feed(nxt).scores[0].surprise == pytest.approx(original.feed(nxt).scores[0].surprise, rel=0.02)
    older = original.export_devices(["a"])
    older[0].streams[0].scorer = older[0].streams[0].scorer[:6]  # as written before smoothing existed
    again = Pipeline(init, config)
    again.import_devices([codec.decode(codec.encode(s)) for s in older])
    assert again._streams[("a", "v")].scorer.smoothed == 0.0


def test_a_restored_device_remembers_the_peaks_a_new_alarm_must_top():
    init = Initialization.default()
    config = PipelineConfig(warmup=64, scoring=ScoringConfig(peak_window=48))
    original = Pipeline(init, config)
    onset = original.feed([Reading("a", float(t), {"v": math.sin(t / 5) + (8.0 if t >= 98 else 0.0)})
                           for t in range(100)]).scores
    assert onset[98].anomaly
    codec = StateCodec(init)
    restored = Pipeline(init, config)
    restored.import_devices([codec.decode(codec.encode(s)) for s in original.export_devices(["a"])])
    fresh = Pipeline(init, config)  # the same device restored without its peaks
    snapshot = original.export_devices(["a"])
    snapshot[0].peaks = None
    fresh.import_devices(snapshot)
    nxt = [Reading("a", 100.0, {"v": math.sin(20.0) + 7.0})]  # the fault goes on, less surprising than its onset
    a, b, c = original.feed(nxt).scores[0], restored.feed(nxt).scores[0], fresh.feed(nxt).scores[0]
    assert a.surprise == b.surprise == 0.0 and not b.anomaly
    assert c.anomaly  # without the peaks, the same reading would alarm again


@pytest.mark.parametrize("peaks", [[1.0], [-1.0, 2.0], [0.0, float("nan")], "3", [0.0, "2"], [0.0, True]])
def test_snapshots_with_malformed_peaks_are_refused(peaks):
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=32, scoring=ScoringConfig(peak_window=8)))
    pipe.feed(_readings(0, 40, ("a",)))
    state = pipe.export_devices(["a"])[0]
    assert state.peaks is not None
    codec = StateCodec(init)
    codec.decode(codec.encode(state))
    state.peaks = peaks
    data = codec.encode(state)
    if data is None:  # NaN: the writer refuses it already
        return
    with pytest.raises(StateError, match="new-peak"):
        codec.decode(data)


def test_a_stream_restored_without_a_range_builds_one_before_judging_novelty():
    """A snapshot from before range novelty was turned on has no range: judged against its
    first few values, every later value would look like a new extreme."""
    init = Initialization.default()
    wave = [Reading("a", float(t), {"v": math.sin(t / 5)}) for t in range(600)]
    plain = Pipeline(init, PipelineConfig(warmup=64))
    plain.feed(wave[:300])
    codec = StateCodec(init)
    restored = Pipeline(init, PipelineConfig(warmup=64, scoring=ScoringConfig(novelty_unit=0.01)))
    restored.import_devices([codec.decode(codec.encode(s)) for s in plain.export_devices(["a"])])
    assert [s.ts for s in restored.feed(wave[300:]).scores if s.anomaly] == []


def test_snapshots_of_another_init_version_or_corrupt_are_refused():
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed(_readings(0, 40, ("a",)))
    data = StateCodec(init).encode(pipe.export_devices(["a"])[0])
    other = StateCodec(Initialization.random(LSTMSpec(), seed=3))
    with pytest.raises(StateError, match="another initialization"):
        other.decode(data)
    with pytest.raises(StateError, match="version"):
        StateCodec(init).decode(data[:4] + bytes([9]) + data[5:])
    with pytest.raises(StateError, match="checksum"):
        StateCodec(init).decode(data[:-10] + bytes(10))
    with pytest.raises(StateError, match="too short"):
        StateCodec(init).decode(b"FW")
    short = pipe.export_devices(["a"])[0]
    short.streams[0].scorer = short.streams[0].scorer[:5]
    with pytest.raises(StateError, match="5 scorer statistics"):
        StateCodec(init).decode(StateCodec(init).encode(short))


@pytest.mark.parametrize("spoil, message", [
    (lambda d: setattr(d.streams[1], "buffer", [1.0, "x"]), "warm-up buffer"),
    (lambda d: setattr(d.streams[1], "buffer", [1.0, True]), "warm-up buffer"),
    (lambda d: setattr(d.streams[0], "scale", 0.0), "scale <= 0"),
    (lambda d: setattr(d.streams[0], "last_ts", "yesterday"), "last_ts"),
    (lambda d: setattr(d.streams[1], "channel", d.streams[0].channel), "twice"),
    (lambda d: setattr(d, "offset", -5), "offset"),
    # their restore indexes into them: an IndexError there failed the restore of the whole partition
    (lambda d: setattr(d.streams[0], "drift", [1.0]), "bad drift or range statistics"),
    (lambda d: setattr(d.streams[0], "novelty", [1.0, 0.0, 1.0, 2.0, 1.0, 3.0]), "bad drift or range statistics"),
    (lambda d: setattr(d.streams[0], "drift", {"n": 1}), "bad drift or range statistics"),
])
def test_a_checksummed_snapshot_that_cannot_be_used_is_refused_so_the_device_rewarms(spoil, message):
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed([Reading("a", float(t), {"v": math.sin(t / 5)}) for t in range(40)])
    pipe.feed([Reading("a", float(t), {"v": 1.0, "w": 2.0}) for t in range(40, 45)])  # w: still warming
    state = pipe.export_devices(["a"])[0]
    assert [s.stage for s in state.streams] == ["live", "warming"]
    spoil(state)
    codec = StateCodec(init)
    with pytest.raises(StateError, match=message):
        codec.decode(codec.encode(state))


def _resealed(data: bytes, edit) -> bytes:
    """``data`` with its body changed by ``edit(header, blob)`` and its checksum made to match:
    what a writer's bug or an edited record gives."""
    magic, version, fp, _ = _PREFIX.unpack_from(data)
    raw = zlib.decompress(data[_PREFIX.size:])
    (n,) = struct.unpack_from("<I", raw)
    header, blob = json.loads(raw[4:4 + n]), bytearray(raw[4 + n:])
    edit(header, blob)
    head = json.dumps(header).encode()
    body = zlib.compress(struct.pack("<I", len(head)) + head + bytes(blob), 0)
    return _PREFIX.pack(magic, version, fp, zlib.crc32(body)) + body


def _nan_weight(header, blob):
    blob[0:2] = np.array([np.nan], dtype=np.float16).tobytes()


def _huge_count(header, blob):
    header["streams"][0]["online"][1] = 2**63


@pytest.mark.parametrize("edit, message", [
    # restored, it crashed the next checkpoint (json refuses NaN), at every restart
    (_nan_weight, "not finite"),
    # past a torch.long: the restore itself crashed, at every restart
    (_huge_count, "history"),
])
def test_a_checksummed_snapshot_the_daemon_could_not_live_with_is_refused(edit, message):
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=32, online_every=20, online_window=32))
    pipe.feed([Reading("a", float(t), {"v": math.sin(t / 5)}) for t in range(40)])
    codec = StateCodec(init)
    data = codec.encode(pipe.export_devices(["a"])[0])
    assert codec.decode(_resealed(data, lambda header, blob: None)).device == "a"
    with pytest.raises(StateError, match=message):
        codec.decode(_resealed(data, edit))


def test_a_record_that_decompresses_far_past_its_size_is_refused_before_it_takes_the_memory():
    codec = StateCodec(Initialization.default())
    body = zlib.compress(bytes(50 * 2**20), 9)  # ~50 KB that inflates to 50 MB (a 1 MB one: 1 GB)
    bomb = _PREFIX.pack(*_PREFIX.unpack_from(codec.encode(DeviceState("a", 0, [])))[:3], zlib.crc32(body)) + body
    with pytest.raises(StateError, match="decompress to far more"):
        codec.decode(bomb)


def test_a_state_holding_what_is_not_finite_is_not_encoded():
    init = Initialization.default()
    pipe = Pipeline(init, PipelineConfig(warmup=32))
    pipe.feed([Reading(d, float(t), {"v": math.sin(t / 5)}) for t in range(40) for d in ("a", "b", "c")])
    a, b, c = pipe.export_devices(["a", "b", "c"])
    b.streams[0].h[0] = float("inf")    # weights and state go out as bytes
    c.streams[0].scorer[0] = math.nan   # statistics as JSON
    codec = StateCodec(init)
    encoded = codec.encode_many([a, b, c])
    assert encoded[1:] == [None, None]
    assert codec.decode(encoded[0]).device == "a"


def test_a_stream_snapshotted_while_collecting_its_drift_window_readapts_after_restore():
    init = Initialization.default()
    config = PipelineConfig(warmup=64, drift_threshold=5.0, drift_window=32)
    shifted = [Reading("a", float(t), {"v": math.sin(t / 5) + (40.0 if t >= 120 else 0.0)}) for t in range(200)]
    original = Pipeline(init, config)
    original.feed(shifted[:130])  # the shift at 120 has tripped the test; its window is filling
    state = original.export_devices(["a"])[0]
    assert state.streams[0].rebuffer, "snapshot taken mid-window"
    codec = StateCodec(init)
    restored = Pipeline(init, config)
    restored.import_devices([codec.decode(codec.encode(state))])
    for pipe in (original, restored):
        pipe.feed(shifted[130:])
    assert original.counts["readapted"] == restored.counts["readapted"] == 1


def test_a_stream_with_online_updates_continues_them_after_restore():
    init = Initialization.default()
    config = PipelineConfig(warmup=64, online_every=20, online_window=48)
    wave = [Reading("a", float(t), {"v": math.sin(t / (4 + t / 100)) + (5.0 if t == 110 else 0.0)})
            for t in range(220)]
    original = Pipeline(init, config)
    original.feed(wave[:115])  # mid-way between updates, the spike at 110 in the history
    state = original.export_devices(["a"])[0].streams[0]
    assert state.since_update == 115 - 64 - 40 and not state.learnable[-5]
    codec = StateCodec(init)
    restored = Pipeline(init, config)
    restored.import_devices([codec.decode(codec.encode(original.export_devices(["a"])[0]))])
    back = restored.export_devices(["a"])[0].streams[0]
    assert torch.equal(back.learnable, state.learnable) and torch.equal(back.recent, state.recent)
    assert back.since_update == state.since_update
    after = [pipe.feed(wave[115:]).scores for pipe in (original, restored)]
    assert original.counts["updated"] == 2 + 5 and restored.counts["updated"] == 5
    for x, y in zip(*after):
        assert y.surprise == pytest.approx(x.surprise, rel=0.02, abs=0.02)
    # a snapshot taken with online updates off restores with an empty history, updates on
    device = original.export_devices(["a"])[0]
    device.streams[0].recent = device.streams[0].learnable = None
    plain = Pipeline(init, config)
    plain.import_devices([codec.decode(codec.encode(device))])
    recent, learnable, since = plain.fleet.history_of(torch.tensor([plain._streams[("a", "v")].row]))
    assert not learnable.any() and since.item() == 0


def test_warming_streams_restored_under_a_shorter_warmup_go_live_together_with_fresh_ones():
    """Snapshots from a deployment with a longer warm-up: their buffers are longer than the
    new window, and adapting them in one call with fresh windows must not fail."""
    init = Initialization.default()
    before = Pipeline(init, PipelineConfig(warmup=128))
    before.feed(_readings(0, 100, devices=("a",)))  # 100 values buffered, still warming
    states = before.export_devices(["a"])
    after = Pipeline(init, PipelineConfig(warmup=32))
    after.import_devices(states)
    after.feed(_readings(0, 31, devices=("b",)))      # b one short of its window
    result = after.feed(_readings(100, 101, devices=("a",)) + [Reading("b", 31.0, {"temp": 0.0, "load": 0.0})])
    assert result.adapted == 4                        # a's two channels and b's, in one batch
    assert after.streams_by_state() == {"warming": 0, "adapting": 0, "live": 4}
    assert all(s.score is not None for s in after.feed(_readings(101, 102, devices=("a", "b"))).scores)


def test_a_local_state_file_that_cannot_be_opened_is_a_store_error_naming_it(tmp_path):
    """A directory or another kind of file as state.local_path: one line at start, no traceback."""
    from connectors.state_store import LocalStore, StoreError
    other = tmp_path / "recording.csv"
    other.write_text("ts,value\n1,2\n" * 100)
    for path in (tmp_path, other):
        with pytest.raises(StoreError, match="state.local_path"):
            LocalStore(path)


def test_rows_of_a_local_state_file_edited_by_hand_fail_alone(tmp_path):
    """A NULL, text, or a name that is not UTF-8 (the sqlite3 shell takes any): each row is one
    device's snapshot that fails to decode, not a restore that fails for every device."""
    import sqlite3

    from connectors.state_store import LocalStore, StoreError
    path = tmp_path / "state.db"
    store = LocalStore(path)
    store.put(0, "good", b"snapshot")
    store.flush()
    store.db.execute("INSERT INTO state VALUES (0, 'empty', NULL)")
    store.db.execute("INSERT INTO state VALUES (0, CAST(X'fffe' AS TEXT), X'00')")
    store.db.execute("INSERT INTO state VALUES (0, 'text', 'garbage')")
    store.flush()
    assert sorted(store.load([0])) == [(0, "\\xff\\xfe", b"\x00"), (0, "empty", b""), (0, "good", b"snapshot"),
                                       (0, "text", b"garbage")]
    store.close()
    # locked by another process: named, as at start (sqlite3's own error named no file)
    store = LocalStore(path)
    store.db.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=r"state.local_path\): database is locked"):
            store.put(0, "good", b"newer")
            store.flush()
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.db.rollback()
        store.close()


def test_a_changelog_record_whose_key_is_not_utf8_fails_alone(broker):
    """It failed every restore of its partition, at every restart, on every instance."""
    from kafka import KafkaProducer

    from connectors.state_store import ChangelogStore
    from monitor.config import KafkaConfig
    store = ChangelogStore(KafkaConfig(bootstrap_servers=broker.bootstrap), "poison-state")
    try:
        store.ensure_partitions(1)
        store.put(0, "good", b"snapshot")
        store.flush()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send("poison-state", key=b"\xff\xfe", value=b"garbage", partition=0)
        producer.send("poison-state", key=None, value=b"no device", partition=0)
        producer.flush()
        producer.close()
        state_log, records = logging.getLogger("forewarn.state"), []
        handler = logging.Handler()  # on the logger itself: a daemon test before may stop its propagation
        handler.emit = records.append
        state_log.addHandler(handler)
        try:
            assert sorted(store.load([0])) == [(0, "\\xff\\xfe", b"garbage"), (0, "good", b"snapshot")]
        finally:
            state_log.removeHandler(handler)
        assert any("changelog records without a key skipped" in r.getMessage() for r in records)
    finally:
        store.close()
