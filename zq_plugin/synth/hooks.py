"""Capture what each BatchNorm layer receives, keyed by module name, and freeze a model safely.

Statistics are read on a BN layer's **input** (the conv output it normalizes), through forward
pre-hooks keyed by the module's qualified name. There is no positional conv/BN pairing, so
any order of modules and any wiring (residuals, depthwise, BN1d after Linear) works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from zq_plugin._utils import eval_mode
from zq_plugin.errors import ModelError


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers (1d/2d/3d/Sync) of ``model`` that track running statistics, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def require_batchnorm(model: nn.Module, method: str) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Like :func:`batchnorm_layers`, but raise :class:`ModelError` when there is none."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics (searched "
            f"BatchNorm1d/2d/3d and SyncBatchNorm), so method={method!r}, which matches BN statistics, "
            "has nothing to match. Use method='noise' for a data-free baseline, or calibrate on real data."
        )
    return layers


def bn_targets(layers: dict[str, nn.modules.batchnorm._BatchNorm]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running ``(mean, std)`` per BN layer, ``std = sqrt(running_var + 1e-6)`` as in ZeroQ; each ``[C]``."""
    return {
        name: (bn.running_mean.detach().clone(), torch.sqrt(bn.running_var.detach() + 1e-6))  # type: ignore[union-attr]
        for name, bn in layers.items()
    }


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
