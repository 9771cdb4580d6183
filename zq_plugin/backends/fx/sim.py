"""The clamping FX simulation in the plan's meaning, and the one seam through which it is read.

**One meaning.** A :class:`~zq_plugin.mixed_precision.BitPlan` says, per weight layer
(Conv/Linear/ConvTranspose): its weight at ``w_bits`` and its **input** at ``a_bits``. PT2E
annotates exactly that (a layer's input edge and weight), Brevitas builds exactly that (a quant
layer's ``input_quant`` and ``weight_quant``). FX attaches activation observers to op
*outputs* instead (integration-notes §1.3), so a ``prepare_qat_fx`` model quantizes other
tensors too: the residual stream between blocks, the logits, gates. :func:`layer_input_quantizers`
rewrites a prepared model into the plan's meaning: every activation FakeQuantize that torch.ao
inserted is removed, and one FakeQuantize at the layer's ``a_bits`` is put directly in front of
each weight layer (one module per tensor and bit width, so two layers that read one tensor at
the same bits share it, as one observer would). Nothing else is quantized: joins (``add``,
``cat``), pooling, gates and the logits stay float on every backend, and their result is
quantized where a layer reads it.

**One seam.** :func:`read_sim` returns, per weight layer, what any backend needs to carry the
simulation: the float weight and bias it quantizes (BatchNorm folded), the weight's integer grid
and steps, and the input's grid and step (:class:`SimLayer`). Carriers and reports read a
simulation only through it; nothing else outside the FX modules touches FX internals.

Example:
    >>> import torch
    >>> from zq_plugin.plan import BitPlan
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(144, 3)).eval()
    >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=3, first_last_bits=None)
    >>> sim = simulate(net, torch.randn(16, 1, 8, 8), plan)
    >>> {name: (layer.weight_grid.bits, layer.input_grid.bits) for name, layer in read_sim(sim).items()}
    {'0': (4, 3), '3': (4, 3)}
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import _FUNCTIONAL_WEIGHT_OPS, graph_float_ops
from zq_plugin.backends.fx.passes import _is_negative_lobe, relu6_as_relu_then_clamp
from zq_plugin.backends.fx.qconfig import qconfig
from zq_plugin.backends.fx.quantize import FakeQuantConvTranspose, _swap_conv_transpose, fold_weights, freeze
from zq_plugin.calibration import _example_inputs, _to_model, calibrate
from zq_plugin.errors import ConfigError
from zq_plugin.plan import BitPlan, LayerBits

#: Functional calls that compute a weight layer (their weight is argument 1).
FUNCTIONAL_WEIGHT_OPS = frozenset(_FUNCTIONAL_WEIGHT_OPS)
#: Modules and calls through which a tensor keeps its quantization grid (``q(op(x)) == op(q(x))``
#: or a pure reshape): a step found behind them belongs to the layer reading their output.
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip
PASS_THROUGH_CALLS = frozenset(
    {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.max_pool1d, F.max_pool2d, F.max_pool3d,
     F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout}
)  # fmt: skip
PASS_THROUGH_METHODS = frozenset({"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"})

INPUT_SUFFIX = "_input_quant"  # the module name of a layer's input FakeQuantize: <layer with _ for .>_input_quant


@dataclass(frozen=True)
class Grid:
    """An integer grid and its steps: ``x ≈ (clamp(round(x / s) + zp, quant_min, quant_max) - zp) * s``.

    Attributes:
        scale: the step, ``[C]`` per channel along ``axis`` or ``[1]`` per tensor (float32).
        zero_point: the integer offset, same shape as ``scale`` (int64; 0 for symmetric weights).
        quant_min: the lowest integer.
        quant_max: the highest integer.
        axis: the channel axis of a per-channel grid; ``None`` per tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None

    @property
    def bits(self) -> int:
        """The bit width of the integer range (a narrow signed range ``[-7, 7]`` is 4 bits)."""
        return max(1, math.ceil(math.log2(self.quant_max - self.quant_min + 1)))

    @property
    def signed(self) -> bool:
        """Whether the integers are signed (``quant_min < 0``)."""
        return self.quant_min < 0

    @property
    def granularity(self) -> str:
        """``"per_channel"`` or ``"per_tensor"``."""
        return "per_tensor" if self.axis is None else "per_channel"


