import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from monitor.adapt import AdaptConfig, adapt, sequence_loss
from monitor.checkpoint import CheckpointError, Initialization
from monitor.forecaster import LSTMSpec, init_params
from monitor.meta import MetaConfig, TaskSampler, meta_train, query_loss
from monitor.normalize import Normalization


def _series(n, length=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 6
    return torch.sin(t / 5 + phase) + 0.1 * torch.randn(n, length, generator=g)


def test_batched_adaptation_equals_adapting_each_stream_alone():
    init = init_params(LSTMSpec(hidden=8), torch.Generator().manual_seed(0))
    support = _series(5, 64)
    cfg = AdaptConfig(steps=3, lr=0.05, chunks=2)
    together = adapt(init, support, cfg)
    for i in range(5):
        alone = adapt(init, support[i:i + 1], cfg)
        for k in init:
            assert torch.allclose(together[k][i], alone[k][0], atol=1e-5), k


def test_masked_values_do_not_steer_adaptation_and_stacked_weights_continue():
    init = init_params(LSTMSpec(hidden=8), torch.Generator().manual_seed(0))
    support = _series(2, 64)
    spiked = support.clone()
    spiked[:, -1] = 9.0  # the newest value is only ever a target, never an input
    mask = torch.ones_like(support, dtype=torch.bool)
    mask[:, -1] = False
    cfg = AdaptConfig(steps=2, lr=0.05, chunks=2)
    clean = adapt(init, support, cfg, mask=mask)
    assert all(torch.equal(clean[k], adapt(init, spiked, cfg, mask=mask)[k]) for k in init)
    assert not torch.equal(adapt(init, spiked, cfg)["head.w"], clean["head.w"])
    # stacked rows carry on from their own weights: two steps are one step, twice
    one = adapt(init, support, AdaptConfig(steps=1, lr=0.05, chunks=2))
    twice = adapt(one, support, AdaptConfig(steps=1, lr=0.05, chunks=2))
    assert all(torch.allclose(twice[k], adapt(init, support, cfg)[k], atol=1e-6) for k in init)


def test_adaptation_lowers_the_warmup_loss_and_prox_holds_it_back():
    init = init_params(LSTMSpec(hidden=8), torch.Generator().manual_seed(0))
    support = _series(4, 128)
    before = sequence_loss(init, support, AdaptConfig())
    free = adapt(init, support, AdaptConfig(steps=10, lr=0.1))
    held = adapt(init, support, AdaptConfig(steps=10, lr=0.1, prox=5.0))
    assert (sequence_loss(free, support, AdaptConfig()) < before).all()

    def distance(p):
        return sum(((p[k] - init[k]) ** 2).sum() for k in init)

    assert distance(held) < 0.5 * distance(free)


def test_second_order_maml_gradient_matches_finite_differences():
    torch.manual_seed(0)
    spec = LSTMSpec(hidden=3)
    init = {k: v.double() for k, v in init_params(spec, torch.Generator().manual_seed(1)).items()}
    init["head.w"] = torch.randn(3, dtype=torch.float64) * 0.3
    series = _series(2, 40).double()
    support, query = series[:, :30], series[:, 30:]
    cfg = AdaptConfig(steps=2, lr=0.3, chunks=1, burn_in=2, loss="mse", max_grad_norm=1e9)

    def outer(params, second_order=True):
        adapted = adapt(params, support, cfg, create_graph=second_order)
        return query_loss(adapted, support, query, cfg, context=8).sum()

    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    grads = torch.autograd.grad(outer(params), list(params.values()))
    first_order = torch.autograd.grad(outer(params, second_order=False), list(params.values()))
    g_w = dict(zip(params, grads))["head.w"]
    eps = 1e-6
    for j in range(3):
        plus = {k: v.clone() for k, v in init.items()}
        minus = {k: v.clone() for k, v in init.items()}
        plus["head.w"][j] += eps
        minus["head.w"][j] -= eps
        numeric = (outer(plus).item() - outer(minus).item()) / (2 * eps)
        assert math.isclose(g_w[j].item(), numeric, rel_tol=1e-4, abs_tol=1e-8)
    # first-order MAML drops the inner-loop curvature: a different direction
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, first_order))


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml", "pooled"])
def test_every_algorithm_trains_and_round_trips_through_a_checkpoint(tmp_path, algorithm):
    rng = np.random.default_rng(0)
    corpus = [np.sin(np.arange(400) / (5 + i)) + 0.05 * rng.standard_normal(400) for i in range(6)]
    corpus.append(np.zeros(400))  # constant: no task
    cfg = MetaConfig(algorithm=algorithm, iterations=3, tasks_per_batch=4, support=64, query=16,
                     inner=AdaptConfig(steps=2, lr=0.05, chunks=2), spec=LSTMSpec(hidden=4))
    sampler = TaskSampler(corpus, cfg.support, cfg.query, Normalization(), seed=0)
    assert sampler.skipped == 1
    seen = []
    init = meta_train(sampler, cfg, on_progress=lambda p: seen.append(p.query_loss))
    assert len(seen) == 3 and all(math.isfinite(v) for v in seen)
    assert (init.inner_lr is not None) == (algorithm in ("fomaml", "maml"))
    path = tmp_path / "init.pt"
    init.save(path)
    loaded = Initialization.load(path)
    assert loaded.info["algorithm"] == algorithm and loaded.spec == cfg.spec
    assert all(torch.equal(loaded.params[k], init.params[k]) for k in init.params)


