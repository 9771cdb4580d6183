"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationSummary:
    """What a ``calibrate`` call saw: the model itself is calibrated in place.

    Returned instead of the model so that a REPL shows one line, not the model's repr.

    Attributes:
        batches: forward passes run.
        samples: inputs seen (the first dimension of each batch's first tensor input).

    Example:
        >>> CalibrationSummary(batches=4, samples=256)
        CalibrationSummary(batches=4, samples=256)
    """

    batches: int
    samples: int


def _fx_leaf(tracer: torch.fx.Tracer, module: nn.Module, name: str) -> bool:
    """Whether torch.fx calls ``module`` as one opaque leaf.

    A plain ``nn.Module`` container (the hierarchy a ``GraphModule`` copies from its source,
    e.g. the output of ``symbolic_trace`` or of torch's ``fuse``) is never called, only looked
    through, although the tracer's rule (defined in ``torch.nn``) would call it a leaf.
    """
    return type(module) is not nn.Module and tracer.is_leaf_module(module, name)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight layers a backend quantizes, by qualified name, in module order.

    Instances of :data:`WEIGHT_LAYERS`, except those inside a module that torch.fx treats as a
    leaf and does not descend into (``nn.MultiheadAttention``'s ``out_proj``, the Linear layers of
    ``nn.TransformerEncoderLayer``, ...): neither the FX flow nor the plans quantize those.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2))
        >>> list(weight_layers(net))
        ['0']
    """
    tracer = torch.fx.Tracer()
    opaque: list[str] = []
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in opaque):
            continue
        if isinstance(module, WEIGHT_LAYERS):
            found[name] = module
        elif name and _fx_leaf(tracer, module, name) and any(True for _ in module.children()):
            opaque.append(name)
    return found


def opaque_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules (as torch.fx sees them) that hold weight layers or matrix weights no backend quantizes.

    ``nn.MultiheadAttention`` (its ``in_proj_weight`` and ``out_proj``), ``nn.TransformerEncoderLayer``,
    RNNs: FX calls them as one opaque module, so they stay float.
    """
    tracer = torch.fx.Tracer()
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, WEIGHT_LAYERS) or any(name.startswith(p + ".") for p in found):
            continue
        if not _fx_leaf(tracer, module, name):
            continue
        inner = any(isinstance(m, WEIGHT_LAYERS) for m in module.modules())
        matrix = any(p.dim() >= 2 for p in module.parameters(recurse=False))
        if inner or (matrix and isinstance(module, nn.MultiheadAttention | nn.RNNBase | nn.Bilinear)):
            found[name] = module
    return found


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of the :func:`weight_layers` in execution order (FX trace; module order if tracing fails).

    A layer counts where it runs: called as a module, or its weight read by a functional
    conv/linear (``F.linear(x, self.fc.weight)`` runs ``fc``), so the first and last layers are
    the ones the graph computes first and last.
    """
    layers = weight_layers(model)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return list(layers)
    names = []
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in layers:
            names.append(str(node.target))
        elif (target := functional_weight(node)) is not None and (
            (owner := target.rpartition(".")[0]) in layers or _owns_parameter(model, target)
        ):
            names.append(owner)  # a traced copy keeps a layer as a plain Module holding its weight
    return list(dict.fromkeys(names)) or list(layers)


def functional_weight(node: torch.fx.Node) -> str | None:
    """The weight a functional conv/linear node reads (``F.linear(x, self.fc.weight)``: ``"fc.weight"``), else None."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_WEIGHT_OPS or len(node.args) < 2:
        return None
    weight = node.args[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return str(weight.target)
    return None


def _owns_parameter(model: nn.Module, target: str) -> bool:
    owner, _, leaf = target.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return bool(owner) and isinstance(module._parameters.get(leaf), nn.Parameter)


_FUNCTIONAL_WEIGHT_OPS = (
    torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
    torch.nn.functional.conv3d, torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
    torch.nn.functional.conv_transpose3d,
)  # fmt: skip


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and give every module its own ``training`` flag back afterwards.

    Restores per module (not ``model.train(previous)``), so mixed modes survive, also on error.
    A ``torch.export`` / ``prepare_pt2e`` GraphModule, whose ``eval()`` raises, is switched with
    torchao's ``move_exported_model_to_eval`` and gets its own graph back afterwards (torchao
    rewrites dropout/BN patterns in place, and switching back would make an eval-exported model train).

    Raises:
        ModelError: an exported model and a torchao without ``move_exported_model_to_eval``.
    """
    from zq_plugin import _compat  # torch.ao / torchao only where an exported model needs them

    if not _compat.is_exported_module(model):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            yield model
        finally:
            for m, mode in modes:
                m.training = mode
        return
    pt2e = _compat.torchao_pt2e()
    if pt2e.move_exported_model_to_eval is None:
        raise ModelError(
            "an exported (PT2E) model needs torchao's move_exported_model_to_eval to run in eval mode; "
            "upgrade torchao (pip install 'zq-plugin[pt2e]')."
        )
    graph_module = cast(torch.fx.GraphModule, model)
    attr = "_exported_training"  # torchao's flag; absent on a freshly exported model
    had, before = attr in vars(graph_module), getattr(graph_module, attr, None)
    with warnings.catch_warnings():  # torch 2.13's own pytree spec copy warns of its deprecated LeafSpec
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        graph = copy.deepcopy(graph_module.graph)
    pt2e.move_exported_model_to_eval(graph_module)
    try:
        yield model
    finally:
        graph_module.graph = graph
        graph_module.recompile()
        if had:
            setattr(graph_module, attr, before)
        else:
            vars(graph_module).pop(attr, None)


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


def input_placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Where a batch must go for ``model``: its device and floating dtype.

    The device of its first parameter or buffer, and the dtype of its first floating parameter
    (``None``: keep the batch's, e.g. a converted int8 model).
    """
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return device, dtype


