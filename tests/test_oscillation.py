"""Weight oscillations (Nagel et al., ICML 2022): detection, iterative freezing, dampening (issue 30)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from zq_plugin.errors import ConfigError
from zq_plugin.oscillation import OscillationConfig, WeightOscillations, weight_integers


class Grid(nn.Module):
    """The grid attributes of a weight FakeQuantize: per-channel along ``ch_axis`` or per tensor."""

    def __init__(self, scale, zero_point=None, qmin=-7, qmax=7, ch_axis=0):
        super().__init__()
        self.scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        self.zero_point = torch.zeros_like(self.scale) if zero_point is None else torch.as_tensor(zero_point)
        self.quant_min, self.quant_max, self.ch_axis = qmin, qmax, ch_axis


def _layer(weight, scale, **grid):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.weight_fake_quant = Grid(scale, **grid)
    return layer


@given(
    w=st.lists(st.floats(-3, 3, width=32), min_size=4, max_size=4),
    scale=st.floats(0.01, 1.0),
    zp=st.integers(-3, 3),
)
def test_weight_integers_are_torch_fake_quantize_integers(w, scale, zp):
    weight = torch.tensor(w).reshape(2, 2)
    ints = weight_integers(weight, Grid([scale, scale], [zp, zp], qmin=-8, qmax=7))
    assert bool(((ints >= -8) & (ints <= 7)).all()) and torch.equal(ints, torch.round(ints))
    s = torch.tensor([scale, scale])
    expected = torch.fake_quantize_per_channel_affine(weight, s, torch.tensor([zp, zp], dtype=torch.int32), 0, -8, 7)
    torch.testing.assert_close((ints - zp) * s[:, None], expected)


def test_an_oscillating_weight_freezes_at_its_most_visited_integer_and_a_drifting_one_never_counts():
    layer = _layer(torch.tensor([[0.16, 0.0], [0.0, 0.0]]), [0.1, 0.1])  # starts at integer 2
    tracker = WeightOscillations({"fc": layer}, OscillationConfig(remedy="freeze", threshold=0.2, momentum=0.25))
    with torch.no_grad():
        for step in range(12):
            layer.weight[0, 0] = 0.16 if step % 3 else 0.14  # 2 -> 1 -> 2 ...: flips back and forth, mostly at 2
            layer.weight[1, 1] = 0.1 * step  # crosses a boundary every step, always upwards: no oscillation
            tracker.after_step()
    state = tracker.state["fc"]
    assert bool(state["frozen"][0, 0]) and tracker.frozen_count() == 1
    assert float(layer.weight.detach()[0, 0]) == pytest.approx(0.2)  # pinned at round(ema) = 2 steps
    assert float(state["frequency"][1, 1]) == 0.0
    with torch.no_grad():
        layer.weight[0, 0] = -0.5  # an optimizer step moves it: the next after_step pins it back
    tracker.after_step()
    assert float(layer.weight.detach()[0, 0]) == pytest.approx(0.2)


def test_frozen_weights_stay_put_under_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    layer = _layer(torch.randn(4, 8) * 0.3, torch.full((4,), 0.1))
    tracker = WeightOscillations({"fc": layer}, OscillationConfig(remedy="freeze", threshold=0.01, momentum=0.5))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(64, 8)
    pinned = None
    for step in range(60):
        target = torch.randn(64, 4)
        loss = ((layer(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.after_step()
        if step == 30:
            frozen = tracker.state["fc"]["frozen"].clone()
            pinned = layer.weight.detach().clone()
    assert int(frozen.sum()) > 0, "random targets make weights hop: some must freeze"
    assert torch.equal(layer.weight.detach()[frozen], pinned[frozen])
    ints = weight_integers(layer.weight.detach(), layer.weight_fake_quant)
    assert torch.equal(ints[frozen], tracker.state["fc"]["frozen_int"][frozen])


def test_no_remedy_counts_without_touching_the_weights():
    layer = _layer(torch.zeros(1, 2), [0.1])
    tracker = WeightOscillations({"fc": layer}, OscillationConfig(remedy=None, threshold=0.1, momentum=0.5))
    with torch.no_grad():
        for step in range(8):
            layer.weight[0, 0] = 0.16 if step % 2 else 0.14
            tracker.after_step()
    assert tracker.frozen_count() == 0 and tracker.oscillating_share() == 0.5
    assert float(layer.weight.detach()[0, 0]) == pytest.approx(0.16)  # the last value set, unchanged
    assert tracker.dampening_loss() == 0.0


def test_dampening_pulls_latent_weights_to_the_bin_centres_and_ignores_the_clipped_part():
    weight = torch.tensor([[0.1, 0.14, 0.2, 5.0]])  # centre, near a boundary, centre, far outside the range
    layer = _layer(weight, [0.1])
    tracker = WeightOscillations({"fc": layer}, OscillationConfig(remedy="dampen", dampen_weight=2.0))
    loss = tracker.dampening_loss()
    assert float(loss.detach()) == pytest.approx(2.0 * 0.04**2, rel=1e-4)  # only 0.14 is off its centre (0.1)
    loss.backward()
    grad = layer.weight.grad[0]
    assert float(grad[1]) > 0 and float(grad[0]) == 0.0 and float(grad[3]) == 0.0  # 0.14 pulled down to 0.1


def test_per_channel_grids_follow_ch_axis_and_state_round_trips():
    weight = torch.tensor([[0.14, 0.14], [0.14, 0.14]])
    layer = _layer(weight, [0.1, 1.0], ch_axis=0)
    tracker = WeightOscillations({"fc": layer, "no_grid": nn.Linear(2, 2)}, OscillationConfig())
    assert set(tracker.layers) == {"fc"}
    assert tracker.state["fc"]["last"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    blob = tracker.state_dict()
    other = WeightOscillations({"fc": layer}, OscillationConfig())
    other.load_state_dict(blob)
    assert all(torch.equal(other.state["fc"][k], v) for k, v in blob["fc"].items())


@pytest.mark.parametrize(
    "bad", [{"remedy": "oscillate"}, {"momentum": 0.0}, {"threshold": 1.0}, {"dampen_weight": -1.0}]
)
def test_bad_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        OscillationConfig(**bad)
