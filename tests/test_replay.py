import csv
import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.files import FileFormatError, FileSource, read_series
from monitor.cli import main
from tests.kafka_support import ROOT


def _good(device, t, **values):
    return json.dumps({"device": device, "ts": t, "values": values})


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


BAD_LINES = {
    "malformed": '{"device": "p1", "ts": 1,',
    "not_an_object": "[1, 2, 3]",
    "missing_device": '{"ts": 1, "value": 1.0}',
    "bad_device": '{"device": "", "ts": 1, "value": 1.0}',
    "missing_timestamp": '{"device": "p1", "value": 1.0}',
    "bad_timestamp": '{"device": "p1", "ts": "yesterday", "value": 1.0}',
    "missing_value": '{"device": "p1", "ts": 1}',
    "non_numeric_value": '{"device": "p1", "ts": 1, "values": {"temp": "71.2"}}',
    "non_finite_value": '{"device": "p1", "ts": 1, "values": {"temp": NaN}}',
    "value_out_of_range": '{"device": "p1", "ts": 1, "values": {"temp": 1e300}}',
}
# refused for their size, so that no output record grows past what a broker takes
HUGE_LINES = {
    "bad_device": json.dumps({"device": "é" * 10_000, "ts": 1, "value": 1.0}),
    "bad_channel": json.dumps({"device": "p1", "ts": 1061, "values": {"x" * 300: 1.0}}),
    "bad_timestamp": '{"device": "p1", "ts": 1' + "0" * 400 + ', "value": 1.0}',
}


def test_replay_of_every_kind_of_bad_record(tmp_path, capsys):
    lines = []
    for t in range(120):
        lines.append(_good("p1", 1000 + t, temp=20 + math.sin(t / 4), rpm=1500 + 10 * math.cos(t / 3)))
        lines.append(_good("p2", f"2024-01-01T00:{t // 60:02d}:{t % 60:02d}Z", temp=5.0 + (t % 7) / 10))
        if t == 60:
            lines.extend(BAD_LINES.values())
            lines.append('{"device": "p1", "ts": 1059, "values": {"temp": 1.0}}')   # out of order
            lines.append('{"device": "p1", "ts": 1060, "values": {"temp": 1.0}}')   # duplicate
            lines.append('{"device": "p1", "ts": 1060.5, "values": {"temp": true, "rpm": 1500}}')  # half bad
            lines.extend(HUGE_LINES.values())
            # epoch milliseconds: refused, and the device's next reading (in seconds) is still in order
            lines.append('{"device": "p1", "ts": 1060700000000, "values": {"temp": 1.0}}')
        if t == 80:
            lines.append(_good("p1", 1080.5, temp=21.0, rpm=1500.0, vibration=0.2))  # late channel
    path = tmp_path / "fleet.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out, dlq = tmp_path / "scores.csv", tmp_path / "dead.jsonl"
    code, _, err = _run(["replay", str(path), "--warmup", "32", "--out", str(out),
                         "--dead-letter", str(dlq), "--quiet"], capsys)
    assert code == 0
    dead = [json.loads(line) for line in dlq.read_text().splitlines()]
    reasons = sorted(d["reason"] for d in dead)
    expected = sorted(list(BAD_LINES) + list(HUGE_LINES) + ["out_of_order_timestamp", "duplicate_timestamp",
                                                             "non_numeric_value", "bad_timestamp"])
    assert reasons == expected
    assert all(len(json.dumps(d)) < 4_000 for d in dead)  # a 10,000-character name is not repeated
    assert sum("epoch milliseconds?" in d["detail"] for d in dead) == 2
    # every bad record names its line, and the summary counts them by reason
    malformed_line = lines.index(BAD_LINES["malformed"]) + 1
    assert f"line {malformed_line}: malformed: invalid JSON" in err
    assert "bad records: 17" in err and "'non_numeric_value': 2" in err
    assert "late channels: 1" in err
    rows = _rows(out)
    assert list(rows[0]) == ["ts", "device", "score", "anomaly", "channel", "surprise"]
    # 240 good readings, the half-bad one (its rpm survives) and the late-channel one
    assert len(rows) == 242
    half_bad = [r for r in rows if r["ts"] == "1060.5"]
    assert len(half_bad) == 1 and half_bad[0]["channel"] == "rpm"
    after = [r for r in rows if r["device"] == "p1" and float(r["ts"]) > 1061]
    assert after and all(r["score"] != "" and 0 <= float(r["score"]) <= 1 for r in after)
    # the surprise is the score's, unrounded: 1 - 10**-surprise
    assert all(float(r["score"]) == pytest.approx(1 - 10 ** -float(r["surprise"]), abs=1e-5) for r in after)
    assert all(r["surprise"] == "" for r in rows if r["score"] == "")


def test_replay_of_a_bad_csv_keeps_scoring_around_bad_rows(tmp_path, capsys):
    rows = ["timestamp,value"]
    for t in range(80):
        rows.append(f"2024-01-01 {t // 60:02d}:{t % 60:02d}:00,{10 + math.sin(t / 3):.4f}")
    rows[40] = "2024-01-01 00:39:00,nan"
    rows[41] = "2024-01-01 00:40:00,hello"
    rows[42] = "not a time,1.0"
    rows[43] = "2024-01-01 00:42:00,1.0,extra"
    rows[44] = "2024-01-01 00:43:00,"
    path = tmp_path / "sensor.csv"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(path), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 0
    for line, reason in [(41, "non_finite_value"), (42, "non_numeric_value"), (43, "bad_timestamp"),
                         (44, "malformed: expected 2 fields, got 3"), (45, "missing_value")]:
        assert f"line {line}: {reason}" in err
    scored = _rows(out)
    assert len(scored) == 75 and {r["device"] for r in scored} == {"sensor"}
    assert all(r["score"] != "" for r in scored[20:])


