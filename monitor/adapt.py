"""Fast adaptation: K gradient steps from the meta-initialization, batched over streams.

Every stream (or meta-learning task) gets its own copy of the initialization and
takes ``steps`` steps of gradient descent on its own scaled warm-up window; all of
them at once, since the per-stream losses are summed and each stream's weights
only reach its own loss.  The same function is the inner loop of meta-training:
called with ``create_graph=True`` it stays differentiable (second-order MAML).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from monitor.checks import require
from monitor.config import MAX_ADAPT_STEPS, MAX_WARMUP
from monitor.forecaster import Params, forecast_sequence


@dataclass(frozen=True)
class AdaptConfig:
    """The inner loop: K steps of SGD with a pull toward the initialization.

    ``lr`` is used when the initialization has no learned per-parameter rates.

    >>> AdaptConfig(steps=5).steps
    5
    """

    steps: int = 10
    lr: float = 0.01
    prox: float = 0.0          # L2 pull toward the initialization (proximal term)
    loss: str = "huber"        # "huber" keeps warm-up spikes from dominating, or "mse"
    huber_delta: float = 1.0
    burn_in: int = 8           # forecasts from a cold (h, c) state are not scored
    chunks: int = 8            # the window runs as this many overlapping pieces side by side
    max_grad_norm: float = 10.0

    def __post_init__(self) -> None:
        # also what an initialization file carries: a NaN or a 2.5 must stop it at load,
        # not at the first adaptation (or silently flag every reading)
        for name in ("steps", "burn_in", "chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "prox", "huber_delta", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        # each step is a forward and backward pass over every warming stream's window: an
        # initialization asking for 100,000 held a replay for hours, where --adapt-steps is bounded
        require(self, ("steps", 0 <= self.steps <= MAX_ADAPT_STEPS, f"in 0..{MAX_ADAPT_STEPS}"))
        require(self, ("lr", self.lr >= 0, ">= 0"), ("prox", self.prox >= 0, ">= 0"))
        if self.loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {self.loss!r}")
        require(self, ("burn_in", 0 <= self.burn_in <= MAX_WARMUP, f"in 0..{MAX_WARMUP}"),
                ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
                ("chunks", 1 <= self.chunks <= MAX_WARMUP, f"in 1..{MAX_WARMUP}"),
                ("huber_delta", self.huber_delta > 0, "> 0"))

    def to_dict(self) -> dict:
        return asdict(self)


def pointwise_loss(pred: Tensor, target: Tensor, cfg: AdaptConfig) -> Tensor:
    if cfg.loss == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=cfg.huber_delta)
    return (pred - target) ** 2


def chunk_windows(series: Tensor, chunks: int, burn_in: int) -> Tensor:
    """Cut rows of ``series`` ([B, T]) into ``chunks`` pieces overlapping by ``burn_in``.

    Every step of a row's weights then serves ``chunks`` series at once, so a
    W-step window costs about W / chunks sequential steps; each piece re-warms
    its (h, c) state on the ``burn_in`` values it shares with the piece before.

    >>> chunk_windows(torch.arange(10.0).unsqueeze(0), chunks=2, burn_in=2).tolist()
    [[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]]
    """
    steps = series.shape[1]
    piece = (steps - burn_in) // chunks
    if chunks == 1 or piece < burn_in + 2:
        return series.unsqueeze(1)
    start = steps - (piece * chunks + burn_in)  # drop the oldest remainder
    return series[:, start:].unfold(1, piece + burn_in, piece)


def sequence_loss(params: Params, series: Tensor, cfg: AdaptConfig, mask: Tensor | None = None) -> Tensor:
    """Per-row one-step-ahead loss ([B]) of ``params`` on scaled, clipped ``series`` ([B, T]).

    ``mask`` ([B, T], bool) leaves out the forecasts *of* the values where it is
    False (they are still read as inputs): a row with nothing left has loss 0.
    """
    windows = chunk_windows(series, cfg.chunks, cfg.burn_in)
    pred, _ = forecast_sequence(params, windows[..., :-1])
    skip = min(cfg.burn_in, windows.shape[-1] - 2)
    loss = pointwise_loss(pred[..., skip:], windows[..., 1 + skip:], cfg)
    if mask is None:
        return loss.mean(dim=(1, 2))
    # the mask is cut into the same overlapping pieces, so each weight meets its own target
    # (as without a mask, the first target after each piece boundary falls in no piece's loss)
    weight = chunk_windows(mask.to(loss.dtype), cfg.chunks, cfg.burn_in)[..., 1 + skip:]
    return (loss * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1.0)


def _expand(params: Params, batch: int) -> Params:
    return {k: v.unsqueeze(0).expand(batch, *v.shape) for k, v in params.items()}


def adapt(init: Params, support: Tensor, cfg: AdaptConfig, inner_lr: Params | None = None,
          create_graph: bool = False, mask: Tensor | None = None) -> Params:
    """Adapt ``init`` to each row of ``support`` ([B, W], scaled and clipped).

    ``init`` is shared (every row starts from it) or already stacked with B rows
    (each row continues from its own weights: the online updates of live streams).
    Returns stacked parameters, one row per series.  ``inner_lr`` holds learned
    per-parameter step sizes (Meta-SGD, same shapes as a shared ``init``); without
    it every parameter moves at ``cfg.lr``.  With ``create_graph=False`` the inner
    gradients are constants to any outer graph: plain adaptation, or first-order
    MAML.  ``mask`` leaves values out of the loss as in ``sequence_loss``.

    >>> from monitor.forecaster import LSTMSpec, init_params
    >>> init = init_params(LSTMSpec(hidden=4), torch.Generator().manual_seed(0))
    >>> support = torch.sin(torch.arange(40.0) / 3).repeat(2, 1)
    >>> adapted = adapt(init, support, AdaptConfig(steps=3, lr=0.1))
    >>> adapted["l0.w"].shape
    torch.Size([2, 5, 16])
    >>> before = sequence_loss(init, support, AdaptConfig())
    >>> bool((sequence_loss(adapted, support, AdaptConfig()) < before).all())
    True
    """
    batch = support.shape[0]
    params = init if init["head.b"].dim() == 1 else _expand(init, batch)  # head.b: [] shared, [B] stacked
    if cfg.steps == 0:
        return {k: v.clone() for k, v in params.items()}
    anchor = params
    loss_grad = torch.func.grad(lambda p: sequence_loss(p, support, cfg, mask).sum())
    for _ in range(cfg.steps):
        grads = loss_grad(params)
        if not create_graph:
            grads = {k: g.detach() for k, g in grads.items()}
        if cfg.prox:
            grads = {k: g + cfg.prox * (params[k] - anchor[k]) for k, g in grads.items()}
        # Per-series clipping: one spiky warm-up must not throw its weights far away.
        norm = torch.sqrt(sum(g.reshape(batch, -1).pow(2).sum(1) for g in grads.values()))
        factor = (cfg.max_grad_norm / (norm + 1e-12)).clamp(max=1.0)
        new = {}
        for k, g in grads.items():
            f = factor.view(-1, *([1] * (g.dim() - 1)))
            lr = cfg.lr if inner_lr is None else inner_lr[k]
            new[k] = params[k] - lr * f * g
        params = new
    return params
