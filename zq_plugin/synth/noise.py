"""Gaussian noise: the data-free baseline every synthesis method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zq_plugin.synth.registry import BatchContext, register


@dataclass(frozen=True, kw_only=True)
class NoiseConfig:
    """Options of ``method="noise"``: i.i.d. ``N(mean, std^2)`` pixels, clamped to the input box.

    Attributes:
        mean: pixel mean in the model's input space (0: the normalized data's mean).
        std: pixel std (1: the normalized data's std; the ZeroQ paper's "random data from Gaussian").
    """

    mean: float = 0.0
    std: float = 1.0


@register("noise", NoiseConfig)
def make_noise(model: nn.Module, config: NoiseConfig, ctx: BatchContext) -> torch.Tensor:
    """One batch ``[n, *input_shape]`` of clamped Gaussian noise."""
    x = torch.randn(ctx.batch_size, *ctx.input_shape, generator=ctx.generator) * config.std + config.mean
    return ctx.clamp_(x)
