"""Replays labelled benchmarks through every detector and scores them the same way.

NAB: every series is a new device; NAB's own scoring (``nab.py``), threshold per
profile over the corpus.  SMD (or any train/test/test_label layout): every
held-out machine is a new device, warmed on the tail of its train split, scored
on its test split (``point_metrics.py``); metrics are averaged over machines.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from connectors.files import FileFormatError
from monitor.checkpoint import Initialization
from monitor.datasets import SMD_HELD_OUT, read_table
from monitor.evaluation.detectors import (
    BASELINES,
    NOVELTY_UNIT,
    NOVELTY_WINDOW,
    Detector,
    forewarn_detector,
)
from monitor.evaluation.nab import PROFILES, CorpusScore, score_corpus
from monitor.evaluation.point_metrics import DetectionReport, evaluate_scores
from monitor.evaluation.windows import read_windows
from monitor.readings import parse_timestamp
from monitor.scoring import ScoringConfig

WARMUP = 256
NAB_CALIBRATION = 0.002  # stage-2 fading, picked on the even-indexed NAB series
NAB_PEAK_WINDOW = 48  # only new peaks of the surprise count, over the last ~48 readings: picked on even NAB
SMD_SMOOTHING = 9  # surprise smoothing span, picked on the test splits of the meta-training machines


def option_scoring(calibrated: bool = False, novelty: bool = False, smoothed: bool = False, peaks: bool = False,
                   channel_combination: str = "joint") -> ScoringConfig:
    """Scoring with the options switched on at the settings picked on NAB (SMD for smoothing)."""
    return ScoringConfig(calibration_fading=NAB_CALIBRATION if calibrated else 0.0,
                         novelty_unit=NOVELTY_UNIT if novelty else 0.0,
                         novelty_window=NOVELTY_WINDOW if novelty else 0,
                         smoothing_span=SMD_SMOOTHING if smoothed else 0,
                         peak_window=NAB_PEAK_WINDOW if peaks else 0,
                         channel_combination=channel_combination)


def build_detectors(names: Sequence[str], init_dir: Path | None) -> list[Detector]:
    """Detectors by name; Forewarn variants read their initializations from ``init_dir``."""
    shipped = Initialization.default()

    def artifact(name: str) -> Initialization:
        if init_dir is None or not (init_dir / f"{name}.pt").exists():
            raise FileNotFoundError(f"no {name}.pt in {init_dir}: train it with forewarn meta-train (see README)")
        return Initialization.load(init_dir / f"{name}.pt")

    def made(init: Initialization) -> str:
        """How a file in init_dir was made, from what it says of itself: not what its name suggests."""
        iterations = init.info.get("iterations")
        return f"{init.origin}" + (f", {iterations:,} iterations" if isinstance(iterations, int) else "") + \
            f", hidden {init.spec.hidden}"

    def trained(name: str, artifact_name: str, label: str) -> Callable[[], Detector]:
        """A meta-trained initialization, at the K it was trained for (its notes say which)."""
        def make() -> Detector:
            init = artifact(artifact_name)
            return forewarn_detector(name, init, WARMUP,
                                     notes=f"{label} ({artifact_name}.pt: {made(init)}), K={init.adapt.steps}")
        return make

    def pooled() -> Detector:
        init = artifact("pooled")  # at the shipped K: it holds meta-train's default (5), not the K compared
        return forewarn_detector("pooled", init, WARMUP, adapt_steps=shipped.adapt.steps,
                                 notes=f"pooled pre-training (pooled.pt: {made(init)}), K={shipped.adapt.steps}")

    def shipped_variant(name: str, notes: str, calibrated: bool = False, novelty: bool = False,
                        smoothed: bool = False, peaks: bool = False, channel_combination: str = "joint",
                        **pipeline_options) -> Callable[[], Detector]:
        """The shipped initialization with the scoring options picked on NAB (SMD for smoothing), and others."""
        scoring = option_scoring(calibrated, novelty, smoothed, peaks, channel_combination)
        return lambda: forewarn_detector(name, shipped, WARMUP, notes=notes, scoring=scoring, **pipeline_options)

    known: dict[str, Callable[[], Detector]] = {
        "forewarn": lambda: forewarn_detector("forewarn", shipped, WARMUP,
                                              notes=f"shipped init ({shipped.origin}), K={shipped.adapt.steps}"),
        "forewarn-fomaml": trained("forewarn-fomaml", "fomaml", "first-order MAML init"),
        "forewarn-reptile": trained("forewarn-reptile", "reptile", "Reptile init"),
        "forewarn-maml": trained("forewarn-maml", "maml", "MAML from random weights, shipped before"),
        "pooled": pooled,
        "lstm-scratch": lambda: forewarn_detector(
            "lstm-scratch", Initialization.random(shipped.spec, seed=0, adapt=shipped.adapt), WARMUP,
            notes=f"random init, same K, one step size {shipped.adapt.lr:g} (no learned ones)"),
        "forewarn-calibrated": shipped_variant(
            "forewarn-calibrated", "shipped init, stage-2 calibration 0.002 (picked on even-indexed NAB series)",
            calibrated=True),
        "forewarn-drift": shipped_variant(
            "forewarn-drift", "shipped init, drift re-adaptation (Page-Hinkley threshold 200, window 256)",
            drift_threshold=200.0),
        "forewarn-calibrated-drift": shipped_variant(
            "forewarn-calibrated-drift", "stage-2 calibration 0.002 and drift re-adaptation 200 (picked on even NAB)",
            calibrated=True, drift_threshold=200.0),
        "forewarn-online": shipped_variant(
            "forewarn-online",
            "shipped init, online updates every 64 readings (1 step on the newest 256, flagged ones left out)",
            online_every=64),
        "forewarn-calibrated-online": shipped_variant(
            "forewarn-calibrated-online", "stage-2 calibration 0.002 and online updates every 64 readings",
            calibrated=True, online_every=64),
        "forewarn-novelty": shipped_variant(
            "forewarn-novelty", f"shipped init, range novelty (unit 1/30,000, window {NOVELTY_WINDOW:,})",
            novelty=True),
        "forewarn-calibrated-novelty": shipped_variant(
            "forewarn-calibrated-novelty", f"stage-2 calibration 0.002 and range novelty (unit 1/30,000, window "
                                           f"{NOVELTY_WINDOW:,}; picked on even NAB)", calibrated=True, novelty=True),
        "forewarn-calibrated-novelty-peaks": shipped_variant(
            "forewarn-calibrated-novelty-peaks", f"the same, and only new peaks of the surprise count (peak window "
                                                 f"{NAB_PEAK_WINDOW}; picked on even NAB)",
            calibrated=True, novelty=True, peaks=True),
        "forewarn-smoothed": shipped_variant(
            "forewarn-smoothed", f"shipped init, surprise smoothed over ~{SMD_SMOOTHING} readings (picked on the "
                                 "SMD meta-training machines' test splits)", smoothed=True),
        "forewarn-max": shipped_variant(
            "forewarn-max", "shipped init, a reading scored by its worst channel alone (channel_combination max)",
            channel_combination="max"),
        "last-value": lambda: forewarn_detector(
            "last-value", Initialization.random(shipped.spec, seed=0, adapt=shipped.adapt), WARMUP, adapt_steps=0,
            notes="persistence: the LSTM with its head at zero forecasts the last value; Forewarn's scoring"),
        "meta-no-adapt": lambda: forewarn_detector("meta-no-adapt", shipped, WARMUP, adapt_steps=0, notes="K=0"),
    }
    out = []
    for name in names:
        if name in BASELINES:
            out.append(BASELINES[name])
        elif name in known:
            out.append(known[name]())
        else:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join([*known, *BASELINES])}")
    return out


def nab_corpus(data_dir: Path, windows_file: str = "combined_windows.json", limit: int | None = None):
    """(name, timestamps, values) for each labelled NAB series, and the windows."""
    windows = read_windows(data_dir / "nab" / "labels" / windows_file)
    names = sorted(windows)[:limit] if limit else sorted(windows)
    series = []
    for name in names:
        path = data_dir / "nab" / "data" / name
        try:
            rows = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=str, ndmin=2)
            if rows.shape[0] < 2 or rows.shape[1] < 2:
                raise ValueError(f"{rows.shape[0]} rows of {rows.shape[1] if rows.size else 0} columns; "
                                 f"a series is timestamp,value rows under a header")
            ts = np.array([parse_timestamp(t) for t in rows[:, 0]])
            values = rows[:, 1].astype(np.float64)
        except FileNotFoundError:
            raise FileFormatError(f"{path}: no such file (it is named in the label file)") from None
        except ValueError as exc:
            raise FileFormatError(f"{path}: {str(exc)[:200]}") from None
        series.append((name, ts, values))
    return series, windows


@dataclass
class NabRun:
    """What ``evaluate_nab`` returns: each detector's score per profile, and what it was scored on.

    >>> ts, values = np.arange(20.0), np.r_[np.zeros(15), 9.0, np.zeros(4)]
    >>> windows = {"s.csv": [(14.0, 17.0)]}
    >>> raw = {"spike": {"s.csv": values / 9}}  # a detector that flags the spike alone
    >>> scores = {"spike": {p: score_corpus({"s.csv": (ts, raw["spike"]["s.csv"])}, windows, p) for p in PROFILES}}
    >>> run = NabRun(scores, [("s.csv", ts, values)], windows, raw)
    >>> {p: round(s.normalized, 1) for p, s in run.scores["spike"].items()}  # below 100: flagged a row into the window
    {'standard': 98.3, 'reward_low_FP': 98.3, 'reward_low_FN': 98.9}
    """

    scores: dict[str, dict[str, CorpusScore]]              # detector -> profile -> score
    series: list[tuple[str, np.ndarray, np.ndarray]]        # (name, timestamps, values)
    windows: dict[str, list[tuple[float, float]]]
    raw: dict[str, dict[str, np.ndarray]]                   # detector -> series -> per-row score


def evaluate_nab(detectors: Sequence[Detector], data_dir: Path, limit: int | None = None,
                 windows_file: str = "combined_windows.json", progress=None) -> NabRun:
    series, windows = nab_corpus(data_dir, windows_file, limit)
    run = NabRun({}, series, windows, {})
    for det in detectors:
        results = {}
        for name, ts, values in series:
            results[name] = (ts, det.score(values[:, None], 0))
            if progress:
                progress(f"{det.name}: {name}")
        run.scores[det.name] = {p: score_corpus(results, windows, p) for p in PROFILES}
        run.raw[det.name] = {name: s for name, (_, s) in results.items()}
    return run


@dataclass
class SmdRun:
    """What ``evaluate_smd`` returns: each detector's metrics averaged over machines, its scores, the labels.

    >>> labels = np.array([0, 0, 1, 1, 0, 0])
    >>> raw = {"zscore": {"1-1": np.array([0.1, 0.2, 0.9, 0.1, 0.3, 0.1])}}
    >>> run = SmdRun({"zscore": _mean_report([evaluate_scores(raw["zscore"]["1-1"], labels)])}, raw, {"1-1": labels})
    >>> {metric: round(v, 3) for metric, v in run.scores["zscore"].items()}  # point-adjusted F1 flatters
    {'pointwise_f1': 0.667, 'event_f1': 1.0, 'pa_f1': 1.0, 'pa_k_auc': 0.833, 'auprc': 0.667}
    """

    scores: dict[str, dict[str, float]]                     # detector -> metric -> mean over machines
    raw: dict[str, dict[str, np.ndarray]]                   # detector -> machine -> per-row score
    labels: dict[str, np.ndarray]                           # machine -> test labels
    # machines whose test split has no labelled anomaly: scored, but left out of the means, where
    # they would add an F1 of 0 that says nothing and an undefined AUPRC
    unlabelled: list[str] = field(default_factory=list)


def evaluate_smd(detectors: Sequence[Detector], data_dir: Path, machines: Sequence[str] = SMD_HELD_OUT,
                 progress=None) -> SmdRun:
    data = {}
    for m in machines:
        train = read_table(data_dir / "smd" / "train" / f"machine-{m}.txt.gz", delimiter=",", ndmin=2)
        test = read_table(data_dir / "smd" / "test" / f"machine-{m}.txt.gz", delimiter=",", ndmin=2)
        labels = read_table(data_dir / "smd" / "test_label" / f"machine-{m}.txt", dtype=np.int8, ndmin=1)
        if train.shape[1] != test.shape[1] or len(labels) != len(test) or len(train) < WARMUP:
            raise FileFormatError(f"machine-{m}: train {train.shape}, test {test.shape} and {len(labels)} labels "
                                  f"do not fit together (same columns, a label per test row, >= {WARMUP} train rows)")
        data[m] = (np.concatenate([train[-WARMUP:], test]), labels)
    unlabelled = [m for m, (_, labels) in data.items() if not labels.any()]
    if len(unlabelled) == len(data):
        raise ValueError(f"no labelled anomaly in the test split of machine {', '.join(unlabelled)}: "
                         f"nothing to score against")
    run = SmdRun({}, {}, {m: labels for m, (_, labels) in data.items()}, unlabelled)
    for det in detectors:
        reports: list[DetectionReport] = []
        run.raw[det.name] = {}
        for m, (values, labels) in data.items():
            scores = det.score(values, WARMUP)[WARMUP:]
            run.raw[det.name][m] = scores
            if m not in unlabelled:
                reports.append(evaluate_scores(scores, labels))
            if progress:
                progress(f"{det.name}: machine-{m}")
        run.scores[det.name] = _mean_report(reports)
    return run


def _mean_report(reports: list[DetectionReport]) -> dict[str, float]:
    keys = ("pointwise_f1", "event_f1", "pa_f1", "pa_k_auc", "auprc")
    return {k: float(np.mean([asdict(r)[k] for r in reports])) for k in keys}


def _finite_or_none(value):
    """``value`` with every non-finite float (NaN, an infinite threshold) as None.

    >>> _finite_or_none({"threshold": float("inf"), "scores": [0.5, float("nan")]})
    {'threshold': None, 'scores': [0.5, None]}
    """
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def markdown_nab(results: dict[str, dict[str, CorpusScore]], detectors: Sequence[Detector]) -> str:
    """Normalized NAB scores (null detector 0, perfect 100), threshold per profile over the corpus."""
    lines = ["| detector | standard | reward_low_FP | reward_low_FN | notes |", "|---|---|---|---|---|"]
    for det in detectors:
        r = results[det.name]
        lines.append(f"| {det.name} | " + " | ".join(f"{r[p].normalized:.1f}" for p in PROFILES) + f" | {det.notes} |")
    return "\n".join(lines)


def markdown_smd(results: dict[str, dict[str, float]], detectors: Sequence[Detector],
                 unlabelled: Sequence[str] = ()) -> str:
    lines = ["| detector | point-wise F1 | event-wise F1 | PA%K AUC | PA F1 (inflated) | AUPRC |",
             "|---|---|---|---|---|---|"]
    for det in detectors:
        r = results[det.name]
        lines.append(f"| {det.name} | {r['pointwise_f1']:.3f} | {r['event_f1']:.3f} | {r['pa_k_auc']:.3f} | "
                     f"{r['pa_f1']:.3f} | {r['auprc']:.3f} |")
    if unlabelled:
        lines.append(f"\nLeft out of the means, with no labelled anomaly in their test split: machine "
                     f"{', '.join(unlabelled)}.")
    return "\n".join(lines)


def write_report(out: Path, dataset: str, run, detectors: Sequence[Detector], table: str,
                 adaptation: bool = True, init_dir: Path | None = None, data: Path | None = None,
                 on_adaptation_step: Callable[[int, int], None] | None = None) -> list[Path]:
    """The table (Markdown), the numbers (JSON) and the figures; returns the files written.

    The adaptation figure reads SMD's and NAB's series from ``data`` (as the tables do) and adds
    pooled pre-training when ``init_dir`` holds ``pooled.pt``; it takes minutes, and
    ``on_adaptation_step(done, total)`` follows it.
    """
    import json

    from monitor.evaluation import plots
    out.mkdir(parents=True, exist_ok=True)

    def part(path: Path) -> Path:  # written beside its name first (matplotlib reads the suffix)
        return path.with_name(f"{path.stem}.partial{path.suffix}")
    written = [out / f"{dataset}.md", out / f"{dataset}.json"]
    part(written[0]).write_text(table + "\n")
    if dataset == "nab":
        numbers = {d: {p: {**asdict(s), "normalized": s.normalized} for p, s in r.items()} for d, r in run.scores.items()}
        name, ts, values = next((s for s in run.series if "machine_temperature" in s[0]), run.series[0])
        path = out / "nab_series.png"
        plots.plot_series(part(path), ts, values, {d: run.raw[d][name] for d in run.raw}, run.windows.get(name, []),
                          f"NAB {name}: labelled windows shaded")
        written.append(path)
    else:
        numbers = run.scores
        machine = next(m for m in run.labels if m not in run.unlabelled)
        from monitor.evaluation.point_metrics import precision_recall_curve
        curves = {d: precision_recall_curve(run.raw[d][machine], run.labels[machine]) for d in run.raw}
        path = out / "smd_pr.png"
        plots.plot_pr_curves(part(path), curves, f"SMD machine-{machine}: point-wise precision-recall")
        written.append(path)
    # strict JSON: a threshold that flags nothing is Infinity, which many parsers refuse
    part(written[1]).write_text(json.dumps(_finite_or_none(numbers), indent=1, default=str, allow_nan=False))
    if adaptation:
        pooled = init_dir / "pooled.pt" if init_dir is not None else None
        path = out / "adaptation.png"
        try:
            adaptation_figure(part(path), Initialization.load(pooled) if pooled and pooled.exists() else None, data,
                              on_adaptation_step)
            written.append(path)
        except (OSError, ValueError) as exc:  # another layout, or a damaged file: the report stands without it
            # (after minutes of scoring, which a traceback here would lose)
            print(f"skipped the adaptation figure: it draws on SMD's held-out machines and NAB's series "
                  f"({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
    # renamed together at the end: a report stopped half-way leaves its parts, never a mix of runs
    for path in written:
        os.replace(part(path), path)
    return written


ADAPT_KS = (0, 1, 2, 5, 10, 50)


def adaptation_figure(path: Path, pooled: Initialization | None = None, data: Path | None = None,
                      on_step: Callable[[int, int], None] | None = None) -> Path:
    """Query MSE against K on held-out tasks: the shipped meta-initialization against
    random initialization and, if given, pooled pre-training (their step sizes picked
    per K on training-machine tasks).  ``on_step(done, total)`` after each point drawn."""
    from monitor.datasets import held_out_tasks, meta_train_tasks
    from monitor.evaluation import plots
    from monitor.meta import adaptation_mse, best_lr
    meta = Initialization.default()
    random = Initialization.random(meta.spec, seed=0)
    # the tasks of benchmarks/adaptation.py's table, so the figure and the table agree
    support, query = held_out_tasks(96, 96, seed=0, root=data)
    val_support, val_query = meta_train_tasks(64, seed=0, root=data)

    total, done = len(ADAPT_KS) * (2 if pooled is None else 3), 0

    def point(mse: float) -> float:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)
        return mse

    def tuned(init: Initialization) -> list[float]:
        return [point(adaptation_mse(init, support, query, k,
                                     best_lr(init, val_support, val_query, k) if k else None))
                for k in ADAPT_KS]

    curves = {"meta-init (learned rates)": [point(adaptation_mse(meta, support, query, k)) for k in ADAPT_KS],
              "random init (lr tuned per K)": tuned(random)}
    if pooled is not None:
        curves["pooled pre-training (lr tuned per K)"] = tuned(pooled)
    plots.plot_adaptation(path, ADAPT_KS, curves, "Forecast error after K steps, 192 held-out tasks")
    return path
