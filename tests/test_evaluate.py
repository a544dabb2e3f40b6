import json

from monitor.cli import main


def test_evaluate_nab_writes_a_report_for_every_detector(data_dir, tmp_path, capsys):
    code = main(["evaluate", "--dataset", "nab", "--windows", "combined_windows_tiny.json",
                 "--detectors", "forewarn", "zscore", "--report", str(tmp_path), "--no-adaptation-plot", "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| forewarn |" in table and "| zscore |" in table
    results = json.loads((tmp_path / "nab.json").read_text())
    for detector in ("forewarn", "zscore"):
        for profile in ("standard", "reward_low_FP", "reward_low_FN"):
            assert -100 <= results[detector][profile]["normalized"] <= 100
    assert (tmp_path / "nab.md").read_text().startswith("| detector |")
    assert (tmp_path / "nab_series.png").stat().st_size > 10_000
    # each file is written as a part and renamed with the others at the end: no part is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nab.json", "nab.md", "nab_series.png"]


def test_evaluate_smd_on_one_held_out_machine(data_dir, capsys):
    assert main(["evaluate", "--dataset", "smd", "--machines", "2-8", "--detectors", "zscore", "--quiet"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| zscore |"))
    values = [float(v) for v in row.strip("| ").split("|")[1:]]
    assert all(0 <= v <= 1 for v in values)
    pointwise, _, _, pa, _ = values
    assert pa >= pointwise  # point adjustment only ever inflates


def test_unknown_detector_is_a_clear_error(capsys):
    assert main(["evaluate", "--dataset", "nab", "--detectors", "magic", "--quiet"]) == 2
    assert "unknown detector 'magic'" in capsys.readouterr().err


def test_damaged_or_mismatched_benchmark_files_are_clear_errors(tmp_path, capsys):
    import gzip

    import numpy as np
    import pytest

    from connectors.files import FileFormatError
    from monitor.evaluation.harness import evaluate_smd
    smd = tmp_path / "smd"
    for split in ("train", "test", "test_label"):
        (smd / split).mkdir(parents=True)
    rows = "\n".join(",".join(f"{(t * c) % 7 / 7:.3f}" for c in range(3)) for t in range(400)) + "\n"
    for split in ("train", "test"):
        with gzip.open(smd / split / "machine-9-9.txt.gz", "wt") as f:
            f.write(rows)
    np.savetxt(smd / "test_label" / "machine-9-9.txt", np.zeros(399, dtype=int), fmt="%d")  # one short
    with pytest.raises(FileFormatError, match="a label per test row"):
        evaluate_smd([], tmp_path, ["9-9"])
    train = smd / "train" / "machine-9-9.txt.gz"
    train.write_bytes(train.read_bytes()[:len(train.read_bytes()) // 2])
    code = main(["evaluate", "--dataset", "smd", "--data", str(tmp_path), "--machines", "9-9",
                 "--detectors", "zscore", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "machine-9-9.txt.gz: unreadable" in err and "Traceback" not in err


def test_plot_flags_draws_one_panel_per_detector_with_its_count(tmp_path, monkeypatch):
    import numpy as np

    from monitor.evaluation import plots
    titles = []
    pyplot = plots._pyplot()
    real_subplots = pyplot.subplots

    def subplots(*args, **kwargs):  # keep the axes to read their titles
        fig, axes = real_subplots(*args, **kwargs)
        titles.append(axes)
        return fig, axes
    monkeypatch.setattr(pyplot, "subplots", subplots)
    ts = np.arange(0.0, 3000.0, 300.0)
    values = np.sin(ts / 900.0)
    flags = {"a": values > 0.9, "b": np.zeros(len(ts), dtype=bool)}
    plots.plot_flags(tmp_path / "flags.png", ts, values, flags, [(600.0, 1200.0)], "two detectors")
    assert (tmp_path / "flags.png").read_bytes()[:4] == b"\x89PNG"
    assert [ax.get_title(loc="left") for ax in titles[0][:, 0]] == \
        [f"a: {int((values > 0.9).sum())} readings flagged", "b: 0 readings flagged"]


def test_plot_threshold_curves_draws_a_panel_per_profile(tmp_path, monkeypatch):
    from monitor.evaluation import plots
    drawn = []
    pyplot = plots._pyplot()
    real_subplots = pyplot.subplots

    def subplots(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        drawn.append(axes)
        return fig, axes
    monkeypatch.setattr(pyplot, "subplots", subplots)
    panels = {"standard": {"a, even": [1.0, 2.0], "a, odd": [0.5, 1.5]}, "reward_low_FP": {"a, even": [0.0, 1.0]}}
    plots.plot_threshold_curves(tmp_path / "curve.png", [3.0, 30.0], panels, {"picked": 10.0}, "t")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    axes = drawn[0][0]
    assert [ax.get_title() for ax in axes] == ["standard", "reward_low_FP"]
    assert [len(ax.get_lines()) for ax in axes] == [3, 2]  # the curves and the mark
    assert axes[0].get_xscale() == "log"


def test_baselines_skip_gaps_and_rank_a_spike_beside_a_constant_channel():
    # A NaN once blinded zscore and pad-hw for the rest of the series, and River's PAD scored a
    # constant channel 1.0 on every reading: the spike then tied with everything.
    import numpy as np

    from monitor.evaluation.detectors import BASELINES

    rng = np.random.default_rng(0)
    values = np.column_stack([np.sin(np.arange(600) / 10) + rng.normal(0, 0.05, 600), np.full(600, 3.0)])
    values[300, 0] = np.nan
    values[500, 0] += 4.0
    for name in ("zscore", "pad-hw", "novelty"):
        scores = BASELINES[name].score(values, 0)
        assert np.isfinite(scores).all(), name
        assert int(scores.argmax()) == 500, name
        assert len(np.unique(scores[400:])) > 100 or name == "novelty", name  # a ranking, not a flag


def _smd_layout(root, labels_by_machine):
    import gzip

    import numpy as np
    rng = np.random.default_rng(1)
    for split in ("train", "test", "test_label"):
        (root / "smd" / split).mkdir(parents=True, exist_ok=True)
    for machine, labels in labels_by_machine.items():
        for split, n in (("train", 300), ("test", len(labels))):
            values = rng.normal(0, 1, (n, 2))
            if split == "test":
                values[np.flatnonzero(labels), 0] += 8.0
            with gzip.open(root / "smd" / split / f"machine-{machine}.txt.gz", "wt") as f:
                np.savetxt(f, values, delimiter=",", fmt="%.4f")
        np.savetxt(root / "smd" / "test_label" / f"machine-{machine}.txt", labels, fmt="%d")


def test_a_machine_without_labelled_anomalies_is_left_out_of_the_means(tmp_path, capsys):
    # It used to add an F1 of 0 to every detector's mean and make the AUPRC NaN (and the JSON invalid).
    import numpy as np
    labels = np.zeros(400, dtype=int)
    labels[200:205] = 1
    _smd_layout(tmp_path / "data", {"9-1": labels, "9-2": np.zeros(400, dtype=int)})

    def table(machines):
        assert main(["evaluate", "--dataset", "smd", "--data", str(tmp_path / "data"), "--machines", *machines,
                     "--detectors", "zscore", "--quiet", "--report", str(tmp_path / "r"), "--no-adaptation-plot"]) == 0
        return capsys.readouterr().out

    both, alone = table(["9-2", "9-1"]), table(["9-1"])
    row = next(line for line in both.splitlines() if line.startswith("| zscore |"))
    assert row == next(line for line in alone.splitlines() if line.startswith("| zscore |"))
    assert "nan" not in row and "machine 9-2" in both
    numbers = json.loads((tmp_path / "r" / "smd.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert numbers["zscore"]["auprc"] > 0
    assert main(["evaluate", "--dataset", "smd", "--data", str(tmp_path / "data"), "--machines", "9-2",
                 "--detectors", "zscore", "--quiet"]) == 2
    assert "no labelled anomaly" in capsys.readouterr().err


def test_a_nab_series_too_short_to_score_is_a_clear_error(tmp_path, capsys):
    nab = tmp_path / "nab"
    (nab / "data" / "x").mkdir(parents=True)
    (nab / "labels").mkdir()
    (nab / "data" / "x" / "one.csv").write_text("timestamp,value\n2020-01-01 00:00:00,1.0\n")
    (nab / "labels" / "w.json").write_text(json.dumps({"x/one.csv": []}))
    assert main(["evaluate", "--dataset", "nab", "--data", str(tmp_path), "--windows", "w.json",
                 "--detectors", "zscore", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "one.csv" in err and "Traceback" not in err


def test_the_adaptation_figure_reports_its_progress_point_by_point(monkeypatch, tmp_path):
    """It takes minutes, and showed nothing while it ran."""
    import monitor.datasets
    import monitor.evaluation.plots
    import monitor.meta
    from monitor.evaluation.harness import ADAPT_KS, adaptation_figure
    monkeypatch.setattr(monitor.datasets, "held_out_tasks", lambda *a, **k: (None, None))
    monkeypatch.setattr(monitor.datasets, "meta_train_tasks", lambda *a, **k: (None, None))
    monkeypatch.setattr(monitor.meta, "adaptation_mse", lambda *a, **k: 1.0)
    monkeypatch.setattr(monitor.meta, "best_lr", lambda *a, **k: 0.1)
    drawn = []
    monkeypatch.setattr(monitor.evaluation.plots, "plot_adaptation", lambda path, ks, curves, title: drawn.append(curves))
    steps = []
    adaptation_figure(tmp_path / "a.png", on_step=lambda done, total: steps.append((done, total)))
    n = 2 * len(ADAPT_KS)  # meta-init and random init: no pooled initialization given
    assert steps == [(i, n) for i in range(1, n + 1)] and len(drawn) == 1


def test_a_report_survives_a_damaged_figure_input(data_dir, tmp_path, capsys):
    """A damaged .gz under the adaptation figure's data raised EOFError or zlib.error, which the
    report did not catch: a traceback after minutes of scoring, and only parts left. A figure an
    earlier run drew stays: it is the same for either data set (the README's runs share a folder)."""
    from monitor.datasets import SMD_HELD_OUT, smd_path
    data = tmp_path / "data"
    (data / "smd" / "train").mkdir(parents=True)
    (data / "nab").symlink_to(data_dir / "nab")
    for machine in SMD_HELD_OUT:
        (data / "smd" / "train" / smd_path(machine, root=data).name).symlink_to(smd_path(machine, root=data_dir))
    damaged = smd_path(SMD_HELD_OUT[0], root=data)
    whole = smd_path(SMD_HELD_OUT[0], root=data_dir).read_bytes()
    report = tmp_path / "report"
    report.mkdir()
    (report / "adaptation.png").write_bytes(b"an earlier run's figure")
    args = ["evaluate", "--dataset", "nab", "--windows", "combined_windows_tiny.json", "--detectors", "zscore",
            "--data", str(data), "--report", str(report), "--quiet"]
    flipped = bytearray(whole)
    flipped[len(whole) // 2:len(whole) // 2 + 50] = bytes(50)
    for damage in (whole[:5000], bytes(flipped)):  # cut (EOFError), corrupt (zlib.error)
        damaged.unlink()
        damaged.write_bytes(damage)
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "skipped the adaptation figure" in err and f"{damaged.name}: unreadable" in err, err[-400:]
        assert sorted(p.name for p in report.iterdir()) == ["adaptation.png", "nab.json", "nab.md",
                                                            "nab_series.png"]
    assert main([*args, "--no-adaptation-plot"]) == 0
    assert (report / "adaptation.png").read_bytes() == b"an earlier run's figure"
    assert main([*args[:-3], "--report", "", "--quiet"]) == 2
    assert "--report: an empty folder name" in capsys.readouterr().err


def test_a_meta_trained_detectors_notes_say_how_its_file_was_made(tmp_path):
    """The notes were fixed text: a pooled model saved as fomaml.pt was reported as first-order MAML."""
    from monitor.checkpoint import Initialization
    from monitor.evaluation.harness import build_detectors
    from monitor.forecaster import LSTMSpec
    init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    init.info = {"algorithm": "pooled", "iterations": 4}
    init.save(tmp_path / "fomaml.pt")
    detector, = build_detectors(["forewarn-fomaml"], tmp_path)
    assert "fomaml.pt: pooled, 4 iterations, hidden 4" in detector.notes


def test_the_glitch_clamp_of_the_scale_leaves_every_benchmark_warm_up_as_it_was(data_dir):
    """The evaluation figures stand: no warm-up window of NAB or of SMD's held-out machines is scaled
    differently by the clamp that keeps one glitch from setting a stream's scale."""
    import numpy as np
    import torch

    from monitor.datasets import SMD_HELD_OUT, load_smd
    from monitor.evaluation.harness import WARMUP, nab_corpus
    from monitor.normalize import _IQR_TO_STD, _NOISE, _PRECISION, Normalization

    norm = Normalization()

    def unclamped(windows):  # the scale as it was fitted before
        q = torch.quantile(windows, torch.tensor([0.25, 0.5, 0.75], dtype=windows.dtype), dim=1)
        spread = torch.maximum((q[2] - q[0]) / _IQR_TO_STD, norm.std_floor * windows.std(dim=1))
        flat = torch.maximum(norm.rel_floor * q[1].abs(), torch.full_like(q[1], norm.abs_floor))
        fine = torch.maximum(_PRECISION * q[1].abs(), torch.full_like(q[1], _NOISE))
        return q[1], torch.where(spread > 0, torch.maximum(spread, fine), flat)

    series, _ = nab_corpus(data_dir)
    windows = [torch.tensor(np.stack([v[:WARMUP] for _, _, v in series]), dtype=torch.float64)]
    windows += [torch.tensor(load_smd(m, root=data_dir)[-WARMUP:].T.copy(), dtype=torch.float64) for m in SMD_HELD_OUT]
    for w in windows:
        assert all(torch.equal(before, now) for before, now in zip(unclamped(w), norm._fit(w)))
