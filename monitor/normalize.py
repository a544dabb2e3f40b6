"""Robust per-stream scaling fitted on each stream's warm-up window.

One meta-initialization has to serve a temperature in kelvin and a byte counter
in the billions, so every stream is mapped to a common scale before the LSTM sees
it: centre = median, scale = IQR / 1.349 (the standard deviation of a normal
series), at least a tenth of the standard deviation (spiky channels whose IQR is
0; a standard deviation counted at most 10x that of the window with its most extreme
1% clamped, so that one glitch cannot set the scale), and for a constant window a
share of its level, or a last-resort floor, so that nothing divides by zero (a
window with spread, however small its units, is judged by that spread).  Values are
clipped to +-``clip`` on the way into the model so that a wild reading cannot
saturate the recurrent state; residuals are taken before the clip, so the wild
reading still scores as anomalous.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from monitor.checks import require

_IQR_TO_STD = 1.349
_GLITCH_RATIO = 10.0  # a window's std may exceed that of its clamped window this many times
_PRECISION = 1e-12  # relative to the level: a spread below it is float64's rounding, not the series'
_NOISE = 1e-12      # absolute: near 0, rounding residue (0.1 + 0.2 - 0.3 = 5.6e-17) is not a signal either


@dataclass(frozen=True)
class Normalization:
    """How series are scaled; saved with every initialization that was trained with it.

    >>> norm = Normalization()
    >>> center, scale = norm.fit(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64))
    >>> center.item(), round(scale.item(), 3)
    (3.0, 1.483)
    >>> glitched = torch.sin(torch.arange(256.0, dtype=torch.float64) / 8).unsqueeze(0)
    >>> glitched[0, 100] = 1e15  # one reading at the value bound: the scale stays the series'
    >>> round(norm.fit(glitched)[1].item(), 2)  # as without the glitch; 6.25e12 before the clamp
    1.03
    """

    kind: str = "median_iqr"
    rel_floor: float = 1e-3   # a constant window's scale: rel_floor * |median|
    std_floor: float = 0.1    # scale >= std_floor * std: spiky series with IQR 0
    abs_floor: float = 1e-6   # last resort for constant windows near zero
    clip: float = 10.0

    def __post_init__(self) -> None:
        if self.kind != "median_iqr":
            raise ValueError(f"unknown normalization kind {self.kind!r}")
        for name in ("rel_floor", "std_floor", "abs_floor", "clip"):  # an initialization file carries them
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        # bounded above too: the forecaster works in float32, where 1e300 does not fit, and a
        # clip far past any spread only lets squared errors overflow
        require(self, ("clip", 0 < self.clip <= 1e6, "in (0, 1e6]"),
                ("abs_floor", 0 < self.abs_floor <= 1e15, "in (0, 1e15]"),
                ("rel_floor", 0 <= self.rel_floor <= 1e6, "in [0, 1e6]"),
                ("std_floor", 0 <= self.std_floor <= 1e6, "in [0, 1e6]"))

    def fit(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """Centre and scale of each row of ``windows`` ([B, W], float64).

        >>> huge = torch.tensor([[1e200, 3e200, 2e200, 5e200]], dtype=torch.float64)
        >>> center, scale = Normalization().fit(huge)  # torch's quantile and std overflow past ~1e154
        >>> center.item(), round(scale.item() / 1e200, 3)
        (2.5e+200, 1.297)
        """
        # rows past 1e150 are fitted in units of their largest value (exactly 1 for the others)
        unit = windows.abs().amax(dim=1)
        unit = torch.where(unit > 1e150, unit, torch.ones_like(unit))
        center, scale = self._fit(windows / unit.unsqueeze(-1))
        return center * unit, scale * unit

    def _fit(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        q = torch.quantile(windows, torch.tensor([0.25, 0.5, 0.75], dtype=windows.dtype), dim=1)
        center = q[1]
        spread = torch.maximum((q[2] - q[0]) / _IQR_TO_STD, self.std_floor * self._glitch_proof_std(windows))
        # The level sets the scale only of a window without spread: a counter in the billions
        # that moves by thousands is judged by its thousands, not by a share of its billions.
        flat = torch.maximum(self.rel_floor * center.abs(), torch.full_like(center, self.abs_floor))
        # A window with spread is judged by it, however small its units (nanoamperes): floored only
        # where float64 itself blurs, at 1e-12 of its level, or at 1e-12 near 0. (abs_floor, 1e-6,
        # was a floor for every window: a series spread over 1e-9 lost its spikes.)
        fine = torch.maximum(_PRECISION * center.abs(), torch.full_like(center, _NOISE))
        return center, torch.where(spread > 0, torch.maximum(spread, fine), flat)

    @staticmethod
    def _glitch_proof_std(windows: Tensor) -> Tensor:
        """The std floor is for spiky channels (IQR 0). One glitch of 1e15 in 256 readings made
        the std 6e13 and the scale 6e12: the stream flagged nothing for the rest of its life. So the
        std counts at most 10x the std of the window with its most extreme 1% (one at least) at
        each end clamped to the next value in. Where that is 0 (a constant window but for a spike
        or two), the spikes are all the spread there is, and the std stands as it was."""
        width = windows.shape[1]
        k = max(1, math.ceil(0.01 * width))
        std = windows.std(dim=1)
        if width <= 2 * k:
            return std
        ordered = windows.sort(dim=1).values
        low, high = ordered[:, k:k + 1], ordered[:, width - 1 - k:width - k]
        trimmed = torch.minimum(torch.maximum(windows, low), high).std(dim=1)
        return torch.where(trimmed > 0, torch.minimum(std, _GLITCH_RATIO * trimmed), std)

    def apply(self, values: Tensor, center: Tensor, scale: Tensor) -> Tensor:
        """Scaled, unclipped values (float64); ``values`` is [B] or windows [B, W]."""
        if values.dim() == center.dim() + 1:
            center, scale = center.unsqueeze(-1), scale.unsqueeze(-1)
        return (values - center) / scale

    def to_dict(self) -> dict:
        return asdict(self)