@dataclass(frozen=True)
class SimLayer:
    """What a simulation quantizes in one weight layer: the seam every carrier and report reads.

    Attributes:
        name: the layer's qualified name in the model (a ConvTranspose's, not its wrapper's).
        weight: the float weight the layer quantizes, BatchNorm folded (``[C_out, C_in/g, k...]``;
            ``[C_in, C_out/g, k...]`` for a ConvTranspose).
        bias: the float bias (BatchNorm folded), or ``None``.
        weight_grid: the weight's grid; ``None`` where the weight stays float or is non-uniform.
        input_grid: the input's grid; ``None`` where the layer reads a float input.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_grid: Grid | None
    input_grid: Grid | None

    def weight_integers(self) -> torch.Tensor:
        """The weight's integers on :attr:`weight_grid` (same shape as :attr:`weight`).

        Raises:
            ConfigError: the weight is not quantized on a uniform grid.
        """
        grid = self.weight_grid
        if grid is None:
            raise ConfigError(f"layer {self.name!r} has no uniform weight grid in the simulation.")
        shape = [1] * self.weight.dim()
        if grid.axis is not None:
            shape[grid.axis] = -1
        scale, zp = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
        q = torch.round(self.weight.detach() / scale) + zp
        return q.clamp(grid.quant_min, grid.quant_max).to(torch.int64)


def grid_of(fake_quant: Any) -> Grid | None:
    """The :class:`Grid` of an enabled uniform torch.ao FakeQuantize (its calibrated parameters); else ``None``."""
    if not isinstance(fake_quant, _compat.FakeQuantize) or not int(fake_quant.fake_quant_enabled[0]):
        return None
    sync = getattr(fake_quant, "sync_qparams", None)
    if sync is not None:
        sync()
    axis = int(fake_quant.ch_axis) if fake_quant.is_per_channel else None
    return Grid(
        scale=fake_quant.scale.detach().float().reshape(-1).clone(),
        zero_point=fake_quant.zero_point.detach().to(torch.int64).reshape(-1).clone(),
        quant_min=int(fake_quant.quant_min),
        quant_max=int(fake_quant.quant_max),
        axis=axis,
    )


def _weight_node_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The model layer a weight node computes: a module call's target, a functional call's weight owner."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "weight_fake_quant", None) is None:
            return None
        return str(node.target)
    if node.op == "call_function" and node.target in FUNCTIONAL_WEIGHT_OPS and len(node.args) > 1:
        source = node.args[1]
        while isinstance(source, torch.fx.Node) and source.op == "call_module":  # the weight's FakeQuantize
            source = source.args[0] if source.args else None
        if isinstance(source, torch.fx.Node) and source.op == "get_attr":
            return str(source.target).rpartition(".")[0] or str(source.target)
        return node.name
    return None


def weight_nodes(gm: torch.fx.GraphModule) -> list[tuple[str, torch.fx.Node]]:
    """``(layer name, node)`` of every weight layer call of a prepared model, in graph order."""
    found = []
    for node in gm.graph.nodes:
        name = _weight_node_name(node, gm)
        if name is not None:
            found.append((name, node))
    return found


def _reads_weight(node: torch.fx.Node) -> bool:
    """Whether a FakeQuantize node quantizes a parameter (its input comes from a ``get_attr``)."""
    arg = node.args[0] if node.args else None
    while isinstance(arg, torch.fx.Node) and arg.op in ("call_method", "call_function") and arg.args:
        arg = arg.args[0]  # e.g. a weight transposed or reshaped before use
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def _is_fake_quant_node(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), _compat.FakeQuantizeBase)
    except AttributeError:
        return False


def is_pass_through(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` keeps its first input's quantization grid (max-pool, flatten, reshape, dropout)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), PASS_THROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASS_THROUGH_CALLS
    if node.op == "call_method":
        return str(node.target) in PASS_THROUGH_METHODS
    return False


def _producer(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The node that computes the values ``node`` carries, walking back through pass-through ops."""
    for _ in range(1000):
        if not isinstance(node, torch.fx.Node) or not is_pass_through(node, modules) or not node.args:
            return node
        node = node.args[0]
    return node


BitsOf = Callable[[str, int], LayerBits]


