"""Graph passes on a model before or after ``prepare_qat_fx`` / ``prepare_fx``: same function, better grids.

ReLU6 as ReLU then clamp (so torch.ao fuses it), a clip before the observer it shares with
its clipped copy, observers that keep the negative lobe of Hardswish/SiLU/GELU/Mish, and
spatial means as pooling (for torch's int8 kernels).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from zq_plugin import _compat
from zq_plugin._utils import call_model


class ReLUThenClamp(nn.Module):
    """ReLU6 written as ``clamp(relu(x), max=6)``: the same function, which torch.ao fuses with a Conv(+BN).

    Example:
        >>> ReLUThenClamp()(torch.tensor([-1.0, 3.0, 9.0])).tolist()
        [0.0, 3.0, 6.0]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of any shape, clipped to ``[0, 6]``."""
        return torch.clamp(F.relu(x), max=6.0)


def _is_relu6_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Hardtanh) and (float(module.min_val), float(module.max_val)) == (0.0, 6.0)


def _is_relu6_call(node: torch.fx.Node) -> bool:
    """``F.relu6(x)`` and ``F.hardtanh(x, 0, 6)`` calls."""
    if node.op != "call_function":
        return False
    if node.target is F.relu6:
        return True
    bounds = (*node.args[1:3], *(node.kwargs[k] for k in ("min_val", "max_val") if k in node.kwargs))
    return node.target is F.hardtanh and bounds == (0.0, 6.0)


def relu6_as_relu_then_clamp(model: nn.Module) -> nn.Module:
    """``model`` with each ReLU6 written as ``relu`` then ``clamp(max=6)`` (the same function); **in place**.

    torch.ao fuses Conv(+BN)+**ReLU** and observes the activation after it, but not ReLU6:
    after a Conv+BN+ReLU6 it observes the convolution's **signed** output and the ReLU6 shares
    that grid, so half of a low-bit activation grid is spent on values the ReLU6 zeroes (zero
    point near the middle). Written as ``relu`` + ``clamp``, the convolution fuses with the
    ReLU, the observer sees only non-negative values (zero point 0), and the clamp shares its
    grid. ``nn.ReLU6`` / ``nn.Hardtanh(0, 6)`` modules become :class:`ReLUThenClamp` modules at
    the same names (their qconfig scope is kept); functional ``F.relu6`` / ``F.hardtanh(x, 0, 6)``
    calls need a traced copy, returned instead of ``model`` only when there are any. Call it on
    a copy you own (``quantize_fx`` does).
    """
    for name, module in list(model.named_modules()):
        if _is_relu6_module(module) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, ReLUThenClamp())
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable: quantize_fx names the reason itself
        return model
    found = [node for node in graph_module.graph.nodes if _is_relu6_call(node)]
    if not found:
        return model
    for node in found:
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph_module.graph.inserting_before(node):
            relu = graph_module.graph.call_function(F.relu, (x,))
            clamped = graph_module.graph.call_function(torch.clamp, (relu,), {"max": 6.0})
        node.replace_all_uses_with(clamped)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


_CLIP_FUNCTIONS: dict[Any, str] = {
    torch.clamp: "clamp",
    torch.clamp_: "clamp",
    F.hardtanh: "hardtanh",
    F.relu: "relu",
    torch.relu: "relu",
}
_CLIP_METHODS = {"clamp": "clamp", "clamp_": "clamp", "relu": "relu", "relu_": "relu"}


def _argument(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _clip_bounds(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[float | None, float | None] | None:
    """``(min, max)`` of a clip (clamp, hardtanh, ReLU in any spelling) with constant bounds; ``None`` otherwise."""
    kind: str | None = None
    if node.op == "call_function":
        kind = _CLIP_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        kind = _CLIP_METHODS.get(str(node.target))
    elif node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.ReLU):
            return 0.0, None
        if isinstance(module, nn.Hardtanh):
            return float(module.min_val), float(module.max_val)
    if kind == "relu":
        return 0.0, None
    if kind == "hardtanh":
        bounds: tuple[Any, Any] = (_argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0))
    elif kind == "clamp":
        bounds = (_argument(node, 1, "min"), _argument(node, 2, "max"))
    else:
        return None
    if not all(b is None or isinstance(b, int | float) for b in bounds):
        return None  # tensor bounds: not a fixed clip
    return tuple(None if b is None else float(b) for b in bounds)  # type: ignore[return-value]


def clip_before_shared_observer(prepared: torch.fx.GraphModule) -> list[str]:
    """Clip a tensor before the observer it shares with its clipped copy; return those observers' names.

    torch.ao gives a clip (``clamp``, ``hardtanh``, ``relu``) the **same** FakeQuantize instance
    as its input, and calls it twice: on ``x`` and on ``clip(x)``. The observer therefore
    records the unclipped range. After a Conv+BN+ReLU6 written as ReLU then
    ``clamp(max=6)`` (:func:`relu6_as_relu_then_clamp`), it sees maxima of about 13 where the
    tensor that layers read never exceeds 6: at 4 bits a step of 0.86 instead of 0.40, and
    mobilenetv2_s's FX W4A4 MinMax top-1 fell to 38.94 where PT2E, which observes the clamp's
    output alone, reaches 70.38 (``benchmarks/pt2e_parity.py``). Each pattern
    ``fq(x) -> clip -> fq`` (one instance) becomes ``fq(clip(x)) -> clip -> fq``: the function is
    unchanged up to rounding (the clip is idempotent and the grid now covers only its range),
    and the observer sees only the clipped tensor. Changes ``prepared`` in place, before
    calibration.
    """
    modules = dict(prepared.named_modules())
    graph = prepared.graph
    fixed = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or len(node.users) != 1:
            continue
        fq = prepared.get_submodule(str(node.target))  # named_modules() drops repeated instances
        if not isinstance(fq, _compat.FakeQuantizeBase):
            continue
        (clip,) = node.users
        bounds = _clip_bounds(clip, modules)
        after = [u for u in clip.users if u.op == "call_module"]
        if bounds is None or len(clip.users) != 1 or len(after) != 1:
            continue
        if prepared.get_submodule(str(after[0].target)) is not fq:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and _clip_bounds(source, modules) == bounds:
            continue  # already clipped before the observer
        with graph.inserting_before(node):
            clipped = graph.call_function(torch.clamp, (source,), {"min": bounds[0], "max": bounds[1]})
        node.replace_input_with(source, clipped)
        fixed.append(str(node.target))
    if fixed:
        graph.lint()
        prepared.recompile()
    return fixed


#: Activations whose outputs have a small negative lobe the network uses (minimum about -0.375
#: Hardswish, -0.278 SiLU, -0.170 GELU, -0.309 Mish): their output observers keep the minimum.
NEGATIVE_LOBE_MODULES: tuple[type[nn.Module], ...] = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Mish)
_NEGATIVE_LOBE_NAMES = frozenset({"hardswish", "silu", "gelu", "mish"})


def _is_negative_lobe(node: Any, modules: dict[str, nn.Module]) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), NEGATIVE_LOBE_MODULES)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return str(name).rstrip("_") in _NEGATIVE_LOBE_NAMES
    return False


def keep_negative_lobes(prepared: torch.fx.GraphModule) -> list[str]:
    """Make the observers of Hardswish/SiLU/GELU/Mish outputs keep their minimum; return those observers' names.

    A range search that shrinks both ends of ``[min, max]`` together (our MSE, Lp, percentile
    observers) cuts a long-tailed Hardswish output (min -0.375, max 6 to 13) to about
    ``[-0.1, 4]`` at 4 bits: the zero point becomes 0 and the whole negative lobe rounds to zero.
    The network uses that lobe: zeroing it in a float MobileNetV3-style net drops top-1 from
    89.61 to 10.02; with it kept, W8A4 with the MSE observers rises from 56.38 to 70.69
    (``benchmarks/negative_lobe.py``, docs/reconstruction.md). With
    :attr:`keep_min <zq_plugin.observers._core.RangeObserverMixin.keep_min>` only the high end is
    searched. Observers without the attribute (torch's MinMax keeps the minimum anyway) are left
    alone. Changes ``prepared`` in place, before calibration.
    """
    modules = dict(prepared.named_modules())
    kept = []
    for node in prepared.graph.nodes:
        fq = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(fq, _compat.FakeQuantizeBase) or not node.args:
            continue
        observer = getattr(fq, "activation_post_process", None)
        if _is_negative_lobe(node.args[0], modules) and hasattr(type(observer), "keep_min"):
            observer.keep_min = True  # type: ignore[union-attr]
            kept.append(str(node.target))
    return kept


def _is_spatial_mean(node: torch.fx.Node) -> bool:
    """``x.mean((2, 3))`` / ``torch.mean(x, [2, 3])`` (any spelling of the last two dims) of a 4-d tensor, no dtype."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return False
    x = node.args[0]
    meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4 or "dtype" in node.kwargs:
        return False
    return isinstance(dims, list | tuple) and sorted(int(d) % 4 for d in dims) == [2, 3]


def _spatial_means_as_pooling(model: nn.Module, example: tuple[Any, ...]) -> nn.Module:
    """``model`` traced, with each spatial mean of a 4-d map replaced by ``adaptive_avg_pool2d(x, 1)``.

    Returns ``model`` itself when it has no such mean. Shapes come from one run on ``example``.
    """
    graph_module = torch.fx.symbolic_trace(model)
    maybe = [n for n in graph_module.graph.nodes if n.target == "mean" or n.target is torch.mean]
    if not maybe:
        return model
    with torch.no_grad():
        # one plain run on the example first: inputs that do not fit get a named error, not the
        # traceback ShapeProp prints before raising its own RuntimeError
        call_model(model, example, 0, "convert_int8_fx")
        ShapeProp(graph_module).propagate(*example)
    means = [node for node in maybe if _is_spatial_mean(node)]
    if not means:
        return model
    for node in means:
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        with graph_module.graph.inserting_before(node):
            pooled = graph_module.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
            new = pooled if keepdim else graph_module.graph.call_function(torch.flatten, (pooled, 1))
        node.replace_all_uses_with(new)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
