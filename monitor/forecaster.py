"""One-step-ahead LSTM forecasters for a whole fleet of streams.

Parameters are plain tensors in a dict (the ``torch.func`` style), so the same
code serves three shapes:

* one shared set (``w`` is ``[in+H, 4H]``): a meta-initialization or a pooled model;
* one set per stream, stacked (``w`` is ``[n, in+H, 4H]``): a fleet, or a batch of
  meta-learning tasks;
* a shared set broadcast over a batch of series (pre-training).

The cell is written by hand with ``addmm``/``baddbmm`` because ``nn.LSTM`` keeps
one weight set per module and cannot be vmapped over streams.  The forecast is
``x_t + head(h_t)``: a zero head is the last-value forecaster, a strong prior for
sensor data that every initialization starts from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = tuple[Tensor, Tensor]  # (h, c), each [layers, batch, hidden]


@dataclass(frozen=True)
class LSTMSpec:
    """Shape of a univariate forecaster: ``hidden`` units in each of ``layers`` layers.

    >>> spec = LSTMSpec(hidden=8, layers=2)
    >>> sorted(init_params(spec, torch.Generator().manual_seed(0)))
    ['head.b', 'head.w', 'l0.b', 'l0.w', 'l1.b', 'l1.w']
    >>> spec.n_params
    873
    """

    hidden: int = 32
    layers: int = 1

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.hidden, self.layers)) \
                or self.hidden < 1 or self.layers < 1:
            raise ValueError(f"hidden and layers must be integers >= 1, got {self}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h = self.hidden
        out: dict[str, tuple[int, ...]] = {}
        for layer in range(self.layers):
            fan_in = (1 if layer == 0 else h) + h
            out[f"l{layer}.w"] = (fan_in, 4 * h)
            out[f"l{layer}.b"] = (4 * h,)
        out["head.w"] = (h,)
        out["head.b"] = ()
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def init_params(spec: LSTMSpec, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> Params:
    """PyTorch's default LSTM initialization, U(-1/sqrt(H), 1/sqrt(H)); head at zero."""
    bound = 1.0 / math.sqrt(spec.hidden)
    params: Params = {}
    for name, shape in spec.shapes().items():
        if name.startswith("head"):
            params[name] = torch.zeros(shape, dtype=dtype)
        else:
            params[name] = (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound
    return params


def spec_of(params: Params) -> LSTMSpec:
    """Recover the spec from a parameter dict (shared or stacked)."""
    layers = sum(1 for k in params if k.endswith(".w") and k.startswith("l"))
    return LSTMSpec(hidden=params["head.w"].shape[-1], layers=layers)


def stack(params: Params, n: int) -> Params:
    """``n`` independent copies of a shared parameter set, one row per stream."""
    return {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}


def zero_state(spec: LSTMSpec, batch: int, dtype: torch.dtype = torch.float32) -> State:
    shape = (spec.layers, batch, spec.hidden)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def _gates(xh: Tensor, w: Tensor, b: Tensor) -> Tensor:
    if w.dim() == 2:  # shared weights: one GEMM for the whole batch
        return torch.addmm(b, xh, w)
    return torch.baddbmm(b.unsqueeze(1), xh.unsqueeze(1), w).squeeze(1)


def _cell(gates: Tensor, c: Tensor) -> State:
    i, f, g, o = gates.chunk(4, dim=-1)  # PyTorch's gate order
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _head(params: Params, h_top: Tensor) -> Tensor:
    """``h_top`` is [B, ..., H]; stacked head weights broadcast over the middle dims."""
    w, b = params["head.w"], params["head.b"]
    if w.dim() == 1:
        return h_top @ w + b
    middle = (1,) * (h_top.dim() - 2)
    return (h_top * w.view(w.shape[0], *middle, -1)).sum(-1) + b.view(-1, *middle)


def step(params: Params, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Advance every row by one reading ``x`` ([B]); return the forecast of the next one.

    ``params`` are shared or stacked with B rows; ``state`` is ``(h, c)``, each [L, B, H].

    >>> spec = LSTMSpec(hidden=4)
    >>> p = stack(init_params(spec, torch.Generator().manual_seed(1)), 3)
    >>> forecast, (h, c) = step(p, torch.tensor([0.5, -1.0, 2.0]), zero_state(spec, 3))
    >>> forecast.tolist()  # zero head: the last value
    [0.5, -1.0, 2.0]
    >>> tuple(h.shape)
    (1, 3, 4)
    """
    h_all, c_all = state
    hs, cs = [], []
    inp = x.unsqueeze(-1)
    for layer in range(h_all.shape[0]):
        xh = torch.cat([inp, h_all[layer]], dim=-1)
        h, c = _cell(_gates(xh, params[f"l{layer}.w"], params[f"l{layer}.b"]), c_all[layer])
        hs.append(h)
        cs.append(c)
        inp = h
    return x + _head(params, inp), (torch.stack(hs), torch.stack(cs))


def _gates_seq(x_t: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """``x_t + h @ w`` for h [B, S, K]: S series side by side on one row's weights."""
    if w.dim() == 2:
        return torch.addmm(x_t.flatten(0, 1), h.flatten(0, 1), w).view_as(x_t)
    return torch.baddbmm(x_t, h, w)


def forecast_sequence(params: Params, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """Run series through the model; ``out[..., t]`` forecasts ``x[..., t+1]``.

    ``x`` is [B, T] (one series per parameter row) or [B, S, T] (S series per
    row, all on that row's weights: each step reads a row's weights once for S
    series, which is what makes adaptation on chunked windows fast).  The state is
    [L, B, H] or [L, B, S, H] to match.
    """
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(1)
    batch, series, _ = x.shape
    spec = spec_of(params)
    if state is None:
        h0 = torch.zeros((spec.layers, batch, series, spec.hidden), dtype=x.dtype)
        state = (h0, torch.zeros_like(h0))
    elif single:
        state = (state[0].unsqueeze(2), state[1].unsqueeze(2))
    h_all, c_all = state
    layers = h_all.shape[0]
    weights = [params[f"l{layer}.w"] for layer in range(layers)]
    biases = [b.expand(batch, series, -1) if b.dim() == 1 else b.unsqueeze(1).expand(-1, series, -1)
              for b in (params[f"l{layer}.b"] for layer in range(layers))]
    hs = list(h_all.unbind(0))
    cs = list(c_all.unbind(0))
    outs = []
    # unbind once: indexing x[:, :, t] would make autograd allocate a full-size
    # zero gradient for every step.  The input joins h in one GEMM per step;
    # precomputing the input's share for all T at once costs more memory traffic
    # (a [B, S, T, 4H] tensor and its gradient) than it saves.
    for x_t in x.unbind(2):
        inp = x_t.unsqueeze(-1)
        new_h, new_c = [], []
        for layer in range(layers):
            xh = torch.cat([inp, hs[layer]], dim=-1)
            h, c = _cell(_gates_seq(biases[layer], xh, weights[layer]), cs[layer])
            new_h.append(h)
            new_c.append(c)
            inp = h
        hs, cs = new_h, new_c
        outs.append(hs[-1])
    out = x + _head(params, torch.stack(outs, dim=2))  # h_top [B, S, T, H]
    h_fin, c_fin = torch.stack(hs), torch.stack(cs)
    if single:
        return out.squeeze(1), (h_fin.squeeze(2), c_fin.squeeze(2))
    return out, (h_fin, c_fin)


class FleetForecaster:
    """The live streams of a fleet: stacked weights, (h, c) state and scaling, one row each.

    ``observe`` takes one reading for each of a set of rows, returns the forecast
    that had been made for it and the scaled residual, and advances those rows by
    one step in a single batched call.  Rows are recycled when streams leave.

    >>> spec = LSTMSpec(hidden=4)
    >>> fleet = FleetForecaster(spec)
    >>> rows = fleet.add(stack(init_params(spec), 2),
    ...                  center=torch.tensor([10.0, 0.0], dtype=torch.float64),
    ...                  scale=torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> forecast, residual = fleet.observe(rows, torch.tensor([12.0, 1.0], dtype=torch.float64))
    >>> forecast.tolist(), residual.tolist()  # fresh rows forecast their centre
    ([10.0, 0.0], [1.0, 1.0])
    >>> fleet.observe(rows, torch.tensor([12.0, 1.0], dtype=torch.float64))[0].tolist()
    [12.0, 1.0]
    """

    # Below this share of the fleet a batch gathers its rows; above it, computing
    # every row in place is cheaper than copying the touched rows' weights out (with
    # 10,000 rows of hidden 32, the two cost the same at ~45%).
    FULL_STEP_SHARE = 0.4

    # A batch that gathers copies its rows' weights into buffers kept between calls, this many
    # rows at a time.  A fresh tensor of tens of MB is mapped and page-faulted anew by glibc
    # at every call, which cost 8x the copy itself (2,450 of 10,000 rows: 21.7 against 2.5 ms).
    GATHER_ROWS = 1024

    # Rows are added by a quarter of the capacity at a time: doubling left up to half of a
    # large fleet's ~18 KB rows unused (20,000 streams held 32,768 rows), for copies that
    # only a growing fleet pays.
    GROWTH = 0.25

    def __init__(self, spec: LSTMSpec, dtype: torch.dtype = torch.float32, clip: float = 10.0,
                 capacity: int = 64, history: int = 0, max_rows: int | None = None) -> None:
        self.spec = spec
        self.max_rows = max_rows  # never grown past this (the pipeline's max_streams)
        self.dtype = dtype
        self.clip = clip
        self.history = history
        self._params = {k: torch.zeros((capacity, *s), dtype=dtype) for k, s in spec.shapes().items()}
        self._h = torch.zeros((spec.layers, capacity, spec.hidden), dtype=dtype)
        self._c = torch.zeros_like(self._h)
        self._center = torch.zeros(capacity, dtype=torch.float64)
        self._scale = torch.ones(capacity, dtype=torch.float64)
        self._forecast = torch.zeros(capacity, dtype=dtype)  # scaled forecast of the next reading
        # With history > 0, each row also keeps its last `history` scaled inputs in a ring
        # (position = _seen % history), whether each may be learned from, and how many
        # readings it has observed since its weights last changed: what online updates need.
        self._recent = torch.zeros((capacity, history), dtype=dtype)
        self._learnable = torch.zeros((capacity, history), dtype=torch.bool)
        self._seen = torch.zeros(capacity, dtype=torch.long)
        self._since_update = torch.zeros(capacity, dtype=torch.long)
        self._used = 0
        self._free: list[int] = []
        self._gather_buffers: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self._used - len(self._free)

    @property
    def capacity(self) -> int:
        return self._center.shape[0]

    def state_bytes_per_stream(self) -> int:
        """Bytes held per live stream (weights, state, scaling, pending forecast)."""
        per_row = sum(t[0].numel() * t.element_size() for t in self._params.values())
        per_row += 2 * self.spec.layers * self.spec.hidden * self._h.element_size()
        per_row += self._center.element_size() + self._scale.element_size()
        per_row += self.history * (self._recent.element_size() + 1) + 2 * self._seen.element_size()
        return per_row + self._forecast.element_size()

    def _gathered(self, rows: Tensor) -> Params:
        """The weights of ``rows`` (at most GATHER_ROWS), copied into the kept buffers."""
        n = rows.numel()
        buffers = self._gather_buffers
        held = next(iter(buffers.values())).shape[0] if buffers else 0
        if held < n:
            size = min(self.GATHER_ROWS, max(n, 2 * held))
            buffers = self._gather_buffers = {k: torch.empty((size, *v.shape[1:]), dtype=v.dtype)
                                              for k, v in self._params.items()}
        return {k: torch.index_select(v, 0, rows, out=buffers[k][:n]) for k, v in self._params.items()}

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = cap + max(64, int(cap * self.GROWTH))
        if self.max_rows is not None:
            new_cap = min(new_cap, self.max_rows)
        new_cap = max(new_cap, needed)

        def grown(t: Tensor, dim: int = 0, fill: float = 0.0) -> Tensor:
            shape = list(t.shape)
            shape[dim] = new_cap - cap
            return torch.cat([t, torch.full(shape, fill, dtype=t.dtype)], dim=dim)

        self._params = {k: grown(v) for k, v in self._params.items()}
        self._h, self._c = grown(self._h, 1), grown(self._c, 1)
        self._center, self._scale = grown(self._center), grown(self._scale, fill=1.0)
        self._forecast = grown(self._forecast)
        self._recent, self._learnable = grown(self._recent), grown(self._learnable)
        self._seen, self._since_update = grown(self._seen), grown(self._since_update)

    def add(self, params: Params, center: Tensor, scale: Tensor, state: State | None = None,
            forecast: Tensor | None = None, recent: Tensor | None = None, learnable: Tensor | None = None,
            since_update: Tensor | None = None) -> Tensor:
        """Place streams (stacked ``params`` rows) in the fleet; returns their row indices.

        ``state`` and ``forecast`` (scaled) continue a stream that already ran, such
        as one just adapted on its warm-up window; fresh streams start at zero.
        ``recent`` ([n, T], scaled, oldest first) seeds the history of each row, with
        ``learnable`` (default: all) and the ``since_update`` count (default 0).
        """
        n = center.shape[0]
        reuse = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = list(range(self._used, self._used + n - len(reuse)))
        self._grow(self._used + len(fresh))
        self._used += len(fresh)
        rows = torch.tensor(reuse + fresh, dtype=torch.long)
        with torch.no_grad():
            for k, v in params.items():
                self._params[k][rows] = v.to(self.dtype)
            if state is None:
                self._h[:, rows] = 0
                self._c[:, rows] = 0
            else:
                self._h[:, rows] = state[0].to(self.dtype)
                self._c[:, rows] = state[1].to(self.dtype)
            self._center[rows] = center.to(torch.float64)
            self._scale[rows] = scale.to(torch.float64)
            # clipped as observe clips it: an adapted head can carry the forecast past the clip
            self._forecast[rows] = 0 if forecast is None else forecast.clamp(-self.clip, self.clip).to(self.dtype)
            if self.history:
                self._seed_history(rows, recent, learnable, since_update)
        return rows

    def _seed_history(self, rows: Tensor, recent: Tensor | None, learnable: Tensor | None,
                      since_update: Tensor | None) -> None:
        """Lay out each row's ring oldest-first: the newest ``history`` of ``recent``,
        right-aligned, with any slots before them empty (never learned from, though an
        update still reads their zeros as inputs until the ring has filled)."""
        n, size = rows.numel(), self.history
        ring = torch.zeros((n, size), dtype=self.dtype)
        ok = torch.zeros((n, size), dtype=torch.bool)
        if recent is not None and recent.shape[1]:
            take = min(size, recent.shape[1])
            ring[:, size - take:] = recent[:, -take:].clamp(-self.clip, self.clip).to(self.dtype)
            ok[:, size - take:] = True if learnable is None else learnable[:, -take:]
        self._recent[rows], self._learnable[rows] = ring, ok
        self._seen[rows] = size  # next write goes to slot 0, the oldest
        self._since_update[rows] = 0 if since_update is None else since_update

    def history_of(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scaled inputs, learnable, readings since the last weight change) of these
        rows, oldest first: ``[n, history]``, ``[n, history]``, ``[n]``."""
        order = (self._seen[rows].unsqueeze(1) + torch.arange(self.history)) % self.history
        return (self._recent[rows].gather(1, order), self._learnable[rows].gather(1, order),
                self._since_update[rows].clone())

    def unlearnable_last(self, rows: Tensor) -> None:
        """Leave each row's newest reading out of its future updates (it was anomalous)."""
        if self.history:
            self._learnable[rows, (self._seen[rows] - 1) % self.history] = False

    def due(self, rows: Tensor, every: int) -> Tensor:
        """Which of ``rows`` (a bool mask over them) have observed ``every`` readings
        since their weights last changed."""
        return self._since_update[rows] >= every

    def update(self, rows: Tensor, params: Params) -> None:
        """New weights for live rows (an online update).  Their (h, c) state and pending
        forecast are kept: one small step changes them little, and recomputing the
        state over the history would double the update's cost."""
        with torch.no_grad():
            for k, v in params.items():
                self._params[k][rows] = v.to(self.dtype)
            self._since_update[rows] = 0

    def remove(self, rows: Tensor) -> None:
        """Free rows for reuse by later streams."""
        self._free.extend(int(r) for r in rows)

    def params_of(self, rows: Tensor) -> Params:
        return {k: v[rows].clone() for k, v in self._params.items()}

    def rows_state(self, rows: Tensor) -> tuple[Params, State, Tensor, Tensor, Tensor]:
        """Everything ``add`` takes, for these rows: (params, (h, c), center, scale, forecast)."""
        return (self.params_of(rows), (self._h[:, rows].clone(), self._c[:, rows].clone()),
                self._center[rows].clone(), self._scale[rows].clone(), self._forecast[rows].clone())

    @torch.no_grad()
    def observe(self, rows: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """One reading per row (``rows`` distinct); returns (forecast, scaled residual).

        ``forecast`` is in the stream's own units (float64), ``residual`` is
        ``scaled value - scaled forecast`` before clipping.
        """
        center, scale = self._center[rows], self._scale[rows]
        scaled = (values - center) / scale
        prev = self._forecast[rows]
        forecast = prev.to(torch.float64) * scale + center
        residual = scaled - prev.to(torch.float64)
        x = scaled.clamp(-self.clip, self.clip).to(self.dtype)
        n = self._used
        if rows.numel() >= self.FULL_STEP_SHARE * n:
            x_all = torch.zeros(n, dtype=self.dtype)
            x_all[rows] = x
            params = {k: v[:n] for k, v in self._params.items()}
            nxt, (h, c) = step(params, x_all, (self._h[:, :n], self._c[:, :n]))
            nxt, h, c = nxt[rows], h[:, rows], c[:, rows]
            self._h[:, rows] = h
            self._c[:, rows] = c
            self._forecast[rows] = nxt.clamp(-self.clip, self.clip)
        else:
            for start in range(0, rows.numel(), self.GATHER_ROWS):
                part = rows[start:start + self.GATHER_ROWS]
                nxt, (h, c) = step(self._gathered(part), x[start:start + self.GATHER_ROWS],
                                   (self._h[:, part], self._c[:, part]))
                self._h[:, part] = h  # rows are distinct: no later part reads these
                self._c[:, part] = c
                self._forecast[part] = nxt.clamp(-self.clip, self.clip)
        if self.history:
            slot = self._seen[rows] % self.history
            self._recent[rows, slot] = x
            self._learnable[rows, slot] = True
            self._seen[rows] += 1
            self._since_update[rows] += 1
        return forecast, residual
