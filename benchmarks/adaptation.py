"""Forecast error after K adaptation steps on series never seen in meta-training.

    python benchmarks/adaptation.py [--init FILE] [--pooled FILE] [--tasks 96]

Rows: the meta-initialization (learned per-parameter step sizes), pooled
pre-training and random initialization (each with the single step size that
does best on validation tasks from the meta-training machines, picked per K),
and the last-value forecast.  Columns: K inner steps.  The cell is the one-step
MSE on the 128-reading query after the 256-reading warm-up, in the stream's
scaled units (median/IQR of the warm-up, clipped at +-10), averaged over the
held-out tasks: SMD machines 2-4, 2-5, 2-7, 2-8 and all 58 NAB series.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.checkpoint import Initialization  # noqa: E402
from monitor.datasets import held_out_tasks, meta_train_tasks  # noqa: E402
from monitor.meta import adaptation_mse, best_lr, last_value_mse  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="meta-initialization (default: the shipped one)")
    parser.add_argument("--pooled", default=str(ROOT / "benchmarks/artifacts/pooled.pt"))
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=FILE",
                        help="more initializations to compare, with their learned step sizes")
    parser.add_argument("--tasks", type=int, default=96, help="held-out tasks from SMD and from NAB, each")
    parser.add_argument("--ks", default="0,1,5,10,50")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ks = [int(k) for k in args.ks.split(",")]

    support, query = held_out_tasks(args.tasks, args.tasks, seed=args.seed)
    val_support, val_query = meta_train_tasks(64, seed=args.seed)
    meta = Initialization.load(args.init) if args.init else Initialization.default()
    rows: dict[str, list[str]] = {}
    started = time.perf_counter()
    label = f"meta-init ({meta.origin}, learned rates)"
    rows[label] = [f"{adaptation_mse(meta, support, query, k):.4f}" for k in ks]
    for extra in args.extra:
        name, path = extra.split("=", 1)
        init = Initialization.load(path)
        rows[name] = [f"{adaptation_mse(init, support, query, k):.4f}" for k in ks]
    baselines = {"pooled pre-training": Initialization.load(args.pooled), "random init": Initialization.random(meta.spec)}
    for name, init in baselines.items():
        cells = []
        for k in ks:
            lr = best_lr(init, val_support, val_query, k) if k else 0.0
            cells.append(f"{adaptation_mse(init, support, query, k, lr or None):.4f}" + (f" (lr {lr:g})" if k else ""))
        rows[name] = cells
        print(f"  {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    rows["last value (no model)"] = [f"{last_value_mse(support, query):.4f}"] + [""] * (len(ks) - 1)

    print(f"One-step query MSE on {len(support)} held-out tasks (lower is better), "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| K inner steps | " + " | ".join(map(str, ks)) + " |")
    print("|---|" + "---|" * len(ks))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
