"""NAB scores of one initialization through Forewarn's NAB scoring options, per half of the corpus.

    python benchmarks/nab_halves.py [--init shipped|random|FILE] [--scoring calibrated calibrated-novelty]
                                    [--plot PNG [--plot-series NAME]] [--curve PNG] [--baselines novelty ...]

The NAB settings in the README were picked on the even-indexed series (sorted by
name) and checked on the odd-indexed ones; this prints both halves and all 58 for
the three profiles (standard / reward_low_FP / reward_low_FN), each at the
threshold NAB picks on the series it scores, and the odd half at the even half's
thresholds (the surprises given: a fixed operating point, as the daemon runs), for any
initialization: ``random`` is ``lstm-scratch`` (random weights, the shipped
adaptation settings), a FILE is a checkpoint such as benchmarks/artifacts/pooled.pt.
About 3 minutes per scoring option with one thread.  ``--plot`` draws one series with
the readings each scoring option flags at its standard-profile threshold over all 58
(after NAB's probation, where flags are not scored).  ``--curve`` draws each half's
score against a fixed threshold (alarm surprise), standard and reward_low_FP.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.checkpoint import Initialization  # noqa: E402
from monitor.evaluation import harness  # noqa: E402
from monitor.evaluation.detectors import BASELINES, forewarn_detector  # noqa: E402
from monitor.evaluation.nab import PROFILES, normalized_at, probation_length, score_corpus  # noqa: E402
from monitor.evaluation.plots import plot_flags, plot_threshold_curves  # noqa: E402

SCORINGS = {
    "calibrated": harness.option_scoring(calibrated=True),
    "calibrated-novelty": harness.option_scoring(calibrated=True, novelty=True),
    "calibrated-novelty-peaks": harness.option_scoring(calibrated=True, novelty=True, peaks=True),
    "default": harness.option_scoring(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default="shipped", help="shipped, random, or a checkpoint file (default: shipped)")
    parser.add_argument("--scoring", nargs="+", choices=sorted(SCORINGS), default=["calibrated", "calibrated-novelty"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding nab/")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", metavar="PNG", help="draw --plot-series with each option's flagged readings")
    parser.add_argument("--plot-series", default="realKnownCause/machine_temperature_system_failure.csv",
                        metavar="NAME", help="series to draw (default: %(default)s, odd-indexed: held out)")
    parser.add_argument("--curve", metavar="PNG", help="draw each half's score against a fixed threshold")
    parser.add_argument("--baselines", nargs="*", choices=sorted(BASELINES), default=[],
                        help="baselines to score the same way, after the scoring options (not drawn)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = Initialization.default()
    init = {"shipped": shipped, "random": Initialization.random(shipped.spec, seed=0, adapt=shipped.adapt)}.get(
        args.init) or Initialization.load(args.init)
    series, windows = harness.nab_corpus(Path(args.data))
    names = [name for name, _, _ in series]
    if args.plot and args.plot_series not in names:
        parser.error(f"--plot-series {args.plot_series!r} is not a NAB series (e.g. {names[0]!r})")
    flags = {}
    thresholds = np.geomspace(10, 1000, 80)  # below 10 every score falls steeply (to -370 at 3)
    curves: dict[str, dict[str, list[float]]] = {"standard": {}, "reward_low_FP": {}}
    marks = {}
    print(f"NAB, init {args.init}: standard / reward_low_FP / reward_low_FN\n")
    print("| scoring | even-indexed | odd-indexed | all 58 | odd at the even half's thresholds (the thresholds) |")
    print("|---|---|---|---|---|")
    # every initialization at the shipped K (a checkpoint may hold another, as pooled.pt holds 5)
    detectors = [forewarn_detector(label, init, harness.WARMUP, adapt_steps=shipped.adapt.steps,
                                   scoring=SCORINGS[label]) for label in args.scoring]
    for detector in detectors + [BASELINES[name] for name in args.baselines]:
        label = detector.name
        results = {}
        for i, (name, ts, values) in enumerate(series, 1):
            results[name] = (ts, detector.score(values[:, None], 0))
            print(f"  {label}: {i}/{len(series)} series", end="\r", file=sys.stderr)
        cells, chosen = [], {}
        for part in (names[0::2], names[1::2], names):
            scores = {p: score_corpus({k: results[k] for k in part}, windows, p) for p in PROFILES}
            cells.append(" / ".join(f"{scores[p].normalized:.1f}" for p in PROFILES))
            chosen = chosen or {p: scores[p].threshold for p in PROFILES}  # the even half's
        odd = {k: results[k] for k in names[1::2]}
        fixed = {p: score_corpus(odd, windows, p, threshold=chosen[p]) for p in PROFILES}
        cells.append(" / ".join(f"{fixed[p].normalized:.1f}" for p in PROFILES) + " ("
                     + " / ".join(f"{chosen[p]:.3g}" for p in PROFILES) + ")")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        if args.curve and label in SCORINGS:  # a baseline's scores are not surprises
            for half, part in (("even", names[0::2]), ("odd", names[1::2])):
                for profile in curves:
                    curves[profile][f"{label}, {half}"] = normalized_at(
                        {k: results[k] for k in part}, windows, profile, thresholds)
            marks[f"even half's standard threshold, {chosen['standard']:.3g}"] = chosen["standard"]
        if args.plot and label in SCORINGS:
            threshold = score_corpus(results, windows, "standard").threshold
            scores = np.asarray(results[args.plot_series][1])
            flagged = scores >= threshold
            flagged[:probation_length(len(scores))] = False
            flags[label] = flagged
    if args.curve:
        plot_threshold_curves(Path(args.curve), thresholds, curves, marks,
                              f"NAB, init {args.init}: each half at a fixed threshold (surprise)", ylim=(30, 70))
        print(f"figure: {args.curve}")
    if args.plot:
        name, ts, values = next(s for s in series if s[0] == args.plot_series)
        plot_flags(Path(args.plot), np.asarray(ts), values, flags, windows.get(name, ()),
                   f"NAB {name}: readings flagged at the standard profile's threshold over all 58 series")
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