def test_wide_headerless_gzip_like_smd(tmp_path, capsys):
    path = tmp_path / "machine-9-9.txt.gz"
    with gzip.open(path, "wt") as f:
        for t in range(60):
            f.write(",".join(f"{0.5 + 0.1 * math.sin(t / (2 + c)):.5f}" for c in range(3)) + "\n")
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(path), "--warmup", "24", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    rows = _rows(out)
    assert len(rows) == 60 and rows[0]["ts"] == "0" and rows[-1]["ts"] == "59"
    assert {r["channel"] for r in rows[24:]} <= {"c0", "c1", "c2"} and rows[30]["channel"]
    assert "streams: {'warming': 0, 'adapting': 0, 'live': 3}" in err


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("time,value\n1,2\n", "line 1: a nab file starts with 'timestamp,value'"),
])
def test_a_malformed_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "broken.csv"
    path.write_text(content)
    code, _, err = _run(["replay", str(path), "--format", "nab", "--quiet"], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_input_and_bad_init_are_clear_errors(tmp_path, capsys):
    code, _, err = _run(["replay", str(tmp_path / "nope.csv"), "--quiet"], capsys)
    assert code == 2 and "no such file" in err
    data = tmp_path / "ok.csv"
    data.write_text("timestamp,value\n2024-01-01 00:00:00,1\n")
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    code, _, err = _run(["replay", str(data), "--init", str(junk), "--quiet"], capsys)
    assert code == 2 and "not a Forewarn initialization" in err


def test_wide_csv_with_header_and_timestamp_column(tmp_path):
    path = tmp_path / "pump.csv"
    path.write_text("temp,timestamp,pressure\n70.1,2024-01-01T00:00:00,3.0\n70.2,2024-01-01T00:01:00,3.1\n")
    readings = list(FileSource(path).readings())
    assert [r.values for r in readings] == [{"temp": 70.1, "pressure": 3.0}, {"temp": 70.2, "pressure": 3.1}]
    assert readings[1].ts - readings[0].ts == 60
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a\n1,2\n")
    with pytest.raises(FileFormatError, match="unique"):
        list(FileSource(dup).readings())


def test_a_name_holding_a_carriage_return_stays_in_its_row_of_the_scores(tmp_path, capsys):
    """csv quotes only what holds its line terminator ("\\n" here): a bare "\\r" in a name
    (JSON allows it) ended the row early for every CSV reader."""
    path = tmp_path / "names.jsonl"
    path.write_text("\n".join(_good(d, t, **{c: float(t % 3)}) for t in range(30)
                              for d, c in (("cr\rname", "v"), ("plain", "a\rb"), ("ok", "v"))) + "\n")
    out = tmp_path / "scores.csv"
    code, _, _ = _run(["replay", str(path), "--warmup", "16", "--out", str(out), "--quiet"], capsys)
    rows = _rows(out)
    assert code == 0 and len(rows) == 90 and {r["device"] for r in rows} == {"cr\rname", "plain", "ok"}
    assert {r["channel"] for r in rows if r["device"] == "plain" and r["score"]} == {"a\rb"}


def test_names_that_cannot_be_written_as_utf8_are_bad_records_not_a_failed_replay(tmp_path, capsys):
    """JSON escapes can spell a lone surrogate, which no UTF-8 output (CSV, Kafka key, metric
    label) can carry: such a device or channel is refused, and the replay completes."""
    lines = [_good("pümp", t, temp=float(t % 5)) for t in range(40)]
    lines += ['{"device": "pump\\ud800", "ts": 50, "value": 1.0}',
              '{"device": "pümp", "ts": 50, "values": {"t\\udfff": 1.0, "temp": 2.0}}',
              '{"device": "pümp", "ts": null, "value": 1.0}']
    path = tmp_path / "names.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, dlq = tmp_path / "scores.csv", tmp_path / "dead.jsonl"
    code, _, err = _run(["replay", str(path), "--warmup", "16", "--out", str(out), "--dead-letter", str(dlq),
                         "--quiet"], capsys)
    assert code == 0, err
    assert [json.loads(line)["reason"] for line in dlq.read_text().splitlines()] == [
        "bad_device", "bad_channel", "missing_timestamp"]
    rows = _rows(out)
    assert len(rows) == 41 and rows[-1]["device"] == "pümp"  # the good channel of the half-bad reading


def test_csv_bad_records_name_the_line_they_start_on_and_an_empty_timestamp_is_missing(tmp_path):
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('timestamp,value\n1,1.0\n2,"2.0\n"\n3,oops\n4,\n')
    bad = [str(b) for batch in FileSource(quoted).batches() for b in batch.bad]
    assert [b.split(":")[0] for b in bad] == ["line 5", "line 6"]  # a quoted field spans lines 3-4
    empty = tmp_path / "empty.csv"
    empty.write_text("timestamp,a\n,1.0\n2,2.0\n")
    batch, = FileSource(empty).batches()
    assert [b.reason.value for b in batch.bad] == ["missing_timestamp"] and len(batch.readings) == 1
    # headerless: every non-blank row takes the next timestamp, bad or good
    headerless = tmp_path / "h.csv"
    headerless.write_text("1,2\n1,2,3\n3,4\nx,y\n\n5,6\n")
    batch, = FileSource(headerless, "wide").batches()
    assert [(r.ref, r.ts) for r in batch.readings] == [("line 1", 0.0), ("line 3", 2.0), ("line 6", 4.0)]


def test_read_series_keeps_streams_apart_whatever_their_names(tmp_path):
    path = tmp_path / "slashes.jsonl"
    path.write_text("\n".join([_good("a/b", t, c=100.0 + t) for t in range(3)]
                              + [_good("a", t, **{"b/c": -1.0 - t}) for t in range(3)]) + "\n")
    series = read_series(path)
    assert series[("a/b", "c")].tolist() == [100.0, 101.0, 102.0]
    assert series[("a", "b/c")].tolist() == [-1.0, -2.0, -3.0]


def test_offline_demo_replays_the_bundled_recording_against_its_labels(capsys):
    code, out, err = _run(["demo", "--offline", "--quiet"], capsys)
    assert code == 0
    assert "Labelled anomaly windows caught:" in out and "of 4" in out
    live = [line for line in out.splitlines() if line.startswith("anomaly ")]  # as the Kafka demo prints them
    assert live and out.index(live[-1]) < out.index("Labelled anomaly windows caught:")
    assert int(re.search(r"outside labelled windows: \d+ of (\d+)", out)[1]) == len(live)
    assert "readings: 22683" in err  # 22,695 rows, 12 of them out of order or duplicate in NAB's own file
    assert "'out_of_order_timestamp': 11" in err


def test_replay_flags_by_the_alarm_surprise_where_scores_cannot_tell(tmp_path, capsys):
    """A spike whose score rounds to 1 is flagged at a level below its surprise and not above it."""
    rows = ["timestamp,value"] + _nab_rows(120)
    rows[101] = rows[101].rsplit(",", 1)[0] + ",500.0"
    (tmp_path / "spike.csv").write_text("\n".join(rows) + "\n")

    def flagged_at(level: float | None) -> list[dict]:
        out = tmp_path / f"at-{level}.csv"
        args = ["replay", str(tmp_path / "spike.csv"), "--warmup", "64", "--out", str(out), "--quiet"]
        code, _, _ = _run(args + ([] if level is None else ["--alarm-surprise", str(level)]), capsys)
        assert code == 0
        return [r for r in _rows(out) if r["anomaly"] == "1"]

    default = flagged_at(None)  # threshold 0.999: surprise 3
    spike = max(default, key=lambda r: float(r["surprise"]))
    assert float(spike["ts"]) == 1704067200 + 100 * 60  # the 500.0 of minute 100
    assert float(spike["score"]) == 1.0 and float(spike["surprise"]) > 20  # the score cannot rank it
    at_20 = flagged_at(20.0)
    assert spike in at_20 and len(at_20) < len(default)
    assert spike not in flagged_at(float(spike["surprise"]) * 1.001)


def _nab_rows(n, start=0):
    return [f"2024-01-01 {t // 60:02d}:{t % 60:02d}:00,{10 + math.sin(t / 3):.4f}" for t in range(start, start + n)]


def test_a_truncated_gzip_is_a_clear_error_and_the_partial_output_is_named_as_such(tmp_path, capsys):
    full = tmp_path / "full.csv.gz"
    with gzip.open(full, "wt") as f:
        f.write("timestamp,value\n" + "\n".join(_nab_rows(600)) + "\n")
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) // 2])
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(cut), "--warmup", "20", "--batch-size", "50", "--out", str(out),
                         "--quiet"], capsys)
    assert code == 2 and "truncated or corrupt compressed data" in err and "Traceback" not in err
    assert not out.exists()  # nothing under the name asked for looks complete
    assert f"written before the stop is in {out}.partial" in err and len(_rows(f"{out}.partial")) > 0
    code, _, err = _run(["replay", str(full), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and len(_rows(out)) == 600 and not (tmp_path / "scores.csv.partial").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_an_output_that_fails_only_as_it_is_closed_is_named_and_the_other_kept_as_a_part(tmp_path, capsys):
    """The last lines of a file are written as it is closed: a full disk may say so only
    then.  That failure left the other output's part unmentioned and named no file."""
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,value\n" + "\n".join(_nab_rows(600)) + "\nnot a row\n")
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(path), "--warmup", "20", "--out", str(out), "--dead-letter", "/dev/full",
                         "--quiet"], capsys)
    assert code == 2 and "No space left on device: '/dev/full'" in err and "Traceback" not in err
    assert not out.exists() and f"written before the stop is in {out}.partial" in err
    assert len(_rows(f"{out}.partial")) == 600
    # and one that fails while the run writes it (600 rows: more than a buffer's worth) names its file too
    code, _, err = _run(["replay", str(path), "--warmup", "20", "--out", "/dev/full", "--quiet"], capsys)
    assert code == 2 and "No space left on device: '/dev/full'" in err