def test_meta_training_can_start_from_a_pretrained_checkpoint():
    rng = np.random.default_rng(1)
    corpus = [np.sin(np.arange(300) / (4 + i)) + 0.05 * rng.standard_normal(300) for i in range(4)]
    spec = LSTMSpec(hidden=4)
    cfg = MetaConfig(algorithm="maml", iterations=1, tasks_per_batch=2, support=64, query=16,
                     inner=AdaptConfig(steps=1, lr=0.05, chunks=2), spec=spec, meta_lr=1e-6)
    sampler = TaskSampler(corpus, cfg.support, cfg.query, Normalization(), seed=0)
    pooled = Initialization(spec, Initialization.random(spec, seed=7).params, info={"algorithm": "pooled"})
    before = {k: v.clone() for k, v in pooled.params.items()}
    init = meta_train(sampler, cfg, start=pooled)
    # one tiny outer step away from the starting weights, not from a fresh random draw
    assert all(torch.allclose(init.params[k], before[k], atol=1e-4) for k in before)
    assert not torch.equal(init.params["l0.w"], Initialization.random(spec, seed=0).params["l0.w"])
    assert all(torch.equal(pooled.params[k], before[k]) for k in before)  # the start is not trained in place
    assert init.info["started_from"] == "pooled" and init.inner_lr is not None
    with pytest.raises(ValueError, match="LSTM"):
        meta_train(sampler, cfg, start=Initialization.random(LSTMSpec(hidden=8)))


def test_reptile_moves_the_initialization_toward_the_mean_adapted_weights_by_its_annealed_step():
    rng = np.random.default_rng(3)
    corpus = [np.sin(np.arange(300) / (4 + i)) + 0.05 * rng.standard_normal(300) for i in range(4)]
    cfg = MetaConfig(algorithm="reptile", iterations=2, tasks_per_batch=3, support=64, query=16,
                     inner=AdaptConfig(steps=2, lr=0.1), spec=LSTMSpec(hidden=4), reptile_step=0.8)
    init = meta_train(TaskSampler(corpus, cfg.support, cfg.query, Normalization(), seed=0), cfg)
    # the same two meta-batches, by hand: step 0.8, then 0.8 x (1 - 1/2)
    tasks = TaskSampler(corpus, cfg.support, cfg.query, Normalization(), seed=0)
    torch.manual_seed(cfg.seed)
    weights = Initialization.random(cfg.spec, seed=cfg.seed).params
    for step in (0.8, 0.4):
        support, _ = tasks.sample(cfg.tasks_per_batch)
        adapted = adapt(weights, support, cfg.inner)
        weights = {k: v + step * (adapted[k].mean(dim=0) - v) for k, v in weights.items()}
    assert all(torch.allclose(init.params[k], weights[k], atol=1e-6) for k in weights)
    assert init.info["reptile_step"] == 0.8 and init.inner_lr is None
    with pytest.raises(ValueError, match="reptile_step"):
        replace(cfg, reptile_step=1.5)