def place(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``x`` on ``device``, floating tensors in ``dtype`` (when given); anything else unchanged."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)


def forward_error(exc: Exception, index: int, inputs: Sequence[Any], entry: str) -> Exception:
    """The named error for a model that fails on calibration batch ``index`` (``exc`` as is otherwise).

    A ``TypeError`` from the call (a forward that needs more inputs than the batch gives) and any
    failure on the first batch (data that do not fit the model) become a
    :class:`~zq_plugin.errors.ConfigError` naming the rule and the way out.
    """
    from zq_plugin.errors import ConfigError, ZQError

    if isinstance(exc, ZQError):
        return exc
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
    if isinstance(exc, TypeError):
        return ConfigError(
            f"{entry}: the model cannot be called with the batch's inputs ({shapes}): {exc}. A batch is x or "
            "(x, label, ...) and the model gets x; for a forward with more inputs pass input_fn=lambda batch: "
            "(x, mask, ...) where the entry point takes it, or wrap the model so the image is its only input "
            "(docs/compatibility.md)."
        )
    if isinstance(exc, AssertionError) and "Guard failed" in str(exc):  # a torch.export program's shape guard
        return ConfigError(
            f"{entry}: the exported model does not take inputs of shape {shapes} ({exc}): torch.export "
            "specialized it to the example's shape. Export with a dynamic batch and an example batch of 2 or more "
            "(torch.export fixes a size of 1), e.g. torch.export.export(model, (images[:2],), "
            "dynamic_shapes=({0: torch.export.Dim.AUTO},)), or pass batches of the example's size."
        )
    if index == 0 and isinstance(exc, RuntimeError | ValueError | IndexError):
        return ConfigError(
            f"{entry}: the model fails on the first calibration batch, inputs of shape {shapes} "
            f"({type(exc).__name__}: {exc}). Pass batches of the model's input, e.g. [N, C, H, W] images."
        )
    return exc


def call_model(model: nn.Module, inputs: Sequence[Any], index: int, entry: str) -> Any:
    """``model(*inputs)``, with a failure on calibration batch ``index`` turned into :func:`forward_error`'s."""
    try:
        return model(*inputs)
    except Exception as exc:
        error = forward_error(exc, index, inputs, entry)
        if error is exc:
            raise
        raise error from exc


# -- the ops a built model computes in float (describe()'s float_ops) --------------------------

#: Op kinds that move no values or compute nothing: views and reshapes, shape queries, copies and
#: casts, dropout (identity in eval), asserts and graph bookkeeping. Never reported as float ops.
SHAPE_KINDS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "_unsafe_view", "flatten", "unflatten", "squeeze",
    "unsqueeze", "permute", "transpose", "t", "contiguous", "expand", "expand_as", "slice", "select",
    "narrow", "split", "split_with_sizes", "chunk", "unbind", "size", "dim", "numel", "getitem", "getattr",
    "identity", "clone", "detach", "alias", "lift_fresh_copy", "to", "_to_copy", "type_as", "float", "half",
    "double",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "sym_size", "sym_numel", "sym_stride", "sym_constrain_range_for_size", "_assert",
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async",
})  # fmt: skip

#: Op kinds of weight layers (modules, functional and aten calls): quantized, so never float ops.
WEIGHT_KINDS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "_convolution",
})  # fmt: skip

# short names that a class or function name does not give by the snake-case rule
_KIND_ALIASES = {
    "re_lu": "relu", "re_lu6": "relu6", "re_lu_then_clamp": "relu6", "si_lu": "silu", "p_re_lu": "prelu",
    "rre_lu": "rrelu", "leaky_re_lu": "leaky_relu", "iadd": "add", "imul": "mul", "isub": "sub",
    "truediv": "div", "itruediv": "div", "floordiv": "floor_divide", "max_pool2d_with_indices": "max_pool2d",
    "batch_norm1d": "batch_norm", "batch_norm2d": "batch_norm", "batch_norm3d": "batch_norm",
    "native_batch_norm": "batch_norm", "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "_softmax": "softmax", "_log_softmax": "log_softmax",
    "_adaptive_avg_pool2d": "adaptive_avg_pool2d",
}  # fmt: skip


