"""Capture what each BatchNorm layer receives, keyed by module name, and freeze a model safely.

Statistics are read on a BN layer's **input** (the conv output it normalizes), through forward
pre-hooks keyed by the module's qualified name. There is no positional conv/BN pairing, so
any order of modules and any wiring (residuals, depthwise, BN1d after Linear) works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from zq_plugin._utils import eval_mode
from zq_plugin.errors import ModelError
from zq_plugin.synth.losses import Sums, stat_dtype, sums, sums_through_bn

# BatchNorm types whose eval forward is exactly ``(x - running_mean) / sqrt(running_var + eps) * w + b``
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers (1d/2d/3d/Sync) of ``model`` that track running statistics, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def require_batchnorm(
    model: nn.Module,
    method: str,
    *,
    argument: str = "method",
    fix: str = (
        "Use method='retro' (Retro-Synthesis needs no BatchNorm), method='noise' for a baseline, "
        "or calibrate on real data."
    ),
) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Like :func:`batchnorm_layers`, but raise :class:`ModelError` when there is none.

    The message names ``argument={method!r}`` (the caller's argument) and ends with ``fix``.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics (searched "
            f"BatchNorm1d/2d/3d and SyncBatchNorm), so {argument}={method!r}, which matches BN statistics, "
            f"has nothing to match. {fix}"
        )
    return layers


def bn_targets(layers: dict[str, nn.modules.batchnorm._BatchNorm]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running ``(mean, std)`` per BN layer, ``std = sqrt(running_var + 1e-6)`` as in ZeroQ; each ``[C]``.

    On the buffers' device, in :func:`~zq_plugin.synth.losses.stat_dtype` of their dtype.
    """
    out = {}
    for name, bn in layers.items():
        mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)  # tracked layers only
        dtype = stat_dtype(mean.dtype)
        out[name] = (mean.detach().to(dtype, copy=True), torch.sqrt(var.detach().to(dtype) + 1e-6))
    return out


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each module on every forward; hooks always removed.

    Yields:
        A dict ``name -> Tensor`` overwritten on each forward pass.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> with capture_inputs({"bn": bn}) as feats:
        ...     _ = bn(torch.zeros(2, 3, 4, 4))
        ...     shape = feats["bn"].shape
        >>> shape, len(bn._forward_pre_hooks)
        (torch.Size([2, 3, 4, 4]), 0)
    """
    feats: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], _name: str = name) -> None:
                feats[_name] = args[0]

            handles.append(module.register_forward_pre_hook(hook))
        yield feats
    finally:
        for h in handles:
            h.remove()
        feats.clear()


def _eval_slope(bn: nn.Module) -> torch.Tensor | None:
    """``[C]`` derivative of a frozen plain BatchNorm in eval mode, or None when that is not known."""
    # isinstance narrows the type; the exact-type test excludes subclasses with their own forward
    if not isinstance(bn, _PLAIN_BN) or type(bn) not in _PLAIN_BN or bn.running_var is None:
        return None
    if any(p.requires_grad for p in bn.parameters()):
        return None
    slope = torch.rsqrt(bn.running_var.detach() + bn.eps)
    return slope * bn.weight.detach() if bn.weight is not None else slope


@contextlib.contextmanager
def bn_sums(layers: dict[str, nn.Module]) -> Iterator[dict[str, Sums]]:
    """Record per-sample sums of each BatchNorm layer's input ``f`` on every forward; hooks removed.

    For a frozen plain BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, parameters without
    grad) in eval mode, the forward hook re-attaches the layer's output through
    :func:`zq_plugin.synth.losses.sums_through_bn`, whose backward folds the layer's own
    derivative into the sums' gradient: a synthesis step then costs little more than a bare
    forward+backward. Any other layer (a subclass, trainable parameters, train mode) keeps its
    output and gets :func:`zq_plugin.synth.losses.sums` on its input. The values and gradients
    are the same either way; :meth:`zq_plugin.synth.losses.MomentTargets.collect` turns the
    sums of all layers into concatenated means and stds.

    Args:
        layers: name -> BatchNorm module.

    Yields:
        A dict ``name -> (sum f, sum f^2, positions)`` (sums over the spatial dims, ``[N, C]``
        each) overwritten on each forward pass.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3).eval().requires_grad_(False)
        >>> x = torch.randn(2, 3, 4, 4, requires_grad=True)
        >>> with bn_sums({"bn": bn}) as stats:
        ...     _ = bn(x)
        ...     s1, s2, positions = stats["bn"]
        >>> s1.shape, positions, torch.allclose(s1, x.sum((2, 3))), len(bn._forward_hooks)
        (torch.Size([2, 3]), 16, True, 0)
    """
    out: dict[str, Sums] = {}
    handles = []
    try:
        for name, module in layers.items():
            slope = _eval_slope(module)

            def hook(
                m: nn.Module,
                args: tuple[torch.Tensor, ...],
                y: torch.Tensor,
                _name: str = name,
                _slope: torch.Tensor | None = slope,
            ) -> torch.Tensor | None:
                f = args[0]
                if _slope is not None and not m.training:
                    k = _slope.view(1, -1, *([1] * (f.dim() - 2)))  # [1, C, 1, ...] against f
                    y, out[_name] = sums_through_bn(f, y, k)
                    return y
                out[_name] = sums(f)
                return None

            handles.append(module.register_forward_hook(hook))
        yield out
    finally:
        for h in handles:
            h.remove()
        out.clear()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with every parameter frozen, and restore both afterwards.

    Restores each module's ``training`` flag and each parameter's ``requires_grad`` exactly,
    also when the body raises or is interrupted (KeyboardInterrupt). Weights and buffers are
    not written: eval-mode BatchNorm does not update its running statistics.
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