@pytest.mark.parametrize("content, check", [
    # a byte-order mark: still NAB's layout, real timestamps rather than row numbers
    ("\ufefftimestamp,value\n" + "\n".join(_nab_rows(40)), lambda r: r[0].ts == 1704067200.0),
    ("datetime,temp\n" + "\n".join(_nab_rows(40)), lambda r: r[1].ts - r[0].ts == 60 and "temp" in r[0].values),
])
def test_timestamp_columns_are_found_behind_a_bom_and_under_common_names(tmp_path, content, check):
    path = tmp_path / "sensor.csv"
    path.write_text(content + "\n", encoding="utf-8")
    readings = list(FileSource(path).readings())
    assert len(readings) == 40 and check(readings)


def test_only_ascii_numbers_are_numbers_and_a_mixed_first_row_is_not_guessed(tmp_path, capsys):
    path = tmp_path / "odd.csv"
    path.write_text("a,b,c\n1_000,１２,١٢\n1.5,2.5,3.5\n")
    batches = list(FileSource(path).batches())
    bad, = [b for batch in batches for b in batch.bad]  # one row: one record, naming its three cells
    assert bad.reason.value == "non_numeric_value" and bad.detail.count("is not a number") == 3
    smd = tmp_path / "machine.txt"
    smd.write_text("0.1,oops,0.3\n0.2,0.5,0.6\n")
    code, _, err = _run(["replay", str(smd), "--quiet"], capsys)
    assert code == 2 and "neither a header" in err and "'oops'" in err
    smd.write_text("0.1,,0.3\n0.2,0.5,0.6\n")  # a missing value in the first row: still data
    batch, = FileSource(smd).batches()
    assert [r.values for r in batch.readings] == [{"c0": 0.1, "c2": 0.3}, {"c0": 0.2, "c1": 0.5, "c2": 0.6}]
    assert [b.reason.value for b in batch.bad] == ["missing_value"]


def test_a_replay_that_accepts_nothing_fails(tmp_path, capsys):
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,value\n" + "\n".join(f"{r.split(',')[0]},n/a" for r in _nab_rows(5)) + "\n")
    code, _, err = _run(["replay", str(path), "--quiet"], capsys)
    assert code == 2 and "no reading was accepted (5 bad records)" in err


def test_bad_detector_flags_and_windows_files_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", "x.csv", "--drift-threshold", "nan"])
    assert exc.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["meta-train", "--data", "x.csv", "--out", "y.pt", "--inner-lr", "0"])
    from monitor.evaluation.windows import load_windows
    labels = tmp_path / "labels.json"
    labels.write_text('[["2014-01-01", "2014-01-02"]]')
    with pytest.raises(ValueError, match="expected an object of series names"):
        load_windows(labels)


def test_an_output_that_is_a_link_has_its_target_replaced_whole_and_the_link_kept(tmp_path, capsys):
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "real.csv"
    real.write_text("an earlier run\n")
    held = real.open()  # what a reader of the earlier file still sees: not overwritten in place
    link = tmp_path / "latest.csv"
    link.symlink_to(real)
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(link), "--quiet"], capsys)
    assert code == 0 and link.is_symlink() and len(_rows(real)) == 30, err
    assert held.read() == "an earlier run\n" and sorted(p.name for p in real.parent.iterdir()) == ["real.csv"]
    held.close()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # regular files under /dev too: replaced whole, not appended to
        import tempfile
        with tempfile.TemporaryDirectory(dir=shm) as folder:
            (Path(folder) / "real.csv").write_text("an earlier run\n")
            (Path(folder) / "link.csv").symlink_to(Path(folder) / "real.csv")
            code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(Path(folder) / "link.csv"),
                                 "--quiet"], capsys)
            assert code == 0 and (Path(folder) / "real.csv").read_text().startswith("ts,device"), err
    (tmp_path / "runs" / "dangling.csv").symlink_to(tmp_path / "runs" / "new.csv")  # a target not yet written
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(tmp_path / "runs" / "dangling.csv"),
                         "--quiet"], capsys)
    assert code == 0 and len(_rows(tmp_path / "runs" / "new.csv")) == 30, err