def op_kind(target: Any) -> str:
    """The short name of what a graph node or module computes.

    ``target`` is a module (its class name in snake case), a function or aten operator (its
    name, without the overload), or a method name; an in-place variant is named as its
    out-of-place op.

    Example:
        >>> import operator
        >>> [op_kind(t) for t in (nn.Hardsigmoid(), nn.AdaptiveAvgPool2d(1), nn.SiLU(), operator.iadd, "mul_")]
        ['hardsigmoid', 'adaptive_avg_pool2d', 'silu', 'add', 'mul']
        >>> op_kind(torch.ops.aten.hardswish.default)
        'hardswish'
    """
    if isinstance(target, nn.Module):  # ReLUThenClamp: re_lu_then_clamp; AdaptiveAvgPool2d: adaptive_avg_pool2d
        name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", type(target).__name__)
        name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    elif isinstance(target, str):
        name = target
    else:
        name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]  # relu_, add_: in place
    return _KIND_ALIASES.get(name, name)


def float_kind(target: Any) -> str | None:
    """:func:`op_kind` of a compute op, ``None`` for a weight layer or an op that computes nothing.

    Example:
        >>> [float_kind(t) for t in (nn.Hardswish(), nn.Conv2d(1, 1, 1), torch.flatten, "view")]
        ['hardswish', None, None, None]
    """
    from zq_plugin import _compat

    if isinstance(target, (*WEIGHT_LAYERS, _compat.FakeQuantizeBase, _compat.ObserverBase)):
        return None  # a quantized layer, or a quantizer
    kind = op_kind(target)
    return None if kind in SHAPE_KINDS or kind in WEIGHT_KINDS else kind


def _module_kinds(module: nn.Module) -> list[str]:
    """The float ops a module called as one graph node computes.

    A weight layer fused by torch.ao computes its activation after it (``ConvReLU2d``:
    ``["relu"]``; folded, it is a ``Sequential(conv, ReLU)``); a weight layer alone, a quantizer
    or a shape op computes none.
    """
    if isinstance(module, WEIGHT_LAYERS):
        fused = type(module).__module__.startswith("torch.ao.nn.intrinsic") and "ReLU" in type(module).__name__
        return ["relu"] if fused else []
    if isinstance(module, nn.Sequential):
        kinds = [float_kind(child) for child in module.children()]
    else:
        kinds = [float_kind(module)]
    return [k for k in kinds if k is not None]


def graph_float_ops(gm: nn.Module, skip: Callable[[Any], bool]) -> dict[str, list[str]]:
    """``kind -> node names`` of the compute ops of a traced model's graph, in graph order.

    Every ``call_function`` / ``call_method`` / ``call_module`` node but those ``skip`` names
    (a backend's quantizers), weight layers and ops that compute nothing (:data:`SHAPE_KINDS`).
    A weight layer called with a fused activation (torch.ao's ``ConvReLU2d``, or the
    ``Sequential(conv, ReLU)`` it folds to) lists that activation under the layer's name: it is
    computed in float on the layer's output.

    Args:
        gm: a ``torch.fx.GraphModule`` (or Brevitas's own graph module: only its nodes'
            ``op``, ``target`` and ``name`` are read).
        skip: nodes to leave out.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 1), nn.SiLU(), nn.Flatten()))
        >>> graph_float_ops(gm, skip=lambda node: False)
        {'silu': ['1']}
    """
    modules = dict(gm.named_modules())
    found: dict[str, list[str]] = {}
    for node in gm.graph.nodes:  # type: ignore[union-attr]
        if node.op not in ("call_function", "call_method", "call_module") or skip(node):
            continue
        if node.op == "call_module":
            module = modules.get(str(node.target))
            kinds = [] if module is None else _module_kinds(module)
            name = str(node.target)
        else:
            kind = float_kind(node.target)
            kinds, name = ([] if kind is None else [kind]), str(node.name)
        for kind in kinds:
            found.setdefault(kind, []).append(name)
    return found


def module_float_ops(model: nn.Module, skip: Callable[[nn.Module], bool]) -> dict[str, list[str]]:
    """``kind -> module names`` of the leaf compute modules of ``model`` (no graph), in module order.

    Leaf modules but those ``skip`` names (and everything inside them), weight layers and modules
    that compute nothing; functional calls in ``forward`` are not seen.

    Example:
        >>> module_float_ops(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Dropout()), skip=lambda m: False)
        {'relu': ['1']}
    """
    found: dict[str, list[str]] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if skip(module):
            skipped.append(name)
            continue
        if not name or any(True for _ in module.children()):
            continue
        kind = float_kind(module)
        if kind is not None:
            found.setdefault(kind, []).append(name)
    return found
