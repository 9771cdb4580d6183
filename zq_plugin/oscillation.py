"""Weight oscillations in quantization-aware training and their two remedies (Nagel et al., ICML 2022).

With a straight-through estimator, a latent weight near a rounding boundary of its grid flips
between the two neighbouring integers from one step to the next: the gradient of the rounded
weight pushes it back across the boundary each time. Nagel, Fournarakis, Bondarenko and
Blankevoort ("Overcoming Oscillations in Quantization-Aware Training", ICML 2022) measure it on
MobileNets at 3-4 bits and give two remedies, both here:

* **Detection.** For each weight, its integer ``w_int = clamp(round(w / s) + z, qmin, qmax)`` is
  tracked after every optimizer step. An *oscillation* at step ``t`` is a change of ``w_int``
  whose direction is opposite to the previous change's. Its frequency is an exponential moving
  average, ``f <- m * o_t + (1 - m) * f`` (``m`` the momentum), and so is the integer itself,
  ``ema <- m * w_int + (1 - m) * ema``.
* **Iterative freezing** (``remedy="freeze"``): a weight whose frequency exceeds ``threshold``
  is frozen at ``s * (round(ema) - z)``, the integer it spent most time on, and kept there for
  the rest of training (its value is restored after every optimizer step, so neither momentum
  nor weight decay moves it).
* **Dampening** (``remedy="dampen"``): the loss gains ``weight * sum((sg(q(w)) - clip(w))^2)``
  over every quantized weight, ``q(w)`` the fake-quantized weight, ``sg`` stop-gradient and
  ``clip`` to the grid's range ``[s (qmin - z), s (qmax - z)]``: latent weights are drawn to the
  centres of their bins, away from the boundaries where they oscillate.

:class:`WeightOscillations` reads each layer's grid (``scale``, ``zero_point``, ``quant_min``,
``quant_max``, ``ch_axis``) from its weight fake-quantizer, a torch.ao ``FakeQuantize`` or any
module with those attributes (a learned step: ``scale`` read afresh at every step).

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> _ = nn.init.zeros_(layer.weight)
    >>> class Grid(nn.Module):  # a per-tensor 4-bit grid, as a FakeQuantize would hold it
    ...     scale, zero_point, quant_min, quant_max, ch_axis = torch.tensor([0.1]), torch.tensor([0]), -7, 7, 0
    >>> layer.weight_fake_quant = Grid()
    >>> tracker = WeightOscillations({"fc": layer}, OscillationConfig(remedy="freeze", threshold=0.3, momentum=0.5))
    >>> with torch.no_grad():
    ...     for step in range(6):  # the first weight hops 0.14 <-> 0.16 across the boundary 0.15
    ...         layer.weight[0, 0] = 0.14 if step % 2 else 0.16
    ...         tracker.after_step()
    >>> tracker.frozen_count(), round(float(layer.weight.detach()[0, 0]), 4)
    (1, 0.1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, cast

import torch
from torch import nn

from zq_plugin.errors import ConfigError

Remedy = Literal["freeze", "dampen"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OscillationConfig:
    """Which remedy, and its constants.

    Attributes:
        remedy: ``"freeze"`` (iterative weight freezing), ``"dampen"`` (the dampening loss) or
            ``None`` (neither; oscillations are still counted).
        momentum: ``m`` of the moving averages of the oscillation indicator and the integer
            weight (the paper: 0.01).
        threshold: the oscillation frequency above which a weight freezes (the paper's
            ``f_th``: 0.005-0.04 on MobileNets at 3-4 bits; 0.02 here).
        dampen_weight: the dampening loss's factor (sum over weights, in squared weight units).
    """

    remedy: Remedy | None = "freeze"
    momentum: float = 0.01
    threshold: float = 0.02
    dampen_weight: float = 1e-2

    def __post_init__(self) -> None:
        if self.remedy not in ("freeze", "dampen", None):
            raise ConfigError(f"remedy={self.remedy!r} is not 'freeze', 'dampen' or None.")
        if not 0.0 < self.momentum <= 1.0 or not 0.0 < self.threshold < 1.0 or self.dampen_weight < 0:
            raise ConfigError(
                f"oscillation: momentum must lie in (0, 1], threshold in (0, 1) and dampen_weight be >= 0; got "
                f"{self.momentum}, {self.threshold}, {self.dampen_weight}."
            )


def _grid(fake_quant: Any, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, zero_point)`` shaped to broadcast against ``weight``, and the integer range."""
    scale = fake_quant.scale.detach().abs().to(weight.dtype)
    zero_point = fake_quant.zero_point.detach().to(weight.dtype)
    if scale.numel() > 1:
        shape = [1] * weight.dim()
        shape[int(fake_quant.ch_axis)] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return scale.clamp_min(1e-12), zero_point, int(fake_quant.quant_min), int(fake_quant.quant_max)


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def weight_integers(weight: torch.Tensor, fake_quant: Any) -> torch.Tensor:
    """``clamp(round(w / s) + z, qmin, qmax)`` of ``weight`` on ``fake_quant``'s grid (same shape, float)."""
    scale, zero_point, qmin, qmax = _grid(fake_quant, weight)
    return torch.clamp(torch.round(weight / scale) + zero_point, qmin, qmax)


