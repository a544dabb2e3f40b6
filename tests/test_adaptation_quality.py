"""The shipped meta-initialization earns its place on series it never saw."""
import pytest

from monitor.checkpoint import Initialization
from monitor.datasets import held_out_tasks
from monitor.meta import adaptation_mse

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
    for lr in (0.003, 0.01, 0.03, 0.1, 0.3):  # whatever step size random init is given
        assert adapted < adaptation_mse(random, support, query, K, lr), f"random init at lr {lr}"