def test_step_sizes_learn_at_their_own_rate_and_the_weights_at_theirs():
    rng = np.random.default_rng(2)
    corpus = [np.sin(np.arange(300) / (4 + i)) + 0.05 * rng.standard_normal(300) for i in range(4)]
    base = MetaConfig(algorithm="fomaml", iterations=5, tasks_per_batch=2, support=64, query=16,
                      inner=AdaptConfig(steps=1, lr=0.05), spec=LSTMSpec(hidden=4))

    def train(**changes):
        sampler = TaskSampler(corpus, base.support, base.query, Normalization(), seed=0)
        return meta_train(sampler, replace(base, **changes))

    def log_rate_moved(init):
        return max(float((v.log() - math.log(0.05)).abs().max()) for v in init.inner_lr.values())

    shared, faster = train(), train(step_size_lr=0.1)
    # Adam moves a parameter by at most about its rate per iteration
    assert log_rate_moved(shared) < 5 * base.meta_lr * 1.5 < log_rate_moved(faster)
    assert shared.info["step_size_lr"] == base.meta_lr and faster.info["step_size_lr"] == 0.1
    # the weights keep the meta rate: with the step sizes held still, they move as far as with it
    tiny = train(step_size_lr=1e-9)
    assert log_rate_moved(tiny) < 1e-6
    start = Initialization.random(base.spec, seed=0).params

    def weights_moved(init):
        return max(float((init.params[k] - start[k]).abs().max()) for k in start)

    assert 0.5 * base.meta_lr * 5 < weights_moved(tiny) < 1.5 * base.meta_lr * 5
    assert weights_moved(tiny) == pytest.approx(weights_moved(shared), rel=0.2)
    with pytest.raises(ValueError, match="step_size_lr"):
        replace(base, step_size_lr=0.0)


def test_loading_refuses_files_that_are_not_initializations(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a Forewarn initialization"):
        Initialization.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "forewarn-init", "version": 99}, other)
    with pytest.raises(CheckpointError, match="version 99"):
        Initialization.load(other)
    with pytest.raises(CheckpointError, match="no such"):
        Initialization.load(tmp_path / "missing.pt")


def test_checkpoints_are_written_whole_and_checked_for_usable_weights(tmp_path):
    init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    path = tmp_path / "init.pt"
    init.save(path)
    assert Initialization.load(path).params["l0.w"].equal(init.params["l0.w"])
    assert [p.name for p in tmp_path.iterdir()] == ["init.pt"]  # the partial file was renamed over it
    with pytest.raises(CheckpointError, match="is a directory"):
        init.save(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        Initialization.load(cut)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="an empty file"):
        Initialization.load(tmp_path / "empty.pt")
    payload = torch.load(path, weights_only=True)
    for broken, message in ((float("nan"), "with NaN or inf"), (None, "must be finite float32, got torch.float64")):
        params = dict(init.params)
        params["l0.w"] = params["l0.w"].double() if broken is None else params["l0.w"].clone().fill_(broken)
        with pytest.raises(CheckpointError, match="not written, the initialization is unusable: .*" + message):
            Initialization(init.spec, params).save(tmp_path / "broken.pt")
        assert not (tmp_path / "broken.pt").exists()
        torch.save({**payload, "params": params}, tmp_path / "broken.pt")  # as another program might
        with pytest.raises(CheckpointError, match=message):
            Initialization.load(tmp_path / "broken.pt")
        (tmp_path / "broken.pt").unlink()


@pytest.mark.parametrize("inner_lr, message", [
    ({}, r"inner_lr\['l0.w'\] missing"),  # loaded once, and failed the first adaptation with a KeyError
    ("negative", r"inner_lr\['l0.w'\] must be > 0"),  # adaptation would climb the loss
])
def test_loading_refuses_step_sizes_adaptation_cannot_use(tmp_path, inner_lr, message):
    init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    path = tmp_path / "init.pt"
    init.save(path)
    if inner_lr == "negative":
        inner_lr = {k: torch.full_like(v, 0.01) for k, v in init.params.items()}
        inner_lr["l0.w"][0, 0] = -0.01
    torch.save({**torch.load(path, weights_only=True), "inner_lr": inner_lr}, path)
    with pytest.raises(CheckpointError, match=message):
        Initialization.load(path)