def layer_input_quantizers(
    prepared: torch.fx.GraphModule, bits_of: BitsOf, *, act_observer: Any = None
) -> dict[str, str]:
    """Put the plan's meaning into a ``prepare_qat_fx`` model: only weight layers' inputs quantized; in place.

    Removes every activation FakeQuantize that torch.ao inserted (those of weights stay), then
    inserts a FakeQuantize at ``bits_of(layer, index).a_bits`` in front of each weight layer
    (``index``: its position in graph order). Layers that read the same tensor at the same bits
    share one FakeQuantize. An input FakeQuantize fed by Hardswish/SiLU/GELU/Mish (through
    pass-through ops) keeps its minimum (:func:`zq_plugin.backends.fx.keep_negative_lobes` says why).
    Call it before calibration.

    Returns:
        ``layer -> name of its input FakeQuantize module``.
    """
    graph = prepared.graph
    removed: set[str] = set()
    for node in list(graph.nodes):
        if _is_fake_quant_node(node, prepared) and not _reads_weight(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed.add(str(node.target))
    for target in removed:
        if "." not in target and hasattr(prepared, target):
            delattr(prepared, target)
    modules = dict(prepared.named_modules())
    made: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}
    owners: dict[str, str] = {}
    for index, (name, node) in enumerate(weight_nodes(prepared)):
        arg = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(arg, torch.fx.Node):
            continue
        a_bits = bits_of(name, index).a_bits
        fq_node = made.get((arg, a_bits))
        if fq_node is None:
            module_name = name.replace(".", "_") + INPUT_SUFFIX
            fq = qconfig(8, a_bits, act_observer=act_observer, fake_quant=True).activation()
            observer = getattr(fq, "activation_post_process", None)
            if _is_negative_lobe(_producer(arg, modules), modules) and hasattr(type(observer), "keep_min"):
                observer.keep_min = True  # type: ignore[union-attr]
            device = next((t.device for t in (*prepared.parameters(), *prepared.buffers())), None)
            prepared.add_submodule(module_name, fq.to(device) if device is not None else fq)
            with graph.inserting_before(node):
                fq_node = graph.call_module(module_name, (arg,))
            made[arg, a_bits] = fq_node
        node.replace_input_with(arg, fq_node)
        owners[name] = str(fq_node.target)
    graph.lint()
    prepared.recompile()
    return owners


def _set_weight_bits(prepared: torch.fx.GraphModule, bits_of: BitsOf, weight_observer: Any) -> None:
    """Give functional weight calls (no module for a plan to name) the weight bits of ``bits_of``."""
    for index, (name, node) in enumerate(weight_nodes(prepared)):
        if node.op != "call_function":
            continue
        fq_node = node.args[1]
        if not isinstance(fq_node, torch.fx.Node) or not _is_fake_quant_node(fq_node, prepared):
            continue
        old = prepared.get_submodule(str(fq_node.target))
        w_bits = bits_of(name, index).w_bits
        if not isinstance(old, _compat.FakeQuantize) or int(old.quant_max) == 2 ** (w_bits - 1) - 1:
            continue
        per_channel = bool(old.is_per_channel)
        new = qconfig(w_bits, 8, weight_observer=weight_observer if per_channel else None, fake_quant=True).weight()
        if not per_channel:
            new = qconfig(
                w_bits, 8, granularity="per_tensor", tensor_weight_observer=type(old.activation_post_process)
            ).weight()
        device = next((t.device for t in old.buffers()), None)
        prepared.add_submodule(str(fq_node.target), new.to(device) if device is not None else new)


