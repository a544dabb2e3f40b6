"""Meta-initializations against pooled pre-training, task by task, over several task draws.

    python benchmarks/meta_vs_pooled.py [--draws 5] [--tasks 96] [--ks 1,5,10] [--extra NAME=FILE ...]

One draw of held-out tasks (benchmarks/adaptation.py's table) is small enough for
its sample to decide a few-percent race, so this pools ``--draws`` fresh draws
(seeds 100, 101, ...; 2 x ``--tasks`` tasks each: SMD's held-out machines and NAB)
and compares each initialization with pooled pre-training on the same tasks: the
mean query MSE after K steps, the mean paired difference with a 95% bootstrap
interval, and the share of tasks on which it does better.  The interval resamples
whole series (SMD's and NAB's apart), not tasks: the tasks of one series are not
independent, and resampling tasks gave intervals about half as wide.  Pooled pre-training gets
the step size that does best on validation tasks from the training machines, per K
and draw; the meta-initializations use their learned step sizes.
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
from monitor.datasets import held_out_tasks, meta_train_tasks  # noqa: E402
from monitor.meta import best_lr, task_mse  # noqa: E402

ARTIFACTS = ROOT / "benchmarks" / "artifacts"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=96, help="tasks from SMD and from NAB, each, per draw")
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=FILE",
                        help="more initializations to compare with pooled pre-training")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ks = [int(k) for k in args.ks.split(",")]
    inits = {"meta-init (maml from the pooled model, shipped)": Initialization.default(),
             "meta-init (maml from random weights)": Initialization.load(ARTIFACTS / "maml.pt")}
    for extra in args.extra:
        name, sep, path = extra.partition("=")
        if not sep:
            parser.error(f"--extra takes NAME=FILE, got {extra!r}")
        inits[name] = Initialization.load(path)
    pooled = Initialization.load(ARTIFACTS / "pooled.pt")
    mse: dict[tuple[str, int], list[np.ndarray]] = {(name, k): [] for name in [*inits, "pooled"] for k in ks}
    sources = []
    for draw in range(args.draws):
        support, query, of_series = held_out_tasks(args.tasks, args.tasks, seed=100 + draw, with_sources=True)
        sources.append(of_series)
        val_support, val_query = meta_train_tasks(64, seed=100 + draw)
        for k in ks:
            for name, init in inits.items():
                mse[(name, k)].append(task_mse(init, support, query, k).numpy())
            lr = best_lr(pooled, val_support, val_query, k)
            mse[("pooled", k)].append(task_mse(pooled, support, query, k, lr).numpy())
        print(f"  draw {draw + 1}/{args.draws} done", file=sys.stderr)

    rng = np.random.default_rng(0)
    sources = np.concatenate(sources)
    # per dataset, the task indices of each series: what the bootstrap draws, with replacement
    strata = [[np.flatnonzero(sources == s) for s in np.unique(sources) if s.startswith(prefix)]
              for prefix in ("smd/", "nab/")]

    def resampled_mean(diff: np.ndarray) -> float:
        picked = []
        for series in strata:
            picked += [series[i] for i in rng.integers(0, len(series), len(series))]
        return float(diff[np.concatenate(picked)].mean())

    n = args.draws * 2 * args.tasks
    print(f"{n} held-out tasks ({args.draws} draws) from {len(np.unique(sources))} series; query MSE after K "
          "steps, paired against pooled pre-training; 95% intervals resample series\n")
    print("| initialization | K | mean MSE | pooled | difference (95% interval) | tasks better |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        base = np.concatenate(mse[("pooled", k)])
        for name in inits:
            own = np.concatenate(mse[(name, k)])
            diff = own - base
            boots = [resampled_mean(diff) for _ in range(2000)]
            lo, hi = np.percentile(boots, [2.5, 97.5])
            print(f"| {name} | {k} | {own.mean():.4f} | {base.mean():.4f} | {diff.mean():+.4f} ({lo:+.4f}, {hi:+.4f}) "
                  f"| {np.mean(own < base):.0%} |")


if __name__ == "__main__":
    main()
