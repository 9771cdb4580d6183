"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# the layers that carry quantized weights, everywhere in the package
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of Conv/Linear modules in execution order (FX trace; module order if tracing fails)."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
        names = [
            str(n.target)
            for n in graph.nodes
            if n.op == "call_module" and isinstance(modules.get(str(n.target)), WEIGHT_LAYERS)
        ]
    except Exception:
        names = []
    return list(dict.fromkeys(names)) or [n for n, m in modules.items() if isinstance(m, WEIGHT_LAYERS)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and give every module its own ``training`` flag back afterwards.

    Restores per module (not ``model.train(previous)``), so mixed modes survive, also on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
