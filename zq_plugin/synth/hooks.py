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

from zq_plugin.hooks import _PLAIN_BN, batchnorm_layers, capture_inputs, frozen, require_batchnorm
from zq_plugin.synth.losses import Sums, stat_dtype, sums, sums_through_bn

# BatchNorm types whose eval forward is exactly ``(x - running_mean) / sqrt(running_var + eps) * w + b``
__all__ = ["batchnorm_layers", "bn_sums", "bn_targets", "capture_inputs", "frozen", "require_batchnorm"]


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
