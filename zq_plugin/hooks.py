"""Model hooks every feature uses: BatchNorm layers by name, inputs captured by name, a model frozen safely.

Neutral: below synthesis, reconstruction, mixed precision and fine-tuning, which all read a
model through these (synthesis's BN-statistics sums live in :mod:`zq_plugin.synth.hooks`).
Statistics are read on a module's **input**, through forward pre-hooks keyed by the module's
qualified name: no positional conv/BN pairing, so any order and wiring works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from zq_plugin._utils import eval_mode
from zq_plugin.errors import ModelError

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