def input_fake_quant(node: torch.fx.Node, sim: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> Any:
    """The FakeQuantize in front of a weight layer's call, directly or behind pass-through ops; else ``None``."""
    arg = node.args[0] if node.args else node.kwargs.get("input")
    for _ in range(1000):
        if not isinstance(arg, torch.fx.Node):
            return None
        if _is_fake_quant_node(arg, sim):
            return sim.get_submodule(str(arg.target))
        if not is_pass_through(arg, modules) or not arg.args:
            return None
        arg = arg.args[0]
    return None


def bits_lookup(plan: BitPlan | None, *, default: LayerBits, first_last_bits: int | None, count: int) -> BitsOf:
    """``(layer, index) -> LayerBits``: the plan's bits, else ``first_last_bits`` at the ends, else ``default``.

    ``count`` is the number of weight layer calls (the last has index ``count - 1``).
    """
    layers = plan.layers if plan is not None else {}

    def bits_of(name: str, index: int) -> LayerBits:
        if name in layers:
            return layers[name]
        if first_last_bits is not None and index in (0, count - 1):
            return LayerBits(w_bits=first_last_bits, a_bits=first_last_bits)
        return default

    return bits_of


def simulate(
    model: nn.Module,
    data: Any,
    plan: BitPlan | None,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    default: LayerBits | None = None,
    first_last_bits: int | None = None,
    batch_size: int = 64,
    fold: bool = False,
    input_fn: Any = None,
) -> torch.fx.GraphModule:
    """The clamping FX simulation of ``model`` in the plan's meaning, calibrated on ``data``.

    ``prepare_qat_fx`` on an eval-mode copy with each planned layer's weight qconfig,
    :func:`layer_input_quantizers`, calibration with the observers (fake quantization off), then
    observers off and fake quantization on. Weight calls that no plan can name (functional
    ``F.conv2d``/``F.linear``) get ``default`` (8/8), or ``first_last_bits`` when they are the first
    or last weight call. The model is not changed.

    Args:
        model: float model (BatchNorm folded or not: torch.ao folds it in the QAT modules).
        data: calibration data (any source).
        plan: per-layer weight and input bits (``None``: every layer gets ``default``).
        act_observer: torch.ao activation observer class (default ``MinMaxObserver``).
        weight_observer: torch.ao per-channel weight observer class (default ``PerChannelMinMaxObserver``).
        default: the bits of weight calls the plan does not name.
        first_last_bits: the bits of the first and last weight call the plan does not name.
        batch_size: calibration batch size for tensor data.
        fold: replace QAT modules by float ones holding the fake-quantized folded weights.
        input_fn: maps a batch to the model's positional inputs.

    Returns:
        The simulation (a ``GraphModule`` in eval mode) whose outputs honour quant_min/quant_max.

    Raises:
        ConfigError: bad bits, no calibration data.
        ModelError: the model does not trace.
    """
    default = default or LayerBits(w_bits=8, a_bits=8)
    example = _to_model(_example_inputs(data, batch_size, input_fn), model)
    mapping = _compat.QConfigMapping().set_global(
        qconfig(default.w_bits, 8, weight_observer=weight_observer, act_observer=act_observer)
    )
    if plan is not None:
        for name, b in plan.layers.items():
            mapping.set_module_name(
                name,
                qconfig(
                    b.w_bits, 8, weight_observer=weight_observer, act_observer=act_observer,
                    granularity=b.granularity, grid=b.grid,
                ),
            )  # fmt: skip
    float_model = relu6_as_relu_then_clamp(copy.deepcopy(model).eval())
    prepared = _compat.prepare_qat_fx(float_model, mapping, example).eval()
    _swap_conv_transpose(prepared)
    count = len(weight_nodes(prepared))
    bits_of = bits_lookup(plan, default=default, first_last_bits=first_last_bits, count=count)
    _set_weight_bits(prepared, bits_of, weight_observer)
    layer_input_quantizers(prepared, bits_of, act_observer=act_observer)
    prepared.apply(_compat.enable_observer)
    prepared.apply(_compat.disable_fake_quant)
    calibrate(prepared, data, batch_size=batch_size, input_fn=input_fn)
    freeze(prepared)
    return fold_weights(prepared) if fold else prepared


def _folded(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight and bias a QAT layer quantizes, its BatchNorm (if any) folded in."""
    weight = cast(torch.Tensor, module.weight).detach()
    raw_bias = getattr(module, "bias", None)
    bias = raw_bias.detach() if isinstance(raw_bias, torch.Tensor) else None
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
        factor = (bn.weight / torch.sqrt(var + bn.eps)).detach()
        weight = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
        bias = ((bias if bias is not None else torch.zeros_like(factor)) - mean) * factor + bn.bias.detach()
    return weight, bias


def read_sim(sim: torch.fx.GraphModule) -> dict[str, SimLayer]:
    """``layer -> SimLayer`` for every weight layer of a simulation, in graph order: the one seam.

    ``sim`` is a :func:`simulate`, :func:`zq_plugin.quantize_fx`, :func:`zq_plugin.reconstruct_fx`
    or :func:`zq_plugin.finetune` result kept unfolded (``fold=False``: its layers hold their weight
    FakeQuantize). The input grid is the FakeQuantize directly in front of the layer, or one
    behind pass-through ops (max-pool, flatten) in a simulation built by torch.ao's own placement.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
        >>> sim = simulate(net, torch.randn(8, 4), BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None))
        >>> layer = read_sim(sim)["0"]
        >>> layer.weight_grid.quant_max, layer.input_grid.quant_max, layer.weight_integers().abs().max().item()
        (7, 15, 7)
    """
    modules = dict(sim.named_modules())
    found: dict[str, SimLayer] = {}
    for name, node in weight_nodes(sim):
        if name in found:
            continue
        if node.op == "call_module":
            module = sim.get_submodule(str(node.target))
            layer = cast(nn.Module, getattr(module, "conv", module))
            weight, bias = _folded(module) if not hasattr(module, "conv") else _folded(layer)
            weight_fq = getattr(module, "weight_fake_quant", None)
        else:
            weight_node = node.args[1]
            weight_fq = sim.get_submodule(str(weight_node.target))  # type: ignore[union-attr]
            source = weight_node.args[0]  # type: ignore[union-attr]
            weight = sim.get_parameter(str(source.target)).detach()  # type: ignore[union-attr]
            raw = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias = sim.get_parameter(str(raw.target)).detach() if isinstance(raw, torch.fx.Node) else None
        input_fq = input_fake_quant(node, sim, modules)
        found[name] = SimLayer(
            name=name, weight=weight, bias=bias, weight_grid=grid_of(weight_fq), input_grid=grid_of(input_fq)
        )
    return found


def weight_bits_of(fake_quant: Any) -> tuple[int | None, str | None]:
    """``(bits, granularity)`` of an enabled weight quantizer (uniform or non-uniform); ``(None, None)`` if off."""
    if fake_quant is None or not int(getattr(fake_quant, "fake_quant_enabled", torch.ones(1))[0]):
        return None, None
    bits = getattr(fake_quant, "bits", None)  # the non-uniform grid says its bits
    if bits is None:
        bits = Grid(
            fake_quant.scale, fake_quant.zero_point, int(fake_quant.quant_min), int(fake_quant.quant_max), 0
        ).bits
    per_channel = bool(getattr(fake_quant, "is_per_channel", getattr(fake_quant, "per_channel", False)))
    return int(bits), "per_channel" if per_channel else "per_tensor"


def describe_sim(sim: torch.fx.GraphModule) -> dict[str, tuple[int | None, int | None, str | None]]:
    """``layer -> (w_bits, a_bits, granularity)`` of a simulation as built (folded or not), in graph order.

    Read from its quantizers: each weight FakeQuantize's integer range (a folded layer keeps it
    as ``zq_weight_bits``) and the FakeQuantize in front of the layer (or behind pass-through ops).
    """
    modules = dict(sim.named_modules())
    rows: dict[str, tuple[int | None, int | None, str | None]] = {}
    for node in sim.graph.nodes:
        name = _weight_node_name(node, sim)
        if name is not None and node.op == "call_module":
            w_bits, granularity = weight_bits_of(
                getattr(sim.get_submodule(str(node.target)), "weight_fake_quant", None)
            )
        elif name is not None:
            w_bits, granularity = weight_bits_of(sim.get_submodule(str(cast(torch.fx.Node, node.args[1]).target)))
        elif node.op == "call_module" and hasattr(modules.get(str(node.target)), "zq_weight_bits"):
            module = modules[str(node.target)]
            name = str(node.target)
            w_bits, granularity = module.zq_weight_bits, module.zq_weight_granularity
        else:
            continue
        grid = grid_of(input_fake_quant(node, sim, modules))
        a_bits = None if grid is None else grid.bits
        rows.setdefault(name, (w_bits, a_bits, granularity))
    return rows


def float_ops_sim(sim: torch.fx.GraphModule) -> dict[str, list[str]]:
    """``kind -> node names`` of the ops a simulation computes in float (folded or not), in graph order.

    Every compute node but the FakeQuantize modules, the weight layers whose weights and inputs
    they quantize, and the ops that move no values (``_utils.SHAPE_KINDS``): activations, gates,
    products, sums, pooling, all computed in float on dequantized values. A Conv+ReLU torch.ao
    fused lists its ReLU under the layer's name.

    Example:
        >>> import zq_plugin
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> float_ops_sim(zq_plugin.quantize_fx(net.eval(), torch.randn(8, 1, 6, 6)))
        {'hardswish': ['1'], 'adaptive_avg_pool2d': ['2']}
    """
    modules = dict(sim.named_modules())

    def skip(node: torch.fx.Node) -> bool:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        return _is_fake_quant_node(node, sim) or isinstance(module, FakeQuantConvTranspose)

    return graph_float_ops(sim, skip)
