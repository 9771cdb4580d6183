"""Genie-D: a small generator and its latent codes, distilled together (Jeon, Lee, Kim, CVPR 2023).

Pixels are never optimized directly: each batch gets a fresh generator ``G`` and latents
``z ~ N(0, 1)`` (``[N, latent_dim]``), both learned so that ``x = G(z)`` matches the teacher's
BatchNorm statistics (methods.md §5.1)::

    L = sum_l (||mu~_l - mu_l||^2 + ||sigma~_l - sigma_l||^2) / C_l        (batch statistics of each BN input)
        + input_weight * (1/N) sum_n ||mean(x_n) - 0||^2 + ||std(x_n) - 1||^2   (per-sample input term)

Generator (Genie's, with its size taken from ``input_shape`` instead of a fixed 224 px RGB):
``Linear(latent_dim -> width * h0 * w0)`` with ``h0 = ceil(H / 4)``, ``w0 = ceil(W / 4)``, then
``BN -> 2x upsample -> Conv3x3(width -> width/2) -> BN -> LeakyReLU(0.2) -> 2x upsample ->
Conv3x3(width/2 -> C) -> tanh -> BatchNorm2d(C, affine=False)``, cropped to ``H x W``. When the
model has a valid input box the output is clamped to it (the plugin's finding that images
leaving the box inflate activation ranges).

**Swing convolution**, during distillation only: every Conv2d of the teacher with a stride other
than 1 sees its input reflect-padded by one pixel and cropped back at a random offset in
``{0, 1, 2}^2`` (one offset per call, shared by the batch), so that every pixel takes part despite
the stride. It is done with forward pre-hooks that are removed afterwards: the model is not
changed.

**Learning rates**: the effective ones of the official code, whose argument names are swapped
(methods.md §5.1): latents Adam 0.1 with ReduceLROnPlateau (patience 100, min 1e-4) every step;
generator Adam 0.01 with ExponentialLR(0.95) every 100 steps. The batch returned is the generator
output of the last forward pass, as in the code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth.hooks import batchnorm_layers, bn_sums, bn_targets
from zq_plugin.synth.losses import MomentTargets, Sums, moment_distance
from zq_plugin.synth.registry import BatchContext, register


@dataclass(frozen=True, kw_only=True)
class GenieConfig:
    """Options of ``method="genie"``.

    Attributes:
        steps: iterations per batch. Genie's code: 4000.
        latent_dim: size of each latent code. Genie's code: 256.
        width: channels after the projection. Genie's code: 128.
        lr_latent: Adam learning rate of the latents (effective value of the code: 0.1).
        lr_generator: Adam learning rate of the generator (effective value of the code: 0.01).
        generator_gamma: ExponentialLR factor of the generator. Genie's code: 0.95.
        generator_every: steps between generator learning-rate decays. Genie's code: 100.
        patience: ReduceLROnPlateau patience of the latents. Genie's code: 100.
        min_lr: ReduceLROnPlateau floor. Genie's code: 1e-4.
        swing: use swing convolution on strided convs. Genie: on.
        input_weight: weight of the per-sample input term. Genie's code: 1.
    """

    steps: int = 4000
    latent_dim: int = 256
    width: int = 128
    lr_latent: float = 0.1
    lr_generator: float = 0.01
    generator_gamma: float = 0.95
    generator_every: int = 100
    patience: int = 100
    min_lr: float = 1e-4
    swing: bool = True
    input_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1 (Genie uses 4000).")
        if self.latent_dim < 1 or self.width < 2:
            raise ConfigError(f"latent_dim={self.latent_dim} must be >= 1 and width={self.width} >= 2.")
        if not (self.lr_latent > 0 and self.lr_generator > 0):
            raise ConfigError("lr_latent and lr_generator must be > 0 (Genie: 0.1 and 0.01).")
        if not 0 < self.generator_gamma <= 1 or self.generator_every < 1:
            raise ConfigError("generator_gamma must lie in (0, 1] and generator_every be >= 1.")


class Generator(nn.Module):
    """Genie's generator, sized for images ``[C, H, W]`` (see the module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, width: int) -> None:
        """Build the layers for ``input_shape = (C, H, W)``."""
        super().__init__()
        channels, height, wide = input_shape
        self.out_hw = (height, wide)
        self.h0, self.w0 = math.ceil(height / 4), math.ceil(wide / 4)
        self.width = width
        self.project = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` from latents ``[N, latent_dim]``."""
        h = self.project(z).view(z.shape[0], self.width, self.h0, self.w0)
        h = F.interpolate(self.bn0(h), scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)
        h = torch.tanh(self.conv2(F.interpolate(h, scale_factor=2, mode="nearest")))
        return self.out_bn(h)[:, :, : self.out_hw[0], : self.out_hw[1]]


@contextlib.contextmanager
def swing_convolutions(model: nn.Module, gen: torch.Generator) -> Iterator[int]:
    """Reflect-pad by 1 and randomly crop the input of every strided Conv2d; yields how many; hooks removed."""
    handles = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        h, w = x.shape[-2:]
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy : dy + h, dx : dx + w]
        return (x, *args[1:])

    try:
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1):
                handles.append(m.register_forward_pre_hook(hook))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


class GenieObjective:
    """Genie's objective, its concatenated targets and weights built once per batch.

    ``sum_l (||mu~_l - mu_l||^2 + ||sigma~_l - sigma_l||^2) / C_l`` over the BN inputs (batch
    statistics) plus ``input_weight`` times the per-sample input term (mean 0, std 1).
    """

    def __init__(
        self,
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
        channels: int,
        input_weight: float,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.bn = MomentTargets.build(targets, device=device, dtype=dtype)
        self.bn_weights = self.bn.expand([1.0 / c for c in self.bn.channels])  # [K]: each layer / C
        self.input = MomentTargets.build({}, input_channels=channels, device=device, dtype=dtype)
        self.input_weights = self.input.expand([float(input_weight)])  # [C], on the targets' device

    def __call__(self, stats: dict[str, Sums], x: torch.Tensor) -> torch.Tensor:
        """The loss (a scalar) of images ``x`` ``[N, C, H, W]`` whose BN inputs have batch sums ``stats``."""
        loss = moment_distance(*self.input.collect({}, x, "per_sample"), self.input, self.input_weights)
        if self.bn.names:
            loss = loss + moment_distance(*self.bn.collect(stats, None, "batch"), self.bn, self.bn_weights)
        return loss


@register("genie", GenieConfig, needs_batchnorm=True)
def make_genie(model: nn.Module, config: GenieConfig, ctx: BatchContext) -> torch.Tensor:
    """Distill one batch ``[n, *input_shape]`` through a fresh generator and learned latents."""
    if len(ctx.input_shape) != 3:
        raise ConfigError(f"genie generates images [C, H, W]; input_shape={ctx.input_shape} is not 3-d.")
    bns = batchnorm_layers(model)
    objective = GenieObjective(
        bn_targets(bns), ctx.input_shape[0], config.input_weight, device=ctx.device, dtype=ctx.work_dtype
    )
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
    with torch.random.fork_rng(devices=[]):  # the generator's init draws from torch's global RNG
        torch.manual_seed(seed)
        generator = Generator(ctx.input_shape, config.latent_dim, config.width).to(ctx.device, ctx.work_dtype)
    z = ctx.place(torch.randn(ctx.batch_size, config.latent_dim, generator=ctx.generator)).requires_grad_(True)
    opt_z = torch.optim.Adam([z], lr=config.lr_latent)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator)
    sched_z = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, patience=config.patience, min_lr=config.min_lr)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=config.generator_gamma)
    swing_gen = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(config.steps), desc=ctx.desc, disable=None if ctx.progress else True, leave=False)
    x = torch.empty(0)
    swing = swing_convolutions(model, swing_gen) if config.swing else contextlib.nullcontext(0)
    with bn_sums(dict(bns)) as stats, swing:
        for step in bar:
            opt_z.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            x = generator(z)
            if ctx.input_range is not None:
                x = x.clamp(*ctx.input_range)
            model(ctx.feed(x))
            loss = objective(stats, x)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ModelError(
                    f"the Genie loss became {value} at step {step}: the model produces non-finite features "
                    "(check its weights and BN buffers) or the learning rates are too high."
                )
            if ctx.loss_log is not None:
                ctx.loss_log.append(value)
            loss.backward()
            opt_z.step()
            opt_g.step()
            sched_z.step(value)
            if (step + 1) % config.generator_every == 0:
                sched_g.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return x.detach()
