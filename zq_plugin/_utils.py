"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zq_plugin.errors import ModelError

logger = logging.getLogger(__name__)

# the layers that carry quantized weights, everywhere in the package
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    *(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    *(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    nn.Linear,
)


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


OutputFn = Callable[[Any], torch.Tensor]


def select_output(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The logits of a model's ``output``: the one rule every entry point applies.

    ``output_fn(output)`` when given; otherwise the output itself when it is a tensor, the
    first tensor of a tuple/list (``(logits, aux)``, torchvision's ``GoogLeNetOutputs``), the
    ``"logits"`` or ``"out"`` entry of a dict, else its first tensor value; nested containers
    are searched depth-first in the same way.

    Raises:
        ModelError: no tensor in the output, or ``output_fn`` returned something else.

    Example:
        >>> import torch
        >>> select_output((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
        >>> select_output({"aux": torch.zeros(1), "logits": torch.ones(2)}).tolist()
        [1.0, 1.0]
    """
    if output_fn is not None:
        picked = output_fn(output)
        if not isinstance(picked, torch.Tensor):
            raise ModelError(f"output_fn returned {type(picked).__name__}; it must return the logits tensor.")
        return picked
    found = _first_tensor(output)
    if found is None:
        raise ModelError(
            f"the model returned {type(output).__name__} with no tensor in it; pass output_fn=... that picks "
            "the logits tensor from its output."
        )
    return found


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        values: Any = output.values()
    elif isinstance(output, tuple | list):
        values = output
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def report_float_layers(qmodel: nn.Module, names: Sequence[str], entry: str) -> None:
    """Record on ``qmodel.zq_float_layers`` the weight layers ``entry`` left in float, and warn if any.

    Every quantized-model entry point calls this, so low-bit accuracy is never reported for a
    model that still computes some of its weight layers in float without saying so.
    """
    qmodel.zq_float_layers = tuple(names)  # type: ignore[assignment]
    if names:
        shown = ", ".join(list(names)[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        message = (
            f"{entry}: {len(names)} weight layer(s) left in float ({shown}): its accuracy is not that of a "
            "fully quantized model. They are listed in .zq_float_layers."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``model``'s parameters and buffers (CPU float32 when it has none).

    Raises:
        ConfigError: the model's tensors lie on several devices or have several floating dtypes.

    Example:
        >>> model_device_dtype(torch.nn.Linear(2, 2).double())
        (device(type='cpu'), torch.float64)
    """
    from zq_plugin.errors import ConfigError

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    devices = sorted({str(t.device) for t in tensors})
    dtypes = sorted({str(t.dtype) for t in tensors})
    if len(devices) > 1:
        raise ConfigError(
            f"{type(model).__name__} has tensors on several devices ({', '.join(devices)}); move it to one "
            "device first, e.g. model.to('cuda')."
        )
    if len(dtypes) > 1:
        raise ConfigError(
            f"{type(model).__name__} mixes floating dtypes ({', '.join(dtypes)}); convert it to one first, "
            "e.g. model.float() (or model.to(torch.bfloat16))."
        )
    if not tensors:
        return torch.device("cpu"), torch.float32
    return tensors[0].device, tensors[0].dtype
