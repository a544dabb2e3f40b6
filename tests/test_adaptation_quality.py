"""The shipped meta-initialization earns its place on series it never saw."""
import pytest

from monitor.checkpoint import Initialization
from monitor.datasets import held_out_tasks
from monitor.meta import LR_GRID, adaptation_mse

K = 10


@pytest.fixture(scope="module")
def tasks(data_dir):
    return held_out_tasks(n_smd=24, n_nab=24, seed=7)


def test_meta_init_plus_k_steps_beats_random_init_and_no_adaptation(tasks):
    support, query = tasks
    meta = Initialization.default()
    adapted = adaptation_mse(meta, support, query, K)
    assert adapted < adaptation_mse(meta, support, query, 0), "adaptation should help"
    random = Initialization.random(meta.spec, seed=0)
    for lr in LR_GRID:  # whatever step size of the benchmarks' grid random init is given (it does best at 1-3)
        assert adapted < adaptation_mse(random, support, query, K, lr), f"random init at lr {lr}"


def test_meta_init_plus_k_steps_beats_pooled_pretraining_plus_k_steps(tasks):
    """The shipped initialization against the same model pre-trained on every window
    (benchmarks/artifacts/pooled.pt), after the same K steps: the race meta-learning has
    to win (README, "Adaptation"; benchmarks/meta_vs_pooled.py has the intervals)."""
    from pathlib import Path
    support, query = tasks
    adapted = adaptation_mse(Initialization.default(), support, query, K)
    pooled = Initialization.load(Path(__file__).resolve().parents[1] / "benchmarks" / "artifacts" / "pooled.pt")
    for lr in LR_GRID:  # whatever step size of the benchmarks' grid pooled pre-training is given
        assert adapted < adaptation_mse(pooled, support, query, K, lr), f"pooled at lr {lr}"