class WeightOscillations:
    """Counts each quantized weight's oscillations and applies :class:`OscillationConfig`'s remedy.

    Args:
        layers: ``name -> module`` for each layer whose ``weight`` is fake-quantized by its
            ``weight_fake_quant`` (layers without one are skipped).
        config: the remedy and its constants.

    Call :meth:`after_step` after every optimizer step, add :meth:`dampening_loss` to the loss
    (zero unless ``remedy="dampen"``).
    """

    def __init__(self, layers: dict[str, nn.Module], config: OscillationConfig) -> None:
        self.config = config
        self.layers = {n: m for n, m in layers.items() if getattr(m, "weight_fake_quant", None) is not None}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in self.layers.items():
            weight = _weight(module).detach()
            ints = weight_integers(weight, module.weight_fake_quant)
            self.state[name] = {
                "last": ints,
                "direction": torch.zeros_like(ints, dtype=torch.int8),
                "frequency": torch.zeros_like(ints),
                "ema": ints.clone(),
                "frozen": torch.zeros_like(ints, dtype=torch.bool),
                "frozen_int": torch.zeros_like(ints),
            }

    @torch.no_grad()
    def after_step(self) -> None:
        """Update the counts from the weights as the optimizer left them; freeze and re-pin (``"freeze"``)."""
        m = self.config.momentum
        for name, module in self.layers.items():
            state, weight = self.state[name], _weight(module)
            ints = weight_integers(weight.detach(), module.weight_fake_quant)
            change = torch.sign(ints - state["last"]).to(torch.int8)
            oscillated = (change != 0) & (state["direction"] != 0) & (change != state["direction"])
            state["frequency"].mul_(1 - m).add_(oscillated.to(ints.dtype), alpha=m)
            state["ema"].mul_(1 - m).add_(ints, alpha=m)
            state["direction"] = torch.where(change != 0, change, state["direction"])
            state["last"] = ints
            if self.config.remedy != "freeze":
                continue
            newly = (state["frequency"] > self.config.threshold) & ~state["frozen"]
            if bool(newly.any()):
                state["frozen_int"] = torch.where(newly, torch.round(state["ema"]), state["frozen_int"])
                state["frozen"] |= newly
            if bool(state["frozen"].any()):
                scale, zero_point, _, _ = _grid(module.weight_fake_quant, weight)
                pinned = (state["frozen_int"] - zero_point) * scale
                weight.copy_(torch.where(state["frozen"], pinned, weight))
                state["last"] = torch.where(state["frozen"], state["frozen_int"], state["last"])

    def dampening_loss(self) -> torch.Tensor | float:
        """``dampen_weight * sum((sg(q(w)) - clip(w))^2)`` over the layers (``0.0`` unless ``remedy="dampen"``)."""
        if self.config.remedy != "dampen" or not self.layers:
            return 0.0
        total: torch.Tensor | float = 0.0
        for module in self.layers.values():
            weight = _weight(module)
            scale, zero_point, qmin, qmax = _grid(module.weight_fake_quant, weight)
            quantized = ((weight_integers(weight.detach(), module.weight_fake_quant) - zero_point) * scale).detach()
            clipped = torch.maximum(torch.minimum(weight, (qmax - zero_point) * scale), (qmin - zero_point) * scale)
            total = total + ((quantized - clipped) ** 2).sum()
        return self.config.dampen_weight * total

    def frozen_count(self) -> int:
        """How many weights are frozen."""
        return sum(int(s["frozen"].sum()) for s in self.state.values())

    def oscillating_share(self) -> float:
        """The share of weights whose oscillation frequency is above the threshold (frozen or not)."""
        total = sum(s["frequency"].numel() for s in self.state.values())
        above = sum(int((s["frequency"] > self.config.threshold).sum()) for s in self.state.values())
        return above / max(total, 1)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The counts and frozen weights (CPU tensors), for a checkpoint."""
        return {n: {k: v.detach().cpu().clone() for k, v in s.items()} for n, s in self.state.items()}

    def load_state_dict(self, blob: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state_dict` (onto each layer's weight's device)."""
        for name, saved in blob.items():
            device = _weight(self.layers[name]).device
            self.state[name] = {k: v.to(device) for k, v in saved.items()}
