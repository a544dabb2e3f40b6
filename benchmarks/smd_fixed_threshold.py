"""SMD at a fixed operating point: one threshold per detector, picked on other machines.

    python benchmarks/smd_fixed_threshold.py [--detectors forewarn last-value ...] [--cache NPZ]

The README's SMD table gives every metric at its own best threshold on each
held-out machine (an oracle threshold, as the SMD literature reports them).  A
deployment runs one threshold chosen beforehand; this picks it per detector on
the test splits of the ten meta-training machines (1-2 to 2-3: the best mean
point-wise F1, and separately the best mean event-wise F1, over one threshold
shared by the ten), then scores the four held-out machines (2-4, 2-5, 2-7, 2-8)
at it.  Thresholds are tried from the median score up.
About 3 minutes per detector with one thread (7 by default); ``--cache`` keeps the per-row scores
so that a second run only recomputes the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.datasets import SMD_HELD_OUT, SMD_META_TRAIN  # noqa: E402
from monitor.evaluation import harness  # noqa: E402
from monitor.evaluation.point_metrics import event_f1, evaluate_scores, pointwise_f1  # noqa: E402

DEFAULT = ["forewarn", "forewarn-smoothed", "last-value", "lstm-scratch", "pooled", "zscore", "hst"]
METRICS = {"point-wise F1": (pointwise_f1, "pointwise_f1"), "event-wise F1": (event_f1, "event_f1")}


def candidates(scores: list[np.ndarray], n: int = 400) -> np.ndarray:
    """Thresholds worth trying: quantiles of the pooled scores from the median up (an alarm
    level flags a minority), denser towards the top where the choice matters."""
    pooled = np.concatenate(scores)
    return np.unique(np.quantile(pooled, 1.0 - np.geomspace(0.5, 1e-5, n)))


def mean_at(metric, scores: list[np.ndarray], labels: list[np.ndarray], threshold: float) -> float:
    return float(np.mean([metric(s >= threshold, y) for s, y in zip(scores, labels)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", nargs="+", default=DEFAULT)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding smd/")
    parser.add_argument("--init-dir", default=str(ROOT / "benchmarks" / "artifacts"))
    parser.add_argument("--cache", metavar="NPZ", help="per-row scores: read if there, else written")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, machines = Path(args.data), {"tune": list(SMD_META_TRAIN), "held": list(SMD_HELD_OUT)}
    cache = dict(np.load(args.cache)) if args.cache and Path(args.cache).exists() else {}
    raw: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    labels: dict[str, dict[str, np.ndarray]] = {}
    for name in args.detectors:
        missing = [m for part in machines.values() for m in part if f"{name}/{m}" not in cache]
        if missing:
            (det,) = harness.build_detectors([name], Path(args.init_dir))
            run = harness.evaluate_smd([det], data, missing,
                                       progress=lambda what: print(f"  {what}", end="\r", file=sys.stderr))
            cache.update({f"{name}/{m}": s for m, s in run.raw[name].items()})
            cache.update({f"labels/{m}": y for m, y in run.labels.items()})
            if args.cache:
                np.savez_compressed(args.cache, **cache)
        for part, ms in machines.items():
            raw.setdefault(name, {})[part] = [cache[f"{name}/{m}"] for m in ms]
            labels[part] = [cache[f"labels/{m}"] for m in ms]
    print("SMD, held-out machines 2-4, 2-5, 2-7, 2-8 (mean over machines): at the threshold picked on the "
          "ten meta-training machines, and at each machine's own best (oracle)\n")
    print("| detector | " + " | ".join(f"{m}: fixed / oracle" for m in METRICS) + " | threshold (point / event) |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for name in args.detectors:
        tune, held = raw[name]["tune"], raw[name]["held"]
        grid = candidates(tune)
        cells, picked = [], []
        oracles = [evaluate_scores(s, y) for s, y in zip(held, labels["held"])]
        for metric, field in METRICS.values():
            threshold = max(grid, key=lambda t: mean_at(metric, tune, labels["tune"], t))
            oracle = np.mean([getattr(r, field) for r in oracles])
            cells.append(f"{mean_at(metric, held, labels['held'], threshold):.3f} / {oracle:.3f}")
            picked.append(f"{threshold:.4g}")
        print(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(picked)} |", flush=True)


if __name__ == "__main__":
    main()
