"""Retro-Synthesis: class-targeted calibration images (Pratap, Kumar et al., arXiv 2012.13716).

Each image is optimized towards a *target class* ``c`` (classes assigned round-robin over the
whole set, so the set is class-balanced) with a soft target ``t``: probability ``confidence`` on
``c`` and the rest spread over the other classes in random proportions, so its argmax is ``c``
(methods.md §4.2). The loss is

    L = output_weight * KL(t || softmax(f(x)))  +  bn_weight * sum_l BNS_l(x)
        + input_weight * BNS_0(x)  +  tv_weight * TV(x),

with ``BNS_l`` the BN-statistics term of ZeroQ at layer ``l`` (batch statistics, the measured
default of ``zeroq``), ``BNS_0`` the input term (mean 0 and std 1 per channel) and ``TV`` the
mean squared difference of neighbouring pixels.

**BN-free path.** A model without BatchNorm stores no feature statistics, so the BN terms
vanish. What remains are the statistics every normalised model does carry implicitly: its
input normalisation says the images have mean 0 and std 1 per channel over the data, and the
input box bounds every pixel. The input term, the box, the class targets (the model's own
output layer, i.e. its class statistics) and a smoothness prior (TV; natural images are locally
smooth, and noise images drive activations to ranges real images never reach) replace the BN
targets. ``bn_weight`` is ignored there. The paper's own no-BN statistic source could not be
verified (methods.md §4.2), so this is the plugin's choice, measured against noise calibration
in docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin._utils import select_output
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth.hooks import batchnorm_layers, bn_sums, bn_targets
from zq_plugin.synth.losses import MomentTargets, Statistics, moment_distance
from zq_plugin.synth.optimize import check_loop_config, optimize_pixels
from zq_plugin.synth.registry import BatchContext, register
from zq_plugin.synth.zeroq import init_pixels


@dataclass(frozen=True, kw_only=True)
class RetroConfig:
    """Options of ``method="retro"``.

    Attributes:
        steps: Adam steps per batch (paper: ZeroQ-like, about 500).
        lr: Adam learning rate (ZeroQ's 0.5: same loop as ``zeroq``).
        output_weight: weight of ``KL(target || softmax(output))``.
        bn_weight: weight of the BN-statistics term (ignored without BN).
        input_weight: weight of the input-statistics term (mean 0, std 1 per channel).
        tv_weight: weight of the total-variation prior. 0.01 as in DSG's and DeepInversion's code.
        confidence: target probability of the class; 1 gives hard labels (cross-entropy). Default
            0.9999 by measurement. The target fixes the logit gap the images converge to,
            ``log(c (K - 1) / (1 - c))``: 6.1 at 0.98, 11.4 at 0.9999. The last layer's 8-bit
            output range is calibrated on those logits, and a narrow one clips real, confident
            logits (up to 20 on the zoo) into ties: at 500 steps 0.98 fell to 88 % at W8A8 on
            plain_cnn (93.2 % at 0.9999), 0.3 to 73 % on resnet_s (docs/results.md, "Retro
            defaults"). Hard labels let the gap grow with the number of steps instead.
        statistics: granularity of the BN and input terms (``"batch"``, the measured default of
            ``zeroq``, or ``"per_sample"``).
        init: initial pixels: ``"gaussian"`` (the paper starts from Gaussian noise) or ``"uniform"``.
        patience: ReduceLROnPlateau patience in steps (ZeroQ's 100).
        factor: ReduceLROnPlateau factor.
        min_lr: ReduceLROnPlateau floor.
    """

    steps: int = 500
    lr: float = 0.5
    output_weight: float = 1.0
    bn_weight: float = 1.0
    input_weight: float = 1.0
    tv_weight: float = 0.01
    confidence: float = 0.9999
    statistics: Statistics = "batch"
    init: Literal["uniform", "gaussian"] = "gaussian"
    patience: int = 100
    factor: float = 0.1
    min_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_loop_config(self, "Retro-Synthesis")
        if not 0 < self.confidence <= 1:
            raise ConfigError(f"confidence={self.confidence} must lie in (0, 1] (1: hard labels, cross-entropy).")
        for name in ("output_weight", "bn_weight", "input_weight", "tv_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0.")


def soft_targets(labels: torch.Tensor, num_classes: int, confidence: float, gen: torch.Generator) -> torch.Tensor:
    """``[N, K]`` targets: ``confidence`` on ``labels``, ``1 - confidence`` over the others in random shares.

    Example:
        >>> t = soft_targets(torch.tensor([2, 0]), 4, 0.9, torch.Generator().manual_seed(0))
        >>> t.argmax(1).tolist(), [round(float(v), 5) for v in t.sum(1)], round(float(t[0, 2]), 5)
        ([2, 0], [1.0, 1.0], 0.9)
    """
    rows = torch.arange(labels.shape[0])
    u = torch.rand(labels.shape[0], num_classes, generator=gen) + 1e-3  # [N, K]
    u[rows, labels] = 0.0
    t = (1.0 - confidence) * u / u.sum(1, keepdim=True)
    t[rows, labels] = confidence
    return t


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels of ``x`` ``[N, C, H, W]`` (a scalar)."""
    tv = x.new_zeros(())
    for dim in range(2, x.dim()):
        tv = tv + x.diff(dim=dim).pow(2).mean()
    return tv


@register("retro", RetroConfig, needs_batchnorm=False)
def make_retro(model: nn.Module, config: RetroConfig, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One class-balanced batch ``([n, *input_shape], labels [n])`` of class-targeted images."""
    n = ctx.batch_size
    with torch.no_grad():
        probe = select_output(model(torch.zeros(1, *ctx.input_shape, device=ctx.device, dtype=ctx.dtype)))
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
        raise ModelError(
            f"retro needs a classifier returning logits [N, K]; {type(model).__name__} returned "
            f"{type(probe).__name__} of shape {getattr(probe, 'shape', None)}. Use 'zeroq' or 'dsg' for other models."
        )
    num_classes = probe.shape[1]
    labels = (ctx.offset + torch.arange(n)) % num_classes  # round-robin over the whole set
    target = ctx.place(soft_targets(labels, num_classes, config.confidence, ctx.generator))
    bns = batchnorm_layers(model)
    # the input term and (with BN) the BN terms, concatenated: one fused statistics pass per step
    bn_weight = config.bn_weight if bns else 0.0
    targets = MomentTargets.build(
        bn_targets(bns) if bn_weight > 0 else {},
        input_channels=ctx.input_shape[0],
        device=ctx.device,
        dtype=ctx.work_dtype,
    )
    weights = targets.expand([config.input_weight] + [bn_weight] * (len(targets.names) - 1))  # [K]

    with bn_sums(dict(bns) if bn_weight > 0 else {}) as stats:

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            logits = select_output(model(ctx.feed(x))).to(x.dtype)
            loss = config.output_weight * F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
            loss = loss + moment_distance(*targets.collect(stats, x, config.statistics), targets, weights)
            if config.tv_weight > 0:
                loss = loss + config.tv_weight * total_variation(x)
            return loss

        x = optimize_pixels(
            init_pixels(config.init, (n, *ctx.input_shape), ctx.generator),
            loss_fn,
            ctx,
            config,
            "Retro-Synthesis",
        )
    return x, labels
