"""Functional calls of a layer's own weight turned into calls of the layer, so Brevitas can swap it.

Brevitas quantizes modules: ``F.conv2d(x, self.mix.weight, self.mix.bias)`` is no module call,
so it would stay float while the FX simulation and PT2E quantize it (the simulation names it by
its weight's owner, ``mix``). Where the call computes exactly what the owner module computes
(same class, the owner's own weight and bias, the same stride, padding, dilation and groups),
the traced graph calls the module instead; anything else is left as it was (and reported float).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

_CONV = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _arguments(node: Any, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    values = dict(defaults)
    if len(node.args) > len(names):
        return None
    values.update(zip(names, node.args, strict=False))
    for key, value in node.kwargs.items():
        if key not in names:
            return None
        values[key] = value
    return values if "input" in values and "weight" in values else None


def _same(value: Any, attribute: Any, dims: int) -> bool:
    if isinstance(attribute, str) or isinstance(value, str):
        return value == attribute
    as_tuple = tuple(value) if isinstance(value, list | tuple) else (value,) * dims
    return as_tuple == tuple(attribute)


def _owner(node: Any, leaf: str) -> str | None:
    if getattr(node, "op", None) != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    return owner if owner and name == leaf else None


def _matching_module(node: Any, model: nn.Module) -> tuple[str, nn.Module, Any] | None:
    """``(owner, float module, input node)`` when ``node`` computes exactly its owner module's call."""
    kind = getattr(node.target, "__name__", "")
    if kind == "linear":
        values = _arguments(node, ("input", "weight", "bias"), {"bias": None})
        cls: type[nn.Module] = nn.Linear
    elif kind in _CONV:
        values = _arguments(node, _CONV_ARGS, _CONV_DEFAULTS)
        cls = _CONV[kind]
    else:
        return None
    if values is None:
        return None
    owner = _owner(values["weight"], "weight")
    if owner is None:
        return None
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if type(module).forward is not cls.forward or not isinstance(module, cls):
        return None
    bias_owner = _owner(values["bias"], "bias")
    if (module.bias is None) != (values["bias"] is None) or (values["bias"] is not None and bias_owner != owner):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        if module.padding_mode != "zeros" or int(values["groups"]) != module.groups:
            return None
        for key in ("stride", "padding", "dilation"):
            if not _same(values[key], getattr(module, key), dims):
                return None
    return owner, module, values["input"]


def functional_layers_as_modules(graph: Any, model: nn.Module) -> list[str]:
    """Rewrite ``graph`` (a traced copy of ``model``) so that functional layer calls call their module; in place.

    Args:
        graph: Brevitas's traced ``GraphModule`` of a copy of ``model`` (before layerwise quantization).
        model: the float model, whose modules say what each owner computes.

    Returns:
        The owners now called as modules, in graph order.
    """
    done: list[str] = []
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        found = _matching_module(node, model)
        if found is None:
            continue
        owner, module, source = found
        holder = graph.get_submodule(owner)
        layer = copy.deepcopy(module)
        layer.weight = holder.weight  # the copy's parameters (preprocessing may have rewritten them)
        if module.bias is not None:
            layer.bias = holder.bias
        graph.add_submodule(owner, layer)
        with graph.graph.inserting_before(node):
            call = graph.graph.call_module(owner, (source,))
        node.replace_all_uses_with(call)
        graph.graph.erase_node(node)
        done.append(owner)
    if done:
        graph.graph.eliminate_dead_code()
        graph.recompile()
    return done
