import pytest
import torch

from monitor.forecaster import (FleetForecaster, LSTMSpec, forecast_sequence, init_params, stack, step,
                                zero_state)


def _random_stacked(spec: LSTMSpec, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = stack(init_params(spec, g), n)
    # distinct weights per stream, and a non-zero head, so a mix-up would show
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}


def _reference_cells(params, spec, n):
    """Per-stream nn.LSTMCell + linear head holding the same weights."""
    cells = []
    for i in range(n):
        cell = torch.nn.LSTMCell(1, spec.hidden)
        w = params["l0.w"][i]  # [1 + H, 4H]
        with torch.no_grad():
            cell.weight_ih.copy_(w[:1].T)
            cell.weight_hh.copy_(w[1:].T)
            cell.bias_ih.copy_(params["l0.b"][i])
            cell.bias_hh.zero_()
        cells.append(cell)
    return cells


@pytest.mark.parametrize("gather_rows", [FleetForecaster.GATHER_ROWS, 2])  # 2: a subset in several parts
def test_fleet_step_matches_lstmcell_for_random_subsets(gather_rows):
    spec = LSTMSpec(hidden=16)
    n = 40
    params = _random_stacked(spec, n)
    fleet = FleetForecaster(spec)
    fleet.GATHER_ROWS = gather_rows
    center = torch.randn(n, dtype=torch.float64)
    scale = torch.rand(n, dtype=torch.float64) + 0.5
    rows = fleet.add(params, center, scale)
    cells = _reference_cells(params, spec, n)
    h = torch.zeros(n, spec.hidden)
    c = torch.zeros(n, spec.hidden)
    expected_forecast = center.clone()  # a fresh row forecasts its centre
    g = torch.Generator().manual_seed(1)
    # subsets below and above the share where the fleet switches to the full step
    for size in (3, 7, 25, 40, 1, 33, 15, 9):
        subset = torch.randperm(n, generator=g)[:size]
        values = torch.randn(size, generator=g, dtype=torch.float64) * 3
        forecast, residual = fleet.observe(rows[subset], values)
        assert torch.allclose(forecast, expected_forecast[subset], atol=1e-5)
        scaled = (values - center[subset]) / scale[subset]
        for j, i in enumerate(subset.tolist()):
            with torch.no_grad():
                x = scaled[j].clamp(-10, 10).float().view(1, 1)
                hi, ci = cells[i](x, (h[i:i + 1], c[i:i + 1]))
                h[i], c[i] = hi[0], ci[0]
                nxt = x[0, 0] + hi[0] @ params["head.w"][i] + params["head.b"][i]
            expected_forecast[i] = nxt.clamp(-10, 10).double() * scale[i] + center[i]
        assert torch.allclose(residual, scaled - (forecast - center[subset]) / scale[subset], atol=1e-9)
    assert torch.allclose(fleet._h[0, rows], h, atol=1e-5)
    assert torch.allclose(fleet._c[0, rows], c, atol=1e-5)


def test_sequence_matches_nn_lstm_with_two_layers():
    spec = LSTMSpec(hidden=8, layers=2)
    shared = init_params(spec, torch.Generator().manual_seed(3))
    shared["head.w"] = torch.randn(8)
    lstm = torch.nn.LSTM(1, 8, num_layers=2, batch_first=True)
    with torch.no_grad():
        for layer in range(2):
            w = shared[f"l{layer}.w"]
            fan = 1 if layer == 0 else 8
            getattr(lstm, f"weight_ih_l{layer}").copy_(w[:fan].T)
            getattr(lstm, f"weight_hh_l{layer}").copy_(w[fan:].T)
            getattr(lstm, f"bias_ih_l{layer}").copy_(shared[f"l{layer}.b"])
            getattr(lstm, f"bias_hh_l{layer}").zero_()
    x = torch.randn(5, 30)
    ours, (h, c) = forecast_sequence(shared, x)
    with torch.no_grad():
        out, (h_ref, c_ref) = lstm(x.unsqueeze(-1))
    assert torch.allclose(ours, x + out @ shared["head.w"] + shared["head.b"], atol=1e-5)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)


def test_sequence_equals_repeated_steps():
    spec = LSTMSpec(hidden=6)
    params = _random_stacked(spec, 4)
    x = torch.randn(4, 12)
    _, (h_seq, c_seq) = forecast_sequence(params, x)
    for i in range(4):
        state = zero_state(spec, 1)
        row = {k: v[i:i + 1] for k, v in params.items()}
        for t in range(12):
            _, state = step(row, x[i:i + 1, t], state)
        assert torch.allclose(h_seq[:, i], state[0][:, 0], atol=1e-6)
        assert torch.allclose(c_seq[:, i], state[1][:, 0], atol=1e-6)


def test_rows_are_reused_and_growth_keeps_existing_rows():
    spec = LSTMSpec(hidden=4)
    fleet = FleetForecaster(spec, capacity=2)
    ones = torch.ones(2, dtype=torch.float64)
    first = fleet.add(_random_stacked(spec, 2), ones, ones)
    before = fleet.params_of(first)
    fleet.add(_random_stacked(spec, 5, seed=9), torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    assert fleet.capacity >= 7 and len(fleet) == 7
    after = fleet.params_of(first)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fleet.remove(first[:1])
    assert len(fleet) == 6
    reused = fleet.add(_random_stacked(spec, 1, seed=4), ones[:1], ones[:1])
    assert reused.tolist() == first[:1].tolist()



def test_a_growing_fleet_adds_a_quarter_at_a_time_and_never_passes_its_cap():
    """A fleet filled in slices (the pipeline adapts detector.adapt_batch streams at a time)
    holds few unused rows: doubling held 32,768 for 20,000 streams."""
    spec = LSTMSpec(hidden=4)
    fleet = FleetForecaster(spec, capacity=64, max_rows=5000)
    for _ in range(40):
        n = 100
        fleet.add(_random_stacked(spec, n), torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
        assert fleet.capacity <= max(64 + 64, 1.25 * len(fleet) + 1)
    assert len(fleet) == 4000 and fleet.capacity <= 5000
    fleet.add(_random_stacked(spec, 1000), torch.ones(1000, dtype=torch.float64), torch.ones(1000, dtype=torch.float64))
    assert fleet.capacity == 5000

def test_a_pending_forecast_is_clipped_as_observe_clips_it():
    spec = LSTMSpec(hidden=4)
    fleet = FleetForecaster(spec, clip=10.0)
    ones = torch.ones(1, dtype=torch.float64)
    rows = fleet.add(_random_stacked(spec, 1), ones, 2 * ones, forecast=torch.tensor([25.0]))
    forecast, residual = fleet.observe(rows, torch.tensor([21.0], dtype=torch.float64))
    assert forecast.tolist() == [21.0] and residual.tolist() == [0.0]  # 1 + 2 * 10, not 1 + 2 * 25


def test_state_per_stream_is_under_32_kb():
    fleet = FleetForecaster(LSTMSpec())
    assert fleet.state_bytes_per_stream() < 32 * 1024