@pytest.mark.parametrize("section, key, value, message", [
    ("adapt", "lr", float("nan"), "lr must be a finite number"),
    ("adapt", "steps", 2.5, "steps must be an integer"),
    ("adapt", "huber_delta", -1.0, "huber_delta must be > 0, got -1.0"),
    ("adapt", "prox", -0.1, "prox must be >= 0, got -0.1"),  # once "lr and prox must be >= 0": which?
    ("normalization", "clip", float("nan"), "clip must be a finite number"),
    ("normalization", "std_floor", -1.0, "std_floor must be in \\[0, 1e6\\], got -1.0"),
    # finite, but not in float32: the first warm-up raised an overflow, after the daemon was ready
    ("normalization", "clip", 1e300, r"clip must be in \(0, 1e6\], got 1e\+300"),
    # each step a pass over every warming window: a replay was held for hours
    ("adapt", "steps", 100_000, "steps must be in 0..1000, got 100000"),
    ("adapt", "chunks", 10**6, "chunks must be in 1..16384"),
    ("params", "l0.b", torch.zeros(16).to_sparse(), r"params\['l0.b'\] must be a dense CPU tensor"),
    ("params", "l0.b", torch.zeros(16, device="meta"), r"params\['l0.b'\] must be a dense CPU tensor"),
    ("spec", "hidden", 4.0, "integers >= 1"),
    ("params", "extra", torch.zeros(3), "tensors this model does not have: extra"),
])
def test_loading_refuses_settings_that_would_fail_or_mislead_later(tmp_path, section, key, value, message):
    """Each of these was accepted once: NaN clip flagged every reading, a 2.5 or an extra tensor
    failed the first adaptation, after the daemon had reported ready."""
    path = tmp_path / "init.pt"
    Initialization.random(LSTMSpec(hidden=4), seed=0).save(path)
    payload = torch.load(path, weights_only=True)
    payload[section] = {**payload[section], key: value}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        Initialization.load(path)


def test_a_changed_byte_in_an_initialization_is_found_not_loaded(tmp_path):
    """torch's reader checks no checksum: one flipped byte changed a weight without a word."""
    init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    path = tmp_path / "init.pt"
    init.save(path)
    payload = torch.load(path, weights_only=True)
    payload["params"]["l0.b"][3] += 0.02  # as a flipped bit would
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="corrupt, or edited"):
        Initialization.load(path)
    del payload["digest"]  # as files written before the digest: read unchecked
    torch.save(payload, path)
    assert Initialization.load(path).params["l0.b"][3] == payload["params"]["l0.b"][3]


def test_a_name_past_the_file_systems_limit_is_refused_before_training(tmp_path):
    """The partial file's name was the final one plus 9 characters: a 250-character name passed the
    check, and the save after the training failed; now the part's name is short, and a final name
    too long for the file system is refused up front."""
    init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    long_name = tmp_path / ("a" * 250 + ".pt")
    Initialization.check_writable(long_name)
    init.save(long_name)
    assert Initialization.load(long_name).params["l0.w"].equal(init.params["l0.w"])
    with pytest.raises(CheckpointError, match="longer than this file system takes"):
        Initialization.check_writable(tmp_path / ("a" * 300 + ".pt"))


def test_checkpoints_are_loaded_without_unpickling_objects(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "forewarn-init", "version": 1, "spec": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a Forewarn initialization.*Unpickling"):
        Initialization.load(path)
    assert "pwned" not in capsys.readouterr().out  # refused before the object was made, not after


def test_shipped_initialization_loads():
    init = Initialization.default()
    assert init.info["algorithm"] in ("reptile", "fomaml", "maml")
    assert init.adapt.steps == 10


def test_query_context_of_zero_is_refused():
    # It made the meta-loss compare one forecast past the query with every query value.
    with pytest.raises(ValueError, match=r"query_context must be in 1..support \(256\), got 0"):
        MetaConfig(query_context=0)


def test_normalization_of_values_whose_squares_overflow_keeps_a_finite_scale():
    rng = np.random.default_rng(0)
    windows = torch.tensor(rng.normal(0, 1, 256) * np.array([[1.0], [1e160]]), dtype=torch.float64)
    center, scale = Normalization().fit(windows)
    assert torch.isfinite(scale).all()
    assert float(scale[1] / scale[0]) == pytest.approx(1e160, rel=1e-9)  # the same series in other units
