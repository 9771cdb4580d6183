"""The pixel-optimization loop shared by ``zeroq``, ``dsg`` and ``retro``.

Adam on the pixels, ReduceLROnPlateau on the loss, and after every step a projection onto the
valid input box; a non-finite loss stops with a :class:`~zq_plugin.errors.ModelError`; each
step's loss goes to ``ctx.loss_log`` when it is a list; a tqdm bar shows progress on a terminal.
The methods differ only in ``loss_fn``.

Example:
    >>> import torch
    >>> from zq_plugin.synth.registry import BatchContext
    >>> ctx = BatchContext(batch_size=2, input_shape=(1, 2, 2), input_range=(-1.0, 1.0),
    ...                    generator=torch.Generator())
    >>> from zq_plugin.synth.zeroq import ZeroQConfig
    >>> config = ZeroQConfig(steps=200, lr=0.1)
    >>> x = optimize_pixels(torch.zeros(2, 1, 2, 2), lambda x: (x - 0.5).pow(2).sum(), ctx, config, "toy")
    >>> round(float(x.mean()), 2)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm.auto import tqdm

from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth.registry import BatchContext


class LoopConfig(Protocol):
    """The loop options every pixel method's config carries."""

    @property
    def steps(self) -> int: ...  # noqa: D102
    @property
    def lr(self) -> float: ...  # noqa: D102
    @property
    def patience(self) -> int: ...  # noqa: D102
    @property
    def factor(self) -> float: ...  # noqa: D102
    @property
    def min_lr(self) -> float: ...  # noqa: D102
    @property
    def statistics(self) -> str: ...  # noqa: D102
    @property
    def init(self) -> str: ...  # noqa: D102


def check_loop_config(config: LoopConfig, method: str) -> None:
    """Raise :class:`ConfigError` for a bad option of the loop every pixel method shares.

    Checks ``steps >= 1``, ``lr > 0``, ``patience >= 0``, ``0 < factor < 1``, ``min_lr >= 0``,
    ``statistics`` in ``{"batch", "per_sample"}`` and ``init`` in ``{"uniform", "gaussian"}``;
    each message names the value and the method's paper/code default.
    """
    if config.steps < 1:
        raise ConfigError(f"steps={config.steps} must be >= 1 ({method} uses 500).")
    if not config.lr > 0:
        raise ConfigError(f"lr={config.lr} must be > 0 ({method} default: 0.5).")
    if config.patience < 0 or not 0 < config.factor < 1 or config.min_lr < 0:
        raise ConfigError(
            f"patience={config.patience}, factor={config.factor}, min_lr={config.min_lr}: the plateau schedule "
            "needs patience >= 0, 0 < factor < 1 and min_lr >= 0 (defaults 100, 0.1, 1e-4)."
        )
    if config.statistics not in ("per_sample", "batch"):
        raise ConfigError(f"statistics={config.statistics!r}: use 'batch' or 'per_sample'.")
    if config.init not in ("uniform", "gaussian"):
        raise ConfigError(f"init={config.init!r}: use 'uniform' (ZeroQ's tiny grid) or 'gaussian' (N(0, 1)).")


def jitter_and_flip(jitter: int, flip: bool, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """DeepInversion's augmentation of the pixels at each step (Yin et al., CVPR 2020), or ``None`` when off.

    Each call rolls the whole batch ``[N, C, H, W]`` by a random ``(dy, dx)`` in
    ``[-jitter, jitter]`` pixels (wrapping around) and, with ``flip``, mirrors it horizontally
    with probability 1/2; the draws come from ``gen``. The loss sees the augmented images, the
    optimizer moves the originals: the images must match the statistics under small shifts and
    mirroring, as the training images did. Off (``jitter=0, flip=False``) draws nothing, so the
    images are those of a run without it.

    Example:
        >>> aug = jitter_and_flip(2, True, torch.Generator().manual_seed(0))
        >>> aug(torch.arange(16.0).reshape(1, 1, 4, 4)).shape
        torch.Size([1, 1, 4, 4])
        >>> jitter_and_flip(0, False, torch.Generator()) is None
        True
    """
    if jitter < 0:
        raise ConfigError(f"jitter={jitter} must be >= 0 pixels.")
    if jitter == 0 and not flip:
        return None

    def augment(x: torch.Tensor) -> torch.Tensor:
        draws = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
        if jitter:
            x = torch.roll(x, shifts=(int(draws[0]), int(draws[1])), dims=(-2, -1))
        if flip and bool(torch.rand((), generator=gen) < 0.5):
            x = torch.flip(x, dims=(-1,))
        return x

    return augment


def optimize_pixels(
    x0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    ctx: BatchContext,
    config: LoopConfig,
    name: str,
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Minimise ``loss_fn(x)`` over the pixels ``x`` ``[N, *input_shape]``, starting from ``x0`` (clamped).

    Args:
        x0: initial pixels (on the CPU; moved to the model's device in ``ctx.work_dtype``).
        loss_fn: runs the model on ``x`` and returns the scalar loss.
        ctx: the batch's context (input box, progress, loss log).
        config: ``steps`` (Adam steps), ``lr`` (Adam), ``patience``, ``factor``, ``min_lr``
            (ReduceLROnPlateau).
        name: the method's name, for messages.
        augment: applied to the pixels before ``loss_fn`` at each step (:func:`jitter_and_flip`).

    Returns:
        The optimized pixels, detached.

    Raises:
        ModelError: the loss became NaN or Inf.
    """
    x = ctx.clamp_(ctx.place(x0))
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=config.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=config.factor, patience=config.patience, min_lr=config.min_lr
    )
    # disable=None: tqdm draws only on a terminal, so logs and CI output stay clean
    bar = tqdm(range(config.steps), desc=ctx.desc, disable=None if ctx.progress else True, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x if augment is None else augment(x))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(
                f"the {name} loss became {value} at step {step}: the model produces non-finite features "
                f"(check its weights and BN buffers for NaN/Inf) or lr={config.lr} is too high."
            )
        if ctx.loss_log is not None:
            ctx.loss_log.append(value)
        loss.backward()
        opt.step()
        sched.step(value)
        with torch.no_grad():
            ctx.clamp_(x)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return x.detach()
