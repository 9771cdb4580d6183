"""AdaDFQ (Qian, Wang, Hong, Wang, CVPR 2023) and its base GDFQ (Xu et al., ECCV 2020).

A **conditional generator** ``G(z, y)`` plays against the quantized network ``Q`` (the student)
while the full-precision model ``P`` (the teacher) is frozen; data are streamed, never stored
(methods.md §6). With ``z_p = P(x)``, ``z_q = Q(x)`` the logits ``[N, C]`` of ``x = G(z, y)``
and ``H(p) = -sum_c p_c log p_c``:

* disagreement ``p_ds = softmax(z_p - z_q)``, agreement ``p_as = softmax(z_p + z_q)``;
* normalized disagreement entropy ``H' = (H(p_ds) - min_batch H) / (log C - min_batch H)``
  (``normalize="batch"``, the paper's; guarded against ``min_batch H = log C``, defect 4 of
  methods.md §6.3) or ``H / log C`` (``normalize="max"``, independent of the batch);
* the **margin** (adaptability) term ``mean(max(lambda_l - H', 0)) + mean(max(H' - lambda_u, 0))``:
  zero while a sample's ``H'`` lies in ``[lambda_l, lambda_u]``, rising linearly outside, so the
  generator's samples are neither already agreed on (``H' -> 1``) nor hopeless (``H' -> 0``);
* the generator minimizes
  ``L_G = margin + beta * (alpha_ds * CE(z_p - z_q, y) + alpha_as * CE(z_p + z_q, y)) + gamma * L_BNS``
  (``class_loss="adaptive"``), where ``L_BNS`` is GDFQ's BatchNorm loss: per BN layer the mean
  squared error of the batch mean and the (biased) batch variance of its input against the
  running statistics, averaged over layers. GDFQ's generator (``class_loss="teacher"``,
  ``margin=None``) minimizes ``CE(z_p, y) + gamma * L_BNS`` with ``gamma = 0.1``.

The student's side (:func:`student_loss`) is the fine-tuning loop's (:mod:`zq_plugin.finetuning`):
GDFQ's distillation ``tau^2 KL(softmax(z_p / tau) || softmax(z_q / tau)) + CE(z_q, y)``, or
AdaDFQ's code, ``-T^2 H(softmax((z_p - z_q) / T))`` (methods.md §6.2: the paper's
``1 - H'`` is not what its code minimizes).

Options from SynQ (Kim et al., ICLR 2025): a **low-pass filter** on the generated images
(:func:`low_pass`) and **soft labels only for hard samples** (the CE term of :func:`student_loss`
dropped where the teacher gives the label less than ``1 - hard_threshold``).

Generator (GDFQ's CIFAR generator, sized by ``input_shape`` ``(C, H, W)``): the label embedding
multiplies ``z``; ``Linear(latent_dim -> width * ceil(H/4) * ceil(W/4)) -> BN -> 2x upsample ->
Conv3x3 -> BN(eps=0.8) -> LeakyReLU(0.2) -> 2x upsample -> Conv3x3(width -> width/2) ->
BN(eps=0.8) -> LeakyReLU(0.2) -> Conv3x3(-> C) -> tanh -> BatchNorm2d(C, affine=False)``, cropped
to ``H x W`` and clamped to the model's valid input box. ``eps=0.8`` is GDFQ's quirk
(``BatchNorm2d(C, 0.8)`` passes eps, not momentum), kept because published numbers use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin.errors import ConfigError
from zq_plugin.synth.losses import Sums, stat_dtype

ClassLoss = Literal["adaptive", "teacher"]
StudentLoss = Literal["kd", "entropy"]
Normalize = Literal["batch", "max"]


@dataclass(frozen=True, kw_only=True)
class AdaDFQConfig:
    """Options of the AdaDFQ game (``method="adadfq"``; GDFQ's defaults: :class:`GDFQConfig`).

    Defaults are the official code's CIFAR ResNet-20 setting (methods.md §6.2) unless stated.

    Attributes:
        steps: game iterations (one generator update, then one student update after ``warmup``).
            The paper: 400 epochs x 200 iterations.
        warmup: generator-only iterations first. The code: 4 epochs (CIFAR), 50 (ImageNet).
        latent_dim: size of ``z``. GDFQ/AdaDFQ: 100.
        width: channels after the projection. GDFQ: 128.
        lr_generator: Adam learning rate of the generator, betas ``(0.5, 0.999)``. The code: 1e-3.
        margin: ``(lambda_l, lambda_u)`` of the adaptability term, ``0 <= l < u <= 1``;
            ``None`` drops the term. The code: ``(0.1, 0.8)`` at 3 bits (``lambda_l = 0.3`` at 4/5 bits
            for ResNet-18).
        alpha_ds: weight of ``CE(z_p - z_q, y)``. The code: 0.2.
        alpha_as: weight of ``CE(z_p + z_q, y)``. The code: 0.1.
        balance_weight: ``beta``, the weight of both CE terms. The code: 1.
        bns_weight: ``gamma``, the weight of the BN-statistics term. AdaDFQ: 1; GDFQ: 0.1.
        class_loss: ``"adaptive"`` (AdaDFQ's two CE terms) or ``"teacher"`` (GDFQ's ``CE(z_p, y)``).
        normalize: ``"batch"`` (the paper's min-max over the batch) or ``"max"`` (``H / log C``).
        lr_student: the student's SGD (Nesterov, momentum 0.9, weight decay 1e-4) learning rate.
            The code: 1e-4 (CIFAR), 1e-5/1e-6 (ImageNet).
        student_loss: ``"kd"`` (GDFQ: KL at ``temperature`` plus CE) or ``"entropy"`` (AdaDFQ's code).
        temperature: of the student loss. GDFQ: 20; AdaDFQ's code: 20 (CIFAR), 5 (ImageNet).
        lowpass: SynQ's low-pass filter: keep spatial frequencies up to this fraction of the
            highest (0 < lowpass <= 1); ``None``: off.
        hard_threshold: SynQ: no CE on the sampled label for samples whose teacher probability
            of it is below ``1 - hard_threshold`` (0 < t < 1); ``None``: CE on every sample.
        learn_steps: the student's quantization steps train with its weights (LSQ, Esser et al.,
            ICLR 2020: gradient scaled by ``1 / sqrt(numel * qmax)``); off: the steps stay fixed.
        w_bits: the student's weight bits when the game runs inside ``synthesize`` (2-8).
        a_bits: the student's activation bits there (2-8).
        oscillation: the remedy for weights oscillating across a rounding boundary (Nagel et
            al., ICML 2022; :mod:`zq_plugin.oscillation`): ``"freeze"`` (iterative freezing),
            ``"dampen"`` (the dampening loss) or ``None``.
        freeze_threshold: the oscillation frequency above which a weight freezes (the paper's
            ``f_th``; its moving averages use momentum 0.01).
        dampen_weight: the dampening loss's factor.
        holdout: the share of a fixed image set held out to check the student (with a
            generator: the calibration images are the check set); 0: no check.
        checks: how many times the held-out distillation loss (KL of the student's from the
            teacher's probabilities) is measured; the student ends in the state that measured
            lowest, the starting one included, so fine-tuning never ends worse than it began on it.
    """

    steps: int = 400
    warmup: int = 50
    latent_dim: int = 100
    width: int = 128
    lr_generator: float = 1e-3
    margin: tuple[float, float] | None = (0.1, 0.8)
    alpha_ds: float = 0.2
    alpha_as: float = 0.1
    balance_weight: float = 1.0
    bns_weight: float = 1.0
    class_loss: ClassLoss = "adaptive"
    normalize: Normalize = "batch"
    lr_student: float = 1e-4
    student_loss: StudentLoss = "kd"
    temperature: float = 20.0
    lowpass: float | None = None
    hard_threshold: float | None = None
    learn_steps: bool = False
    w_bits: int = 4
    a_bits: int = 4
    oscillation: str | None = "freeze"
    freeze_threshold: float = 0.02
    dampen_weight: float = 1e-2
    holdout: float = 0.125
    checks: int = 10

    def __post_init__(self) -> None:
        from zq_plugin.oscillation import OscillationConfig
        from zq_plugin.qparams import check_bits

        remedy = cast(Any, self.oscillation)
        OscillationConfig(remedy=remedy, threshold=self.freeze_threshold, dampen_weight=self.dampen_weight)
        if not 0.0 <= self.holdout < 1.0 or isinstance(self.checks, bool) or self.checks < 1:
            raise ConfigError(f"holdout={self.holdout} must lie in [0, 1) and checks={self.checks} be >= 1.")

        if self.margin is not None:
            margin: tuple[object, ...] = tuple(self.margin)
            if len(margin) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in margin):
                raise ConfigError(f"margin={self.margin!r} must be two numbers (lambda_l, lambda_u), e.g. (0.1, 0.8).")
            lower, upper = (float(v) for v in margin)  # type: ignore[arg-type]
            if not 0.0 <= lower < upper <= 1.0:
                raise ConfigError(
                    f"margin={self.margin!r} needs 0 <= lambda_l < lambda_u <= 1 (the normalized entropy lies "
                    "in [0, 1]); AdaDFQ uses (0.1, 0.8). margin=None drops the term (GDFQ)."
                )
            object.__setattr__(self, "margin", (lower, upper))
        if self.steps < 1 or not 0 <= self.warmup < self.steps:
            raise ConfigError(
                f"steps={self.steps}, warmup={self.warmup}: need steps >= 1 and 0 <= warmup < steps "
                "(warm-up iterations train the generator alone)."
            )
        if self.latent_dim < 1 or self.width < 2:
            raise ConfigError(f"latent_dim={self.latent_dim} must be >= 1 and width={self.width} >= 2.")
        rates = {"lr_generator": self.lr_generator, "lr_student": self.lr_student, "temperature": self.temperature}
        for name, value in rates.items():
            if not value > 0:
                raise ConfigError(f"{name}={value} must be > 0.")
        weights = {
            "alpha_ds": self.alpha_ds,
            "alpha_as": self.alpha_as,
            "balance_weight": self.balance_weight,
            "bns_weight": self.bns_weight,
        }
        for name, value in weights.items():
            if not value >= 0:
                raise ConfigError(f"{name}={value} must be >= 0.")
        choices: dict[str, tuple[object, tuple[str, ...]]] = {
            "class_loss": (self.class_loss, ("adaptive", "teacher")),
            "normalize": (self.normalize, ("batch", "max")),
            "student_loss": (self.student_loss, ("kd", "entropy")),
        }
        for name, (choice, allowed) in choices.items():
            if choice not in allowed:
                raise ConfigError(f"{name}={choice!r} is not one of {list(allowed)}.")
        if self.lowpass is not None and not 0 < self.lowpass <= 1:
            raise ConfigError(f"lowpass={self.lowpass} must lie in (0, 1] (a fraction of the highest frequency).")
        if self.hard_threshold is not None and not 0 < self.hard_threshold < 1:
            raise ConfigError(f"hard_threshold={self.hard_threshold} must lie in (0, 1).")
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")


@dataclass(frozen=True, kw_only=True)
class GDFQConfig(AdaDFQConfig):
    """GDFQ (Xu et al., ECCV 2020): AdaDFQ's game without margins.

    The generator learns the teacher's class (``CE(z_p, y) + 0.1 L_BNS``) and the student is
    distilled with KL + CE at temperature 20 (methods.md §6.1).
    """

    margin: tuple[float, float] | None = None
    class_loss: ClassLoss = "teacher"
    bns_weight: float = 0.1


class ConditionalGenerator(nn.Module):
    """GDFQ's conditional generator, sized for images ``[C, H, W]`` (see the module docstring).

    Example:
        >>> g = ConditionalGenerator((1, 28, 28), num_classes=10, latent_dim=8, width=16)
        >>> g(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, latent_dim: int = 100, width: int = 128):
        """Build the layers for ``input_shape = (C, H, W)`` and ``num_classes`` labels."""
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"the generator makes images [C, H, W]; input_shape={input_shape} is not 3-d.")
        channels, height, wide = input_shape
        self.out_hw = (height, wide)
        self.h0, self.w0 = math.ceil(height / 4), math.ceil(wide / 4)
        self.width, self.latent_dim, self.num_classes = width, latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, eps=0.8)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=0.8)
        self.conv3 = nn.Conv2d(width // 2, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` from latents ``[N, latent_dim]`` and labels ``[N]`` (int64)."""
        h = self.project(self.embed(labels) * z).view(z.shape[0], self.width, self.h0, self.w0)
        h = F.interpolate(self.bn0(h), scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        h = torch.tanh(self.conv3(h))
        return self.out_bn(h)[:, :, : self.out_hw[0], : self.out_hw[1]]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(softmax(logits))`` per row, in nats: ``[N, C] -> [N]``, each in ``[0, log C]``.

    Example:
        >>> entropy(torch.zeros(2, 4))  # uniform: log 4
        tensor([1.3863, 1.3863])
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def normalized_entropy(h: torch.Tensor, num_classes: int, normalize: Normalize = "batch") -> torch.Tensor:
    """AdaDFQ's ``H'`` of entropies ``h`` ``[N]``: in ``[0, 1]``.

    ``"batch"``: ``(h - min h) / (log C - min h)`` (the paper's; a batch whose minimum is
    ``log C``, every sample uniform, gives ones instead of dividing by zero); ``"max"``:
    ``h / log C``.

    Example:
        >>> normalized_entropy(torch.tensor([0.0, math.log(4) / 2, math.log(4)]), 4)
        tensor([0.0000, 0.5000, 1.0000])
    """
    top = math.log(num_classes)
    if normalize == "max":
        return (h / top).clamp(0.0, 1.0)
    low = h.min()
    span = top - low
    if float(span.detach()) <= 1e-6 * top:  # every sample (nearly) uniform
        return torch.ones_like(h)
    return ((h - low) / span).clamp(0.0, 1.0)


def margin_loss(h_norm: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """AdaDFQ's adaptability term ``mean(max(lower - H', 0)) + mean(max(H' - upper, 0))`` (a scalar).

    Zero when every ``H'`` lies in ``[lower, upper]``, growing with slope ``1 / N`` per sample
    outside.

    Example:
        >>> margin_loss(torch.tensor([0.5, 0.0, 1.0]), 0.1, 0.8)  # (0.1 + 0.2) / 3
        tensor(0.1000)
    """
    return F.relu(lower - h_norm).mean() + F.relu(h_norm - upper).mean()


def batchnorm_statistics_loss(
    stats: Mapping[str, Sums], targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """GDFQ's BN loss: ``mean_l [MSE(mean_l, mu_l) + MSE(var_l, sigma_l^2)]`` (a scalar).

    ``stats`` are the per-sample sums of each BN layer's input
    (:func:`zq_plugin.synth.hooks.bn_sums`), ``targets`` each layer's running ``(mean, var)``
    ``[C]``; the batch variance is the biased one (as ``BatchNorm`` normalizes with).
    """
    terms = []
    for name, (s1, s2, positions) in stats.items():
        count = s1.shape[0] * positions
        mean = s1.sum(0) / count
        var = s2.sum(0) / count - mean.square()
        mu, var_target = targets[name]
        terms.append(F.mse_loss(mean, mu) + F.mse_loss(var, var_target))
    if not terms:
        raise ConfigError("no BatchNorm statistics were recorded: the model has no BatchNorm layer on its path.")
    return torch.stack(terms).mean()


def running_moments(layers: Mapping[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BN layer's ``(running_mean, running_var)``, detached copies in the statistics dtype."""
    out = {}
    for name, bn in layers.items():
        mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)  # tracked layers only
        dtype = stat_dtype(mean.dtype)
        out[name] = (mean.detach().to(dtype, copy=True), var.detach().to(dtype, copy=True))
    return out


def generator_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    bns: torch.Tensor,
    config: AdaDFQConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_G`` (module docstring) of logits ``[N, C]``, labels ``[N]`` and the BN term; and its parts.

    Gradients reach the generator through both logits; the student's parameters take none of
    them (the caller steps only the generator's optimizer).
    """
    z_p, z_q = teacher_logits.float(), student_logits.float()
    parts: dict[str, torch.Tensor] = {"bns": config.bns_weight * bns}
    if config.class_loss == "teacher":
        parts["class"] = F.cross_entropy(z_p, labels)
    else:
        ds, agree = F.cross_entropy(z_p - z_q, labels), F.cross_entropy(z_p + z_q, labels)
        parts["class"] = config.balance_weight * (config.alpha_ds * ds + config.alpha_as * agree)
    if config.margin is not None:
        h_norm = normalized_entropy(entropy(z_p - z_q), z_p.shape[-1], config.normalize)
        parts["margin"] = margin_loss(h_norm, *config.margin)
    total = torch.stack(list(parts.values())).sum()
    return total, {name: float(value.detach()) for name, value in parts.items()}


def student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    kind: StudentLoss = "kd",
    temperature: float = 20.0,
    hard_threshold: float | None = None,
) -> torch.Tensor:
    """The student's distillation loss on logits ``[N, C]`` (a scalar).

    ``"kd"``: ``tau^2 KL(softmax(z_p / tau) || softmax(z_q / tau))`` (mean over samples, not
    over classes: GDFQ's ``KLDivLoss()`` default also divided by ``C``, methods.md §6.1) plus
    ``CE(z_q, y)`` when ``labels`` are given (with ``hard_threshold``, only on samples whose
    teacher probability of ``y`` is at least ``1 - hard_threshold``: SynQ). ``"entropy"``:
    ``-tau^2 H(softmax((z_p - z_q) / tau))`` (AdaDFQ's code), lowest when ``z_q = z_p + c``.

    Example:
        >>> z = torch.randn(4, 10)
        >>> float(student_loss(z, z, None)) == 0.0
        True
    """
    z_q, z_p = student_logits.float(), teacher_logits.detach().float()
    tau = temperature
    if kind == "entropy":
        return -(tau**2) * entropy((z_p - z_q) / tau).mean()
    kl = F.kl_div(F.log_softmax(z_q / tau, -1), F.log_softmax(z_p / tau, -1), reduction="batchmean", log_target=True)
    loss = tau**2 * kl
    if labels is None:
        return loss
    ce = F.cross_entropy(z_q, labels, reduction="none")
    if hard_threshold is not None:
        easy = F.softmax(z_p, -1).gather(1, labels[:, None])[:, 0] >= 1 - hard_threshold
        ce = ce * easy
    return loss + ce.mean()


def low_pass(x: torch.Tensor, keep: float) -> torch.Tensor:
    """SynQ's low-pass filter: ``x`` ``[N, C, H, W]`` without its high spatial frequencies.

    Frequencies whose radius (normalized so that the corner of the spectrum is 1) exceeds
    ``keep`` are zeroed by FFT; differentiable, same shape and dtype.

    Example:
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.allclose(low_pass(x, 1.0), x, atol=1e-5), float(low_pass(x, 1e-3).std((2, 3)).max()) < 1e-5
        (True, True)
    """
    height, wide = x.shape[-2:]
    fy = torch.fft.fftfreq(height, device=x.device)[:, None] * 2  # in [-1, 1)
    fx = torch.fft.fftfreq(wide, device=x.device)[None, :] * 2
    radius = torch.sqrt(fy.square() + fx.square()) / math.sqrt(2)  # 1 at the corner (highest)
    mask = (radius <= keep + 1e-9).to(x.dtype if x.dtype.is_floating_point else torch.float32)
    spectrum = torch.fft.fft2(x.float())
    return torch.fft.ifft2(spectrum * mask).real.to(x.dtype)


def sample_inputs(
    config: AdaDFQConfig, num_classes: int, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[n, latent_dim]`` ~ N(0, 1) and uniform labels ``[n]``, drawn on the CPU from ``gen``."""
    z = torch.randn(n, config.latent_dim, generator=gen).to(device, dtype)
    labels = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    return z, labels


def generate(
    generator: nn.Module,
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    input_range: tuple[float, float] | None,
    lowpass: float | None,
) -> torch.Tensor:
    """``G(z, y)``, low-pass filtered (``lowpass``) and clamped to ``input_range``."""
    x = generator(z, labels)
    if lowpass is not None and lowpass < 1:
        x = low_pass(x, lowpass)
    if input_range is not None:
        x = x.clamp(*input_range)
    return x