def test_a_second_replay_to_a_name_being_written_is_refused_and_a_stopped_runs_part_taken_over(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    out = tmp_path / "scores.csv"
    part = tmp_path / "scores.csv.partial"
    with open(part, "w") as running:  # another replay, still writing
        running.write("its rows so far\n")
        running.flush()
        fcntl.flock(running.fileno(), fcntl.LOCK_EX)
        code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
        assert code == 2 and f"--out {out}: another replay is writing it (it holds {part})" in err
        assert part.read_text() == "its rows so far\n" and not out.exists()
        # the dead-letter file opened first is left as it was found: nothing, no part
        code, _, err = _run(["replay", str(data), "--warmup", "20", "--dead-letter", str(tmp_path / "bad.jsonl"),
                             "--out", str(out), "--quiet"], capsys)
        assert code == 2 and "another replay is writing it" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv.partial", "sensor.csv"]
    # the writer stopped (its lock went with it): its part is a leftover, taken over and replaced
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and len(_rows(out)) == 30 and not part.exists(), err


def test_a_part_renamed_by_the_run_that_held_it_is_not_taken_over(tmp_path, capsys, monkeypatch):
    """Run A renames its part between run B's open and B's lock: B locked A's finished file,
    emptied it and wrote into it (a review's reproduction)."""
    import monitor.cli as cli
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    out, part = tmp_path / "scores.csv", tmp_path / "scores.csv.partial"
    part.write_text("run A's rows\n")
    real_lock, calls = cli._lock, []

    def lock_after_a_finished(fd):
        if not calls:
            os.replace(part, out)  # A, done: its part is its output now
        calls.append(fd)
        return real_lock(fd)
    monkeypatch.setattr(cli, "_lock", lock_after_a_finished)
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(tmp_path / "b.csv"), "--quiet"], capsys)
    assert code == 0, err  # another name: no race
    calls.clear()
    part.write_text("run A's rows\n")
    out.unlink()
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and len(calls) == 2, err  # opened again
    assert len(_rows(out)) == 30  # B's whole output, under the name, after A's


def test_a_write_error_found_only_when_the_part_is_synced_keeps_the_name_free_and_names_the_file(
        tmp_path, capsys, monkeypatch):
    """A quota or a network disk may report a failed write only when the file is synced or
    closed: the part took its name first, and the error named a descriptor ('4'), not the file."""
    import errno
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    out = tmp_path / "scores.csv"

    def over_quota(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(os, "fsync", over_quota)
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 2 and f"Disk quota exceeded: '{out}.partial'" in err, err
    assert not out.exists() and f"the output written before the stop is in {out}.partial" in err


def test_an_output_named_dash_is_standard_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\nnot a row\n")
    code, out, err = _run(["replay", str(data), "--warmup", "20", "--out", "-", "--quiet"], capsys)
    assert code == 0 and out.startswith("ts,device,score,anomaly,channel,surprise\n") and len(out.splitlines()) == 31
    assert "readings: 30" in err and not (tmp_path / "-").exists() and not (tmp_path / "-.partial").exists()
    code, out, err = _run(["replay", str(data), "--warmup", "20", "--dead-letter", "-", "--quiet"], capsys)
    assert code == 0 and json.loads(out)["reason"] == "malformed", out
    code, _, err = _run(["replay", str(data), "--out", "-", "--dead-letter", "-", "--quiet"], capsys)
    assert code == 2 and "the same file" in err
    # /dev/stdout is the same stream: opened by name it was truncated, a shell's >> file too
    code, out, err = _run(["replay", str(data), "--warmup", "20", "--out", "/dev/stdout", "--quiet"], capsys)
    assert code == 0 and len(out.splitlines()) == 31, err
    # other names of the process's stream are written through without truncating what the shell opened
    log = tmp_path / "log.txt"
    log.write_text("earlier\nlines\n")
    for name in ("/dev/fd/1", "/proc/self/fd/1", "//dev/stdout"):
        if not Path(name).exists():
            continue
        with open(log, "a") as appended:
            done = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", str(data), "--warmup", "20", "--out",
                                   name, "--quiet"], stdout=appended, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert log.read_text().startswith("earlier\nlines\nts,device"), name
        log.write_text("earlier\nlines\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, _, err = _run(["replay", str(data), "--out", str(tmp_path / "loop"), "--quiet"], capsys)
    assert code == 2 and "a loop of links" in err and "Traceback" not in err


def test_bytes_that_are_not_utf8_are_bad_records_not_a_guessed_name(tmp_path, capsys):
    """Latin-1 "pump-ä" and "pump-ö" are not one device "pump-?": each line that is not UTF-8 is
    refused as malformed, and the rest of the file goes on."""
    good = [_good("pümp", t, temp=float(t % 5)).encode() for t in range(40)]
    latin1 = [b'{"device": "pump-\xe4", "ts": 50, "value": 1.0}', b'{"device": "pump-\xf6", "ts": 50, "value": 1.0}']
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(good[:20] + latin1 + good[20:]) + b"\n")
    out, dlq = tmp_path / "scores.csv", tmp_path / "dead.jsonl"
    code, _, err = _run(["replay", str(path), "--warmup", "16", "--out", str(out), "--dead-letter", str(dlq),
                         "--quiet"], capsys)
    assert code == 0, err
    dead = [json.loads(line) for line in dlq.read_text(encoding="utf-8").splitlines()]
    assert [(d["reason"], d["detail"], d["ref"]) for d in dead] == [("malformed", "not valid UTF-8", "line 21"),
                                                                    ("malformed", "not valid UTF-8", "line 22")]
    assert "pump-\\xe4" in dead[0]["raw"] and "pump-\\xf6" in dead[1]["raw"]
    rows = _rows(out)
    assert len(rows) == 40 and {r["device"] for r in rows} == {"pümp"}
    # CSV: a data row is refused the same way; a header cannot be, since it names every channel
    nab = tmp_path / "sensor.csv"
    nab.write_bytes(b"timestamp,value\n" + "\n".join(_nab_rows(3)).encode() + b"\n2024-01-01 01:00:00,1.0\xa0\n")
    batch, = FileSource(nab).batches()
    assert len(batch.readings) == 3 and [str(b) for b in batch.bad] == ["line 5: malformed: not valid UTF-8"]
    wide = tmp_path / "wide.csv"
    wide.write_bytes(b"timestamp,temp\xb0C\n1,2.0\n")
    with pytest.raises(FileFormatError, match=r"wide.csv: line 1: not valid UTF-8: 'timestamp,temp\\xb0C'"):
        list(FileSource(wide).batches())
    bom = tmp_path / "bom.jsonl"  # a byte-order mark is still no part of the first line
    bom.write_bytes(b"\xef\xbb\xbf" + good[0] + b"\n")
    batch, = FileSource(bom).batches()
    assert len(batch.readings) == 1 and not batch.bad


def _corrupt_gzip(path, text):
    data = bytearray(gzip.compress(text.encode(), mtime=0))
    data[12:40] = b"\xff" * 28  # the first deflate block: zlib refuses it at the first read
    path.write_bytes(bytes(data))


def test_a_corrupt_gzip_whose_format_is_guessed_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "corrupt.csv.gz"
    _corrupt_gzip(path, "timestamp,value\n" + "\n".join(_nab_rows(600)) + "\n")
    for args in (["replay", str(path), "--quiet"],
                 ["replay-to-kafka", str(path), "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--quiet"],
                 ["meta-train", "--data", str(path), "--out", str(tmp_path / "init.pt"), "--quiet"]):
        code, _, err = _run(args, capsys)
        assert code == 2 and "truncated or corrupt compressed data" in err and "Traceback" not in err, args


def test_the_readings_before_a_cut_in_a_gzip_are_scored(tmp_path, capsys):
    full = gzip.compress(("timestamp,value\n" + "\n".join(_nab_rows(600)) + "\n").encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(full[:len(full) // 2])
    out = tmp_path / "scores.csv"
    # one batch would hold the whole file: what was read before the cut is in no complete batch
    code, _, err = _run(["replay", str(cut), "--warmup", "20", "--out", str(out), "--quiet"], capsys)
    assert code == 2
    read = int(re.search(r"corrupt compressed data after (\d+) records", err).group(1))
    assert read > 0 and len(_rows(f"{out}.partial")) == read


def test_replay_to_kafka_of_a_cut_gzip_says_how_many_readings_it_published(tmp_path, capsys, broker):
    """So that a rerun is not taken for a resume: it would publish them again."""
    from tests.kafka_support import read_topic
    full = gzip.compress(("timestamp,value\n" + "\n".join(_nab_rows(600)) + "\n").encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(full[:len(full) // 2])
    broker.create_topics({"cut-readings": 1})
    code, out, err = _run(["replay-to-kafka", str(cut), "--topic", "cut-readings", "--bootstrap-servers",
                           broker.bootstrap, "--max", "--quiet"], capsys)
    published = int(re.search(r"; the ([\d,]+) readings before it were published to cut-readings and "
                              r"acknowledged", err).group(1).replace(",", ""))
    assert code == 2 and "truncated or corrupt compressed data" in err and "Traceback" not in err
    assert published > 0 and len(read_topic(broker.bootstrap, "cut-readings")) == published


def test_outputs_that_would_overwrite_the_recording_or_each_other_are_refused(tmp_path, capsys):
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    recording = data.read_text()
    same = tmp_path / "same.out"
    code, _, err = _run(["replay", str(data), "--out", str(same), "--dead-letter", str(same), "--quiet"], capsys)
    assert code == 2 and "--out and --dead-letter are the same file" in err
    assert not same.exists() and not (tmp_path / "same.out.partial").exists()
    # o is written as o.partial until complete: the dead letters would be overwritten, then renamed
    for out, dlq in (("o.partial", "o"), ("o", "o.partial")):
        code, _, err = _run(["replay", str(data), "--out", str(tmp_path / out), "--dead-letter",
                             str(tmp_path / dlq), "--quiet"], capsys)
        assert code == 2 and "would overwrite each other" in err, (out, dlq)
        assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
    link = tmp_path / "link.csv"
    link.symlink_to(data)
    for args in (["--out", str(data)], ["--dead-letter", str(data)], ["--out", str(link)]):
        code, _, err = _run(["replay", str(data), *args, "--quiet"], capsys)
        assert code == 2 and "is the recording being replayed" in err, args
        assert data.read_text() == recording and not (tmp_path / "sensor.csv.partial").exists()
    # an output is written as NAME.partial until complete: that must not be the recording either
    leftover = tmp_path / "scores.csv.partial"  # what a stopped run leaves, replayed
    leftover.write_text(recording)
    for args in (["--out", str(tmp_path / "scores.csv")], ["--dead-letter", str(tmp_path / "scores.csv")]):
        code, _, err = _run(["replay", str(leftover), *args, "--quiet"], capsys)
        assert code == 2 and "is the recording being replayed" in err, args
        assert leftover.read_text() == recording
    elsewhere = tmp_path / "keep.txt"
    elsewhere.write_text("keep")
    (tmp_path / "out.csv.partial").symlink_to(elsewhere)  # would be written through
    code, _, err = _run(["replay", str(data), "--out", str(tmp_path / "out.csv"), "--quiet"], capsys)
    assert code == 2 and "out.csv.partial is in the way" in err and elsewhere.read_text() == "keep"
    # a device may take both
    code, _, err = _run(["replay", str(data), "--warmup", "20", "--out", os.devnull, "--dead-letter", os.devnull,
                         "--quiet"], capsys)
    assert code == 0, err
    for flag in ("--out", "--dead-letter"):  # `--dead-letter "$DLQ"` with DLQ unset kept nothing
        code, _, err = _run(["replay", str(data), flag, "", "--quiet"], capsys)
        assert code == 2 and f"{flag}: an empty file name" in err


@pytest.mark.parametrize("out", ["/dev/fd/1", "FILE"])
def test_standard_output_under_two_names_is_one_file_and_refused(tmp_path, out):
    """`--dead-letter -` with standard output sent to the --out file, or to /dev/fd/1 given as
    --out: two buffers into one file lost lines (or the scores' rename unlinked the dead letters)."""
    data = tmp_path / "pump.jsonl"
    data.write_text("".join(json.dumps({"device": "p", "ts": t, "value": t % 5}) + "\n" for t in range(40))
                    + "garbage\n")
    target = tmp_path / "both.txt"
    out = str(target) if out == "FILE" else out
    with open(target, "w") as stdout:
        result = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", str(data), "--warmup", "16",
                                 "--quiet", "--out", out, "--dead-letter", "-"], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "--out and --dead-letter are the same file" in result.stderr
    assert target.read_text() == ""  # nothing written


def test_a_replaced_output_keeps_its_permissions(tmp_path, capsys):
    data = tmp_path / "pump.jsonl"
    data.write_text("".join(json.dumps({"device": "p", "ts": t, "value": t % 5}) + "\n" for t in range(40))
                    + "garbage\n")
    dlq = tmp_path / "dead.jsonl"
    dlq.write_text("")
    dlq.chmod(0o600)  # raw records, kept private
    code, _, err = _run(["replay", str(data), "--warmup", "16", "--dead-letter", str(dlq), "--quiet"], capsys)
    assert code == 0, err
    assert dlq.stat().st_mode & 0o777 == 0o600 and "garbage" in dlq.read_text()


def test_a_dead_letter_file_that_cannot_be_opened_leaves_no_partial_output(tmp_path, capsys):
    data = tmp_path / "sensor.csv"
    data.write_text("timestamp,value\n" + "\n".join(_nab_rows(30)) + "\n")
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(data), "--out", str(out), "--dead-letter", str(tmp_path / "no" / "dead.jsonl"),
                         "--quiet"], capsys)
    assert code == 2 and f"no folder {tmp_path / 'no'} to write it in" in err  # said before anything is opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensor.csv"]
    code, _, err = _run(["replay", str(data), "--out", str(out), "--dead-letter", str(tmp_path / ("d" * 300)),
                         "--quiet"], capsys)  # one the system refuses only when it is opened
    assert code == 2 and "File name too long" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sensor.csv"]


@pytest.mark.parametrize("args, message", [
    (["replay-to-kafka", "x.csv", "--topic", "t", "--speed", "nan"], "must be a finite number"),
    (["replay-to-kafka", "x.csv", "--topic", "t", "--speed", "0"], "must be a finite number > 0, got 0"),
    (["demo", "--speed", "inf"], "must be a finite number"),
    (["demo", "--speed", "-2"], "must be a finite number > 0, got -2"),
    (["demo", "--metrics-port", "70000"], "must be in 0..65535"),
    (["demo", "--metrics-port", "-1"], "must be in 0..65535"),
])
def test_pace_and_port_flags_are_checked_when_parsed(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


class _Acknowledged:
    """A send's future, acknowledged at once."""

    def failed(self) -> bool:
        return False

    def add_callback(self, fn, *args):
        fn(*args, None)
        return self

    def add_errback(self, fn, *args):
        return self


class _Producer:
    """Takes what replay-to-kafka publishes, without a broker."""

    sent: list = []

    def __init__(self, **kwargs) -> None:
        pass

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))
        return _Acknowledged()

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


def test_replay_to_kafka_of_a_recording_with_no_reading_fails_as_replay_does(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kafka.KafkaProducer", _Producer)
    monkeypatch.setattr(_Producer, "sent", [])
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,value\n" + "\n".join(f"{r.split(',')[0]},n/a" for r in _nab_rows(5)) + "\n")
    code, out, err = _run(["replay-to-kafka", str(path), "--topic", "t", "--quiet"], capsys)
    assert code == 2 and "no reading was accepted (5 bad records)" in err and not _Producer.sent
    path.write_text("timestamp,value\n" + "\n".join(_nab_rows(5)) + "\n")
    code, out, err = _run(["replay-to-kafka", str(path), "--topic", "t", "--quiet"], capsys)
    assert code == 0 and out.startswith("published 5 readings") and len(_Producer.sent) == 5


def test_replay_to_kafka_refuses_a_pace_that_would_wait_for_ever_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kafka.KafkaProducer", _Producer)
    monkeypatch.setattr(_Producer, "sent", [])
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,value\n" + "\n".join(_nab_rows(5)) + "\n")
    # a minute between readings is 6e301 s at this speed: time.sleep overflowed on it
    code, out, err = _run(["replay-to-kafka", str(path), "--topic", "t", "--quiet", "--speed", "1e-300"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "at speed 1e-300 would hold the reading" in err and "give a larger --speed (1 published before it)" in err
    assert len(_Producer.sent) == 1  # the first reading is due at once


def test_replay_to_kafka_shows_progress_between_readings_at_a_slow_pace(tmp_path, monkeypatch):
    from connectors.kafka import publish_recording
    monkeypatch.setattr(_Producer, "sent", [])
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,value\n" + "\n".join(_nab_rows(12)) + "\n")
    seen: list[int] = []  # readings sent when progress was reported
    # a minute a reading at --speed 300 is 0.2 s: 2.2 s in all, in one batch of the file
    sent, _ = publish_recording(FileSource(path, "nab").batches(), _Producer(), "t", 300,
                                lambda n: seen.append(len(_Producer.sent)))
    assert sent == 12 and seen[-1] == 12
    assert any(n < 12 for n in seen), "progress was reported only once the batch was done"


def test_demo_without_a_broker_is_a_clear_error(capsys, monkeypatch):
    from connectors.tansu import EmbeddedBroker

    def cannot_start(self, timeout=10.0):
        raise RuntimeError("the broker exited at start (code 1)")
    monkeypatch.setattr(EmbeddedBroker, "start", cannot_start)
    code, _, err = _run(["demo", "--quiet"], capsys)
    assert code == 2 and "the embedded Kafka broker did not start: the broker exited at start" in err
    assert "--offline" in err and "Traceback" not in err


@pytest.mark.parametrize("rows", [3000, 20000])  # the second runs past the csv module's 131,072-character cell
def test_a_quote_left_open_costs_its_own_line_not_the_rows_after_it(tmp_path, rows):
    path = tmp_path / "pump.csv"
    lines = ["timestamp,value"] + [f"{t},{t % 7}.5" for t in range(rows)]
    lines[501] = '500,"7.5'  # the quote never closes
    path.write_text("\n".join(lines) + "\n")
    readings, bad = [], []
    for batch in FileSource(path).batches():
        readings += batch.readings
        bad += batch.bad
    assert [(b.reason.value, b.ref, b.raw) for b in bad] == [("malformed", "line 502", '500,"7.5')]
    assert len(readings) == rows - 1 and readings[500].ref == "line 503"


@pytest.mark.parametrize("text, readings, bad_lines", [
    # the open quote takes in a quoted next row as the text after a line break: that row was lost
    ('ts,a\n1,"\n2,"5"\n3,6\n', [(2.0, 5.0), (3.0, 6.0)], ["line 2"]),
    ('timestamp,a\n2024-01-01 00:00:00,"\n"2024-01-01 00:01:00",5\n', [(1704067260.0, 5.0)], ["line 2"]),
    # ... or makes a row of the wrong width of the two
    ('ts,a,b\n1,1,"\n"2",5,6\n', [(2.0, 5.0)], ["line 2"]),
    # a value over two lines is one value, its line break before or after it
    ('ts,a\n1,"5\n"\n2,6\n', [(1.0, 5.0), (2.0, 6.0)], []),
    ('ts,a\n1,"\n5"\n2,6\n', [(1.0, 5.0), (2.0, 6.0)], []),
])
def test_a_quote_left_open_does_not_swallow_the_row_after_it(tmp_path, text, readings, bad_lines):
    path = tmp_path / "pump.csv"
    path.write_text(text)
    batch, = FileSource(path).batches()
    assert [(r.ts, r.values["a"]) for r in batch.readings] == readings
    assert [b.ref for b in batch.bad] == bad_lines and {b.reason.value for b in batch.bad} <= {"malformed"}


def test_a_column_of_basic_form_dates_is_refused_not_read_as_epoch_seconds_in_1970(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text("date,sales\n20240130,5\n20240131,6\n")
    with pytest.raises(FileFormatError, match="line 2: the timestamp 20240130 looks like the date 2024-01-30 "
                                              "written YYYYMMDD"):
        list(FileSource(path).batches())
    # epoch seconds whose digits spell a date further down are epoch seconds (the first one decides)
    epoch = tmp_path / "epoch.csv"
    epoch.write_text("ts,v\n" + "".join(f"{t},{t % 7}\n" for t in range(20000095, 20000140)))
    batch, = FileSource(epoch).batches()
    assert len(batch.readings) == 45 and not batch.bad


def test_a_quoted_empty_cell_in_one_column_is_a_missing_value_not_a_blank_line(tmp_path):
    path = tmp_path / "flow.csv"
    path.write_text('a\n1\n""\n\n2\n')
    batch, = FileSource(path).batches()
    assert [(r.ts, r.values["a"]) for r in batch.readings] == [(0.0, 1.0), (2.0, 2.0)]  # the empty cell took row 1
    assert [(b.reason.value, b.ref) for b in batch.bad] == [("missing_value", "line 3")]


@pytest.mark.parametrize("tail, readings, lines_read_again", [
    ('2,"2\n', [1.0], []),              # csv.reader closes the quote at the end of the file without a word
    ('2,"2', [1.0], []),                 # and with no line end
    ('2,"\n3,3\n', [1.0, 3.0], [4]),     # the row after it is read again, under its own line
    ('2,"2\n\n\n', [1.0], []),
])
def test_a_quote_left_open_at_the_end_of_the_file_is_malformed_not_a_value(tmp_path, tail, readings,
                                                                          lines_read_again):
    path = tmp_path / "pump.csv"
    path.write_text("ts,a\n1,1\n" + tail)
    batch, = FileSource(path).batches()
    assert [(b.reason.value, b.ref) for b in batch.bad] == [("malformed", "line 3")]
    assert [r.values["a"] for r in batch.readings] == readings
    assert [int(r.ref.split()[1]) for r in batch.readings[1:]] == lines_read_again
    headerless = tmp_path / "flow.csv"  # the row after it keeps its own timestamp (its row number)
    headerless.write_text('1\n2\n"\n4\n')
    batch, = FileSource(headerless).batches()
    assert [(r.ts, r.values["c0"]) for r in batch.readings] == [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)]
    assert [b.ref for b in batch.bad] == ["line 3"]


def test_a_dead_letter_keeps_the_csv_row_as_written(tmp_path):
    path = tmp_path / "pump.csv"
    path.write_text('ts,a\n5,"1,5"\n6,"x\n"\n')  # the second one's cell spans two lines
    batch, = FileSource(path).batches()
    assert [b.raw for b in batch.bad] == ['5,"1,5"', '6,"x\n"']  # not 5,1,5: three fields


@pytest.mark.parametrize("header", ["timestamp,time,a", "ts,TS,a", "date,time,a"])
def test_a_header_with_two_time_columns_is_refused_rather_than_guessed(tmp_path, header):
    path = tmp_path / "pump.csv"
    path.write_text(header + "\n2024-01-01 00:00:00,1704067200,1.5\n")
    with pytest.raises(FileFormatError, match="each name a time; keep one timestamp column"):
        list(FileSource(path).batches())


def test_a_file_whose_name_is_no_device_name_is_refused_naming_it(tmp_path):
    """A single-device file's device is its name: empty, or not UTF-8 (a Latin-1 name on Linux),
    it would fail every output later, or become a name no message could carry."""
    rows = "timestamp,value\n" + "\n".join(_nab_rows(5)) + "\n"
    for name in (b".csv", b"pump-\xe4.csv"):
        path = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
        path.write_text(rows)
        with pytest.raises(FileFormatError, match="rename the file"):
            FileSource(path)

    long = tmp_path / "wide.csv"
    long.write_text("timestamp," + "c" * 300 + "\n1,2.0\n")
    with pytest.raises(FileFormatError, match="channel name of 300 characters, more than 256"):
        list(FileSource(long, "wide").batches())


@pytest.mark.parametrize("text, expected", [
    ("2023-11-14T22:13:20Z", 1700000000.0),
    ("2023-11-14t22:13:20z", 1700000000.0),
    ("2023-11-14T22:13:20.5Z", 1700000000.5),        # refused by Python 3.10's fromisoformat
    ("2023-11-14T22:13:20.123456789Z", 1700000000.123456789),  # cut to microseconds by 3.11's
    ("2023-11-14T22:13:20,25Z", 1700000000.25),
    ("2023-11-14 23:13:20+01:00", 1700000000.0),
    ("2023-11-14 23:13:20+0100", 1700000000.0),       # refused by 3.10's
    ("2023-11-14T17:13:20-05", 1700000000.0),
    ("2023-11-14 22:13", 1699999980.0),
    ("2023-11-14", 1699920000.0),
    (" 2023-11-14 22:13:20 ", 1700000000.0),
])
def test_iso_timestamps_are_read_the_same_on_every_python_version(text, expected):
    from monitor.readings import parse_timestamp
    assert parse_timestamp(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["20231114", "2023-W46-2", "2023-318", "20231114T221320Z",  # taken by 3.11's
                                  "2023-02-30", "2023-11-14T24:00", "2023-11-14T22:13:20+24:00", "1700000000",
                                  "2023-11-14Z", "", "yesterday", "2023-11-14T22:13:20+00:99",
                                  "\u0662\u0660\u0662\u0663-11-14"])  # other scripts' digits
def test_other_timestamp_strings_are_refused_with_the_forms_taken(text):
    from monitor.readings import parse_message
    bad, = parse_message(json.dumps({"device": "p", "ts": text, "value": 1.0})).bad
    assert bad.reason.value == "bad_timestamp" and "YYYY-MM-DD" in bad.detail


def test_a_header_whose_quote_is_left_open_is_refused_and_no_output_is_left_behind(tmp_path, capsys):
    """The open quote would swallow the data lines after it into one channel name."""
    path = tmp_path / "pump.csv"
    path.write_text('ts,"temp\n1,2\n3,4"\n5,6\n7,8\n')
    out, dlq = tmp_path / "scores.csv", tmp_path / "dead.jsonl"
    code, _, err = _run(["replay", str(path), "--out", str(out), "--dead-letter", str(dlq), "--quiet"], capsys)
    assert code == 2 and "pump.csv: line 1: a quoted cell runs over the lines after it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pump.csv"]  # no output, whole or partial
    path.write_text('\nts,temp,"pres\nsure"\n1,2,3\n')  # closed, but a line break in a name
    with pytest.raises(FileFormatError, match="line 2: a quoted cell runs over the lines after it"):
        list(FileSource(path).batches())


def test_blank_lines_before_a_header_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "pump.csv"
    path.write_text("\n\ntimestamp,value\n" + "\n".join(_nab_rows(3)) + "\n2024-01-01 01:00:00,oops\n")
    batch, = FileSource(path).batches()
    assert len(batch.readings) == 3 and [b.ref for b in batch.bad] == ["line 7"]
    fleet = tmp_path / "fleet.txt"  # a JSONL file by its first line that is not blank
    fleet.write_text("\n" + _good("p1", 1, temp=1.0) + "\n")
    assert FileSource(fleet).format == "jsonl"


def test_a_jsonl_line_ends_at_lf_alone_where_a_cr_is_the_json_s_white_space(tmp_path):
    """JSON Lines separates records by LF; a CR inside a line is white space between tokens
    (a file edited on two systems), not a line break that would make two malformed records."""
    path = tmp_path / "fleet.jsonl"
    path.write_bytes(b'{"device": "p1", "ts": 1,\r"value": 1.5}\r\n{"device": "p1", "ts": 2, "value": 2.5}\r\n'
                     b'{"device": "p1",\r "ts": 3\n')
    batch, = FileSource(path).batches()
    assert [(r.ts, r.values) for r in batch.readings] == [(1.0, {"value": 1.5}), (2.0, {"value": 2.5})]
    assert [(b.ref, b.reason.value) for b in batch.bad] == [("line 3", "malformed")]  # numbered as an editor does


def test_every_dead_letter_of_a_replay_carries_its_record(tmp_path, capsys):
    """The pipeline's rejections (duplicate and out-of-order timestamps) name only a line; the
    dead letter keeps the record, as on Kafka, so that the values are not lost."""
    lines = [_good("p1", t, temp=float(t % 5)) for t in range(40)]
    lines[20] = _good("p1", 18, temp=99.0)                                      # out of order
    lines.append('{"device": "p1", "device": "p2", "ts": 50, "value": 1.0}')    # which device?
    lines.append('{"device": "p1", "ts": 51, "values": {"a": 1.0}, "value": 2.0}')
    lines.append("\f")                                                          # not a blank line
    lines.append('{"device": "p1", "ts": 52, "values": {}, "value": 2.0}')      # both, one of them empty
    lines.append('{"device": "p1", "ts": 53, "values": null, "value": 2.0}')
    path = tmp_path / "fleet.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dlq = tmp_path / "dead.jsonl"
    code, _, err = _run(["replay", str(path), "--warmup", "16", "--dead-letter", str(dlq), "--quiet"], capsys)
    assert code == 0, err
    dead = {d["ref"]: d for d in map(json.loads, dlq.read_text().splitlines())}
    assert dead["line 21"]["reason"] == "out_of_order_timestamp" and dead["line 21"]["raw"] == lines[20]
    assert "'device' appears twice" in dead["line 41"]["detail"]
    assert dead["line 42"]["reason"] == "malformed" and "both 'values' and 'value'" in dead["line 42"]["detail"]
    assert dead["line 43"]["reason"] == "malformed"
    for ref in ("line 44", "line 45"):  # the shape is wrong, whatever the two hold
        assert dead[ref]["reason"] == "malformed" and "both 'values' and 'value'" in dead[ref]["detail"]
    assert all(d["raw"] for d in dead.values())


def test_a_recording_from_a_pipe_is_replayed_whole(tmp_path, capsys):
    """Read once: its first batch, read before the outputs are opened, is not read again."""
    import threading
    lines = [_good(f"p{t % 3}", t // 3, temp=float(t % 7)) for t in range(3000)]
    fifo = tmp_path / "readings"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as f:
            f.write("\n".join(lines) + "\n")
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    out = tmp_path / "scores.csv"
    code, _, err = _run(["replay", str(fifo), "--format", "jsonl", "--warmup", "16", "--out", str(out),
                         "--quiet"], capsys)
    writer.join(30)
    assert code == 0, err
    assert len(_rows(out)) == 3000
    with pytest.raises(FileFormatError, match="not a regular file .a pipe..: give its format"):
        FileSource(fifo)


def test_a_wide_row_refused_on_many_cells_is_one_bad_record_per_reason(tmp_path):
    """As a JSON message is: a row of 40 channels with 39 empty cells is one missing_value record."""
    path = tmp_path / "machine.csv"
    header = "timestamp," + ",".join(f"c{i}" for i in range(40))
    rows = [f"{t}," + ",".join(str(t % 5 + i) for i in range(40)) for t in range(5)]
    rows.append("5," + "," * 39 + "1.0")  # only the last channel has a value
    rows.append("6,x,y," + ",".join("1" for _ in range(38)))
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    batch, = FileSource(path, "wide").batches()
    assert [(b.ref, b.reason.value) for b in batch.bad] == [("line 7", "missing_value"),
                                                            ("line 8", "non_numeric_value")]
    assert batch.bad[0].detail.startswith("device 'machine' channels 'c0', 'c1',")
    assert batch.bad[1].detail == "device 'machine' channels 'c0': 'x' is not a number; 'c1': 'y' is not a number"
    assert len(batch.readings) == 7  # the good cells of both rows are kept


def test_a_replay_stopped_by_sigterm_says_where_its_part_went_and_exits_143(tmp_path):
    """As Ctrl-C does: before, SIGTERM (a container stopped, `timeout`) ended it without a word."""
    import signal

    from tests.kafka_support import wait_for
    data = tmp_path / "long.csv"
    data.write_text("timestamp,value\n" + "".join(f"{1_700_000_000 + 60 * t},{t % 7}\n" for t in range(60_000)))
    out = tmp_path / "scores.csv"
    replay = subprocess.Popen([sys.executable, "-m", "monitor.cli", "--threads", "1", "replay", str(data), "--out",
                               str(out), "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        partial = tmp_path / "scores.csv.partial"
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 120, what="the replay under way")
        replay.send_signal(signal.SIGTERM)
        _, err = replay.communicate(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
    assert replay.returncode == 143, err
    assert f"the output written before the stop is in {partial}" in err and "forewarn: interrupted" in err
    assert not out.exists() and "Traceback" not in err


def test_an_alarm_surprise_above_the_channel_cap_is_warned_of_where_channels_are_combined(tmp_path, capsys):
    """A channel counts for at most 50 in the joint surprise: two channels, one gone wild,
    reach ~49.7, so an alarm surprise of 64 never flagged a one-channel fault on them."""
    path = tmp_path / "two.jsonl"
    path.write_text("\n".join(_good("d", t, a=float(t % 3) if t != 50 else 1e12, b=float(t % 2))
                              for t in range(60)) + "\n")
    single = tmp_path / "one.jsonl"  # NAB-like: single metrics, not capped, nothing to warn of
    single.write_text("\n".join(_good("d", t, a=float(t % 3)) for t in range(60)) + "\n")
    for options, recording, warned in ((["--alarm-surprise", "64"], path, True),
                                       (["--alarm-surprise", "40"], path, False),
                                       (["--alarm-surprise", "64", "--channel-combination", "max"], path, False),
                                       (["--alarm-surprise", "64"], single, False)):
        code, _, err = _run(["replay", str(recording), "--warmup", "16", "--quiet", *options], capsys)
        assert code == 0 and err.count("warning: alarm surprise 64 is above 49.7") == warned, options


def test_standard_output_closed_is_a_clear_error_and_leaves_no_part(tmp_path):
    """Started with >&-, Python has no sys.stdout: the replay ended in an AttributeError and left
    the other output's part behind."""
    data = tmp_path / "pump.jsonl"
    data.write_text("".join(json.dumps({"device": "p", "ts": t, "value": t % 5}) + "\n" for t in range(40)))
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", str(data), "--warmup", "16", "--quiet",
                             "--out", str(tmp_path / "scores.csv"), "--dead-letter", "-"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                            preexec_fn=lambda: os.close(1))
    assert result.returncode == 2 and "--dead-letter -: standard output is closed" in result.stderr
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["pump.jsonl"]
