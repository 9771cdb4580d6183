"""torch.ao.quantization FX backend: QConfigs for W/A bits, a calibrator, and a faithful low-bit simulation.

Two ways in:

1. **Your own flow, our data.** Prepare the model yourself (``prepare_fx`` or
   ``prepare_qat_fx``) and call :func:`calibrate` with any loader; it runs the model in
   eval/no-grad mode and restores its mode.
2. **One call.** :func:`quantize_fx` builds the mapping for uniform W/A bits, prepares with
   ``prepare_qat_fx`` (eval mode: BN folded with running statistics, weights fake-quantized),
   calibrates and returns a model whose fake quantization **clamps to quant_min/quant_max**.
   ``convert_fx`` does not clamp (integration-notes §1.2) and must not be used to measure
   accuracy below 8 bits; :func:`convert_int8_fx` gives the real int8 model at 8 bits.

Conventions of the uniform mapping: weights per-channel symmetric on a *narrow* range
(``[-(2^(b-1)-1), 2^(b-1)-1]``, a grid symmetric around 0); activations per-tensor affine
``[0, 2^b - 1]``. Affine activations represent the signed image input exactly (the zero
point shifts the grid, so negative pixels are not clipped). The first and last Conv/Linear
(in execution order) keep ``first_last_bits`` for their weights and their outputs; FX
attaches activation bits to a layer's *output* (integration-notes §1.3), so the first layer's
setting also quantizes the image, and the last layer's input keeps the bits of its producer.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> sim = quantize_fx(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
    >>> sim(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from zq_plugin import _compat
from zq_plugin._utils import WEIGHT_LAYERS as WEIGHT_LAYERS  # re-exported: part of this module's API
from zq_plugin._utils import (
    call_model,
    model_device_dtype,
    opaque_weight_modules,
    report_float_layers,
    weight_layers,
)
from zq_plugin._utils import weight_layer_names as weight_layer_names
from zq_plugin.calibration import InputFn as InputFn
from zq_plugin.calibration import _example_inputs as _example_inputs
from zq_plugin.calibration import _raw_batches as _raw_batches
from zq_plugin.calibration import _to_model as _to_model
from zq_plugin.calibration import _user_line as _user_line
from zq_plugin.calibration import batch_inputs as batch_inputs
from zq_plugin.calibration import calibrate as calibrate
from zq_plugin.calibration import check_traceable as check_traceable
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.fake_quant import FastFakeQuantize
from zq_plugin.qparams import check_bits, quant_range

if TYPE_CHECKING:
    from zq_plugin.plan import BitPlan

logger = logging.getLogger(__name__)


def qconfig(
    w_bits: int,
    a_bits: int,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    fake_quant: bool = True,
    granularity: str = "per_channel",
    grid: str = "uniform",
    tensor_weight_observer: Any = None,
) -> Any:
    """A ``QConfig`` for ``w_bits``-bit weights and ``a_bits``-bit activations.

    Weights: symmetric, narrow signed range, ``qint8`` container; per output channel
    (``ch_axis=0``) or per tensor; on a uniform grid or on the clustered non-uniform grid of
    :class:`zq_plugin.mixed_precision.nonuniform.NonUniformFakeQuantize` (fake quantization only).
    Activations: per-tensor affine ``[0, 2^a_bits - 1]``, ``quint8`` container.

    Args:
        w_bits: weight bits, 2 to 8.
        a_bits: activation bits, 2 to 8.
        act_observer: observer class for activations (default torch's ``MinMaxObserver``).
        weight_observer: per-channel observer class for weights (default ``PerChannelMinMaxObserver``).
        fake_quant: wrap both in :class:`FastFakeQuantize` (for ``prepare_qat_fx``) instead of bare observers.
        granularity: ``"per_channel"`` or ``"per_tensor"`` weights.
        grid: ``"uniform"`` or ``"nonuniform"`` weights.
        tensor_weight_observer: per-tensor observer class for weights (default ``MinMaxObserver``).
    """
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if granularity not in ("per_channel", "per_tensor") or grid not in ("uniform", "nonuniform"):
        raise ConfigError(
            f"granularity={granularity!r}, grid={grid!r}: use 'per_channel'/'per_tensor' and 'uniform'/'nonuniform'."
        )
    per_channel = granularity == "per_channel"
    act_observer = act_observer or _compat.MinMaxObserver
    if per_channel:
        weight_observer = weight_observer or _compat.PerChannelMinMaxObserver
    else:
        weight_observer = tensor_weight_observer or _compat.MinMaxObserver
    a_min, a_max = quant_range(a_bits, signed=False)
    w_min, w_max = quant_range(w_bits, signed=True, narrow=True)
    act_kw = {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "quant_min": a_min, "quant_max": a_max}
    w_kw: dict[str, Any] = {"dtype": torch.qint8, "quant_min": w_min, "quant_max": w_max}
    w_kw.update(
        {"qscheme": torch.per_channel_symmetric, "ch_axis": 0}
        if per_channel
        else {"qscheme": torch.per_tensor_symmetric}
    )
    if grid == "nonuniform":
        if not fake_quant:
            raise ConfigError(
                "a non-uniform weight grid exists only as fake quantization: use fake_quant=True and prepare_qat_fx."
            )
        from zq_plugin.nonuniform import NonUniformFakeQuantize

        weight = NonUniformFakeQuantize.with_args(bits=w_bits, per_channel=per_channel)
        return _compat.QConfig(activation=FastFakeQuantize.with_args(observer=act_observer, **act_kw), weight=weight)
    if fake_quant:
        return _compat.QConfig(
            activation=FastFakeQuantize.with_args(observer=act_observer, **act_kw),
            weight=FastFakeQuantize.with_args(observer=weight_observer, **w_kw),
        )
    return _compat.QConfig(activation=act_observer.with_args(**act_kw), weight=weight_observer.with_args(**w_kw))


def uniform_qconfig_mapping(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    *,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    fake_quant: bool = True,
) -> Any:
    """A ``QConfigMapping``: global W/A bits, first and last Conv/Linear at ``first_last_bits``.

    Built from ``set_global`` and ``set_module_name`` only, so torch.ao's own precedence applies.
    ``first_last_bits=None`` quantizes every layer at ``w_bits``/``a_bits``.
    """
    kw = {"act_observer": act_observer, "weight_observer": weight_observer, "fake_quant": fake_quant}
    mapping = _compat.QConfigMapping().set_global(qconfig(w_bits, a_bits, **kw))
    if first_last_bits is not None:
        check_bits(first_last_bits, "first_last_bits")
        names = weight_layer_names(model)
        if not names:
            raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to quantize.")
        for name in {names[0], names[-1]}:
            mapping.set_module_name(name, qconfig(first_last_bits, first_last_bits, **kw))
    return mapping


class FakeQuantConvTranspose(nn.Module):
    """A ConvTranspose whose weight goes through ``weight_fake_quant`` in every forward.

    torch.ao has no QAT ConvTranspose module, so :func:`quantize_fx` swaps each ConvTranspose
    for this after ``prepare_qat_fx``. Per-channel weights are quantized per output channel,
    which is axis 1 of a ConvTranspose weight ``[C_in, C_out / groups, *kernel]``.

    Args:
        conv: the float ConvTranspose1d/2d/3d (kept as ``.conv``).
        weight_fake_quant: a FakeQuantize for its weight (``ch_axis`` is set to 1 when per-channel).
    """

    def __init__(self, conv: nn.modules.conv._ConvTransposeNd, weight_fake_quant: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        if getattr(weight_fake_quant, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine):
            weight_fake_quant.ch_axis = 1  # type: ignore[assignment]
            inner = getattr(weight_fake_quant, "activation_post_process", None)
            if inner is not None:
                inner.ch_axis = 1
        self.weight_fake_quant = weight_fake_quant

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (fake-quantized in forward)."""
        return self.conv.weight

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """``conv_transpose(x, weight_fake_quant(weight))`` with the layer's own geometry."""
        c = self.conv
        dims = len(c.kernel_size)
        padding = cast(tuple[int, ...], c.padding)  # ConvTranspose takes no string padding
        output_padding = c._output_padding(
            x, output_size, list(c.stride), list(padding), list(c.kernel_size), dims, list(c.dilation)
        )
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        weight = self.weight_fake_quant(c.weight)
        return cast(torch.Tensor, fn(x, weight, c.bias, c.stride, padding, output_padding, c.groups, c.dilation))


def _swap_conv_transpose(prepared: torch.fx.GraphModule) -> None:
    """Give every ConvTranspose that has a qconfig its weight fake quantization (see FakeQuantConvTranspose)."""
    qconfigs = _compat.node_qconfigs(prepared)
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(str(node.target))
        qc = qconfigs.get(node.name)
        if type(module) not in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d) or qc is None:
            continue
        fq = qc.weight()
        if not isinstance(fq, _compat.FakeQuantizeBase):
            raise ConfigError(
                f"layer {node.target!r}: quantize_fx needs FakeQuantize qconfigs (got a {type(fq).__name__} for its "
                "weight); build the mapping with zq_plugin.qconfig(..., fake_quant=True)."
            )
        parent, _, child = str(node.target).rpartition(".")
        swapped = FakeQuantConvTranspose(cast(nn.modules.conv._ConvTransposeNd, module), fq)
        setattr(prepared.get_submodule(parent) if parent else prepared, child, swapped)


def _is_quantized_module(module: nn.Module | None) -> bool:
    """A converted int8 module, or a reference module (alone or inside a fused module, ``reference=True``)."""
    if module is None:
        return False
    if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
        return True
    return type(module).__module__.startswith("torch.ao.nn.intrinsic") and any(
        type(child).__module__.startswith("torch.ao.nn.quantized.reference") for child in module.children()
    )


def _float_weight_layers(
    model: nn.Module, graph_module: torch.fx.GraphModule, quantized: Callable[[str], bool]
) -> list[str]:
    """The weight layers of ``model`` that the traced ``graph_module`` computes but leaves float.

    A layer is computed when it (or a leaf module holding it) is called in the graph, or its
    weight is read by a ``get_attr`` node (a functional ``F.linear(x, self.fc.weight)``); it is
    quantized when ``quantized(name)`` says so or when an observer/FakeQuantize reads its weight.
    Layers inside leaf modules that FX does not descend into (``nn.MultiheadAttention``) are
    reported by the leaf's name.
    """
    called, observed_weights = set(), set()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            called.add(str(node.target))
        elif node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            called.add(owner)
            for user in node.users:
                target = graph_module.get_submodule(str(user.target)) if user.op == "call_module" else None
                if isinstance(target, _compat.ObserverBase | _compat.FakeQuantizeBase):
                    observed_weights.add(owner)
    candidates = [*weight_layers(model), *opaque_weight_modules(model)]
    left = []
    for name in candidates:
        ancestors = [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]
        if not any(a in called for a in ancestors):
            continue  # never run by this model's forward
        if name in observed_weights or quantized(name):
            continue
        left.append(name)
    return left


def _has_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _folded_float_module(qat: nn.Module) -> nn.Module | None:
    """A float Conv/Linear (+ReLU) equal to an eval-mode QAT module, with its fake-quantized weight baked in.

    For a ConvBn QAT module in eval mode torch computes ``bn(conv(x, fq(w * f)) / f + b)`` with
    ``f = gamma / sqrt(running_var + eps)``, which equals ``conv(x, fq(w * f)) + (b - mean) * f + beta``:
    a plain conv with the fake-quantized folded weight and the folded bias. Returns None for
    modules of another kind.
    """
    wfq = getattr(qat, "weight_fake_quant", None)
    if isinstance(qat, FakeQuantConvTranspose) and wfq is not None:
        plain_t = copy.deepcopy(qat.conv)
        with torch.no_grad():
            plain_t.weight.copy_(wfq(qat.conv.weight))
        return plain_t
    weight = getattr(qat, "weight", None)
    if wfq is None or not isinstance(weight, torch.Tensor):
        return None
    raw_bias = getattr(qat, "bias", None)
    bias: torch.Tensor | None = raw_bias if isinstance(raw_bias, torch.Tensor) else None
    bn = getattr(qat, "bn", None)
    with torch.no_grad():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
            factor = bn.weight / torch.sqrt(var + bn.eps)  # [C_out]
            shape = [-1] + [1] * (weight.dim() - 1)
            weight = cast(torch.Tensor, wfq(weight * factor.reshape(shape)))
            base = bias if bias is not None else torch.zeros_like(factor)
            bias = (base - mean) * factor + bn.bias
        else:
            weight = cast(torch.Tensor, wfq(weight))
    plain: nn.Linear | nn.modules.conv._ConvNd
    if isinstance(qat, nn.Linear):
        plain = nn.Linear(qat.in_features, qat.out_features, bias=bias is not None)
    elif isinstance(qat, nn.modules.conv._ConvNd):
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(qat.kernel_size)]
        plain = conv_cls(
            qat.in_channels,
            qat.out_channels,
            qat.kernel_size,  # type: ignore[arg-type]
            stride=qat.stride,  # type: ignore[arg-type]
            padding=qat.padding,  # type: ignore[arg-type]
            dilation=qat.dilation,  # type: ignore[arg-type]
            groups=qat.groups,
            bias=bias is not None,
            padding_mode=qat.padding_mode,
        )
    else:
        return None
    plain = plain.to(device=weight.device, dtype=weight.dtype)  # the model's, not torch's CPU float32 default
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None and plain.bias is not None:
            plain.bias.copy_(bias)
    if "ReLU" in type(qat).__name__:
        return nn.Sequential(plain, nn.ReLU())
    return plain


def fold_weights(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each QAT Conv/Linear (BN folded or not) by a float module holding its fake-quantized weight.

    Outputs are unchanged up to float rounding; inference is faster (no per-pass weight fake
    quantization, BN, or unscaling). Activation FakeQuantize modules stay. Not for fine-tuning.
    """
    from zq_plugin.backends.fx_sim import weight_bits_of

    for name, module in list(model.named_modules()):
        plain = _folded_float_module(module)
        if plain is not None:
            bits, granularity = weight_bits_of(getattr(module, "weight_fake_quant", None))
            plain.zq_weight_bits = bits  # type: ignore[assignment]  # describe() reads them
            plain.zq_weight_granularity = granularity  # type: ignore[assignment]
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.recompile()
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stop observing and turn fake quantization on, for every FakeQuantize of ``model``."""
    model.apply(_compat.disable_observer)
    model.apply(_compat.enable_fake_quant)
    return model


def quantize_fx(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    mapping: Any = None,
    plan: BitPlan | None = None,
    batch_size: int = 64,
    fold: bool = True,
    input_fn: InputFn | None = None,
) -> torch.fx.GraphModule:
    """Quantize a copy of ``model`` at W``w_bits``A``a_bits`` (or a ``plan``) in a clamping FX simulation.

    The bits mean what they mean on every backend (:mod:`zq_plugin.backends.fx_sim`): each
    Conv/Linear/ConvTranspose has its weight at ``w_bits`` and its **input** at ``a_bits`` (the
    first and last weight layer at ``first_last_bits``), and nothing else is quantized (joins,
    gates and the logits stay float). Uniform bits are ``BitPlan.uniform``. ``prepare_qat_fx`` on
    an eval-mode deep copy (BN folded with running statistics), calibration with float statistics
    (observers on, fake quantization off), then observers off and fake quantization on. The result
    stays in eval mode; its outputs honour quant_min/quant_max at every bit width. The source
    model is not changed. ConvTranspose layers (no QAT module in torch.ao) get their weight
    fake-quantized per output channel (axis 1) by :class:`FakeQuantConvTranspose`. Weight layers
    left in float (a ``None`` qconfig in ``mapping``, layers inside ``nn.MultiheadAttention``)
    are listed in ``.zq_float_layers`` with a warning. Batches go to the model's device.

    With a ready ``mapping`` (your own torch.ao ``QConfigMapping``) torch.ao's placement applies
    instead: a layer's activation qconfig quantizes its **output** (integration-notes §1.3).

    Args:
        model: float model.
        data: calibration data (any source).
        w_bits: weight bits of all but the first/last layer.
        a_bits: input bits of all but the first/last layer.
        first_last_bits: bits of the first and last Conv/Linear (``None``: no exception).
        act_observer: activation observer class (default ``MinMaxObserver``).
        weight_observer: weight observer class (default ``PerChannelMinMaxObserver``).
        mapping: a ready ``QConfigMapping`` of FakeQuantize qconfigs, overriding the bit arguments.
        plan: a :class:`~zq_plugin.mixed_precision.BitPlan` instead (not with ``mapping``).
        batch_size: calibration batch size for tensor data.
        fold: after calibration, replace the QAT Conv/Linear modules by float ones holding the
            BN-folded, fake-quantized weights (:func:`fold_weights`: same outputs up to float
            rounding, faster). ``False`` keeps the QAT modules, e.g. to fine-tune or to carry the
            simulation into another backend.
        input_fn: maps a batch to the model's positional inputs (see :func:`calibrate`).

    Raises:
        ModelError: the model does not trace (names torch's reason and the line).
        ConfigError: bad bits, no calibration data, a mapping without FakeQuantize qconfigs.
    """
    check_traceable(model, "quantize_fx")
    model_device_dtype(model)  # one device and one floating dtype, or a ConfigError naming them
    if plan is not None and mapping is not None:
        raise ConfigError("give a plan or a mapping, not both (the plan is turned into a mapping).")
    if mapping is None:
        from zq_plugin.backends.fx_sim import simulate
        from zq_plugin.plan import BitPlan, LayerBits

        if plan is not None:
            plan.check(model)
        elif weight_layers(model):
            plan = BitPlan.uniform(model, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits)
        if first_last_bits is not None:
            check_bits(first_last_bits, "first_last_bits")
        sim = simulate(
            model, data, plan, act_observer=act_observer, weight_observer=weight_observer,
            default=LayerBits(w_bits=w_bits, a_bits=a_bits), first_last_bits=first_last_bits,
            batch_size=batch_size, fold=False, input_fn=input_fn,
        )  # fmt: skip
        floats = _float_weight_layers(model, sim, lambda name: hasattr(_has_module(sim, name), "weight_fake_quant"))
        result = fold_weights(sim) if fold else sim
        report_float_layers(result, floats, "quantize_fx")
        return result
    example = _to_model(_example_inputs(data, batch_size, input_fn), model)
    float_model = relu6_as_relu_then_clamp(copy.deepcopy(model).eval())
    prepared = _compat.prepare_qat_fx(float_model, mapping, example).eval()
    _swap_conv_transpose(prepared)
    clip_before_shared_observer(prepared)
    keep_negative_lobes(prepared)
    prepared.apply(_compat.enable_observer)
    prepared.apply(_compat.disable_fake_quant)
    calibrate(prepared, data, batch_size=batch_size, input_fn=input_fn)
    freeze(prepared)
    floats = _float_weight_layers(
        model, prepared, lambda name: hasattr(_has_module(prepared, name), "weight_fake_quant")
    )
    result = fold_weights(prepared) if fold else prepared
    report_float_layers(result, floats, "quantize_fx")
    return result


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


class _FrozenFakeQuant(nn.Module):
    """A calibrated FakeQuantize with its ``(scale, zero_point)`` fixed: plain tensor ops, so torch.export takes it.

    Computes :func:`zq_plugin.qparams.fake_quantize`'s formula,
    ``clamp(round(x * (1 / s)), qmin - zp, qmax - zp) * s``, without Python branches on buffers.
    """

    def __init__(self, fq: Any) -> None:
        super().__init__()
        sync = getattr(fq, "sync_qparams", None)
        if sync is not None:
            sync()
        scale = fq.scale.detach().clone()
        zero_point = fq.zero_point.detach().to(scale.dtype)
        self.axis = int(fq.ch_axis) if fq.is_per_channel else None
        self.scale: torch.Tensor
        self.inv_scale: torch.Tensor
        self.lo: torch.Tensor
        self.hi: torch.Tensor
        self.register_buffer("scale", scale)
        self.register_buffer("inv_scale", 1.0 / scale)
        self.register_buffer("lo", fq.quant_min - zero_point)
        self.register_buffer("hi", fq.quant_max - zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the fixed parameters."""
        scale, inv, lo, hi = self.scale, self.inv_scale, self.lo, self.hi
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            scale, inv, lo, hi = scale.reshape(shape), inv.reshape(shape), lo.reshape(shape), hi.reshape(shape)
        return torch.clamp(torch.round(x * inv), lo, hi) * scale


def export_sim(sim: nn.Module, example: torch.Tensor) -> Any:
    """The calibrated clamping simulation as a ``torch.export`` program, for use without zq_plugin.

    Every FakeQuantize of ``sim`` (a :func:`quantize_fx` result or any calibrated
    ``prepare_qat_fx`` model) is replaced, in a copy, by a module of plain tensor ops with its
    calibrated ``(scale, zero_point)`` fixed: ``clamp(round(x / s), qmin - zp, qmax - zp) * s``,
    the formula of :func:`zq_plugin.qparams.fake_quantize`. The batch dimension is dynamic.
    Save it with ``torch.export.save(program, "model.pt2")`` and load it anywhere with
    ``torch.export.load("model.pt2").module()``; ``zq quantize --out model.pt2`` does both.

    Args:
        sim: the calibrated simulation; not changed.
        example: one input batch ``[N, C, H, W]`` on the model's device.

    Returns:
        A ``torch.export.ExportedProgram`` whose ``module()`` gives ``sim``'s outputs.

    Raises:
        ModelError: torch.export does not take a construct of the model (the message names it).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> sim = quantize_fx(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
        >>> program = export_sim(sim, torch.randn(2, 1, 8, 8))
        >>> x = torch.randn(5, 1, 8, 8)
        >>> torch.equal(program.module()(x), sim(x))
        True
    """
    frozen = copy.deepcopy(sim)
    for module in list(frozen.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _compat.FakeQuantize):
                setattr(module, name, _FrozenFakeQuant(child))
    try:
        return torch.export.export(frozen.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as exc:  # torch.export's own refusal, for a construct it does not take
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"torch.export could not export the simulation ({type(exc).__name__}: {first}); "
            "use the simulation from Python, or make the model torch.export-able (docs/compatibility.md)."
        ) from exc


def convert_int8_fx(
    model: nn.Module,
    data: CalibrationData,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    batch_size: int = 64,
    input_fn: InputFn | None = None,
    reference: bool = False,
) -> torch.fx.GraphModule:
    """A real int8 model (torch's quantized CPU kernels) from ``prepare_fx`` + calibration + ``convert_fx``.

    ``reference=True`` returns torch's reference model of the same steps instead
    (``convert_to_reference_fx``: float ops between quantize/dequantize pairs with the same
    qparams), the exact emulation to check the int8 kernels against.

    Only 8 bits: ``convert_fx`` ignores narrower quant_min/quant_max, so lower bit widths
    would silently run at more levels than asked. Every layer, first and last included, has 8-bit
    weights. ConvTranspose weights are quantized per tensor (torch's quantized ConvTranspose has no
    per-channel weights). Weight layers left in float are listed in ``.zq_float_layers``.

    **Activations use 7 bits (``[0, 127]`` in ``quint8``) on the x86/fbgemm engines**, as torch's
    own x86 qconfig does (``reduce_range=True``): those kernels multiply ``uint8 x int8`` pairs
    into ``int16`` with saturation, and with the full ``[0, 255]`` range the depthwise kernel
    saturates: a 3x3 depthwise conv of 144 channels with weights 1 on an input of ones returned
    5.05 for 9, and torchvision's MobileNetV2 fell to cosine 0.59 against torch's own reference
    model of the same qparams (0.9999 with 7 bits). Other engines (qnnpack) get 8 bits.

    A ``x.mean((2, 3))`` / ``torch.mean(x, [2, 3])`` over a 4-d feature map (torchvision's
    MNASNet, ShuffleNetV2) becomes ``adaptive_avg_pool2d(x, 1)`` (flattened unless ``keepdim``):
    the same numbers, and torch's quantized ``mean`` over those dims fails at run time
    ("required rank 4 tensor to use channels_last format").

    A float64/float16/bfloat16 model is converted to float32 first (torch's int8 kernels quantize
    float32 tensors only); the int8 model takes float32 inputs.

    Raises:
        ConfigError: the model lies on several devices or mixes floating dtypes.
        ModelError: the model does not trace, or torch cannot convert one of its layers (named).
    """
    check_traceable(model, "convert_int8_fx")
    _, dtype = model_device_dtype(model)  # one device and one floating dtype, or a ConfigError naming them
    work = copy.deepcopy(model).eval()
    if dtype != torch.float32:  # torch's int8 kernels quantize float32 tensors only
        logger.info("convert_int8_fx: the %s model is converted to float32 for torch's int8 kernels", dtype)
        work = work.float()
    a_bits = 7 if torch.backends.quantized.engine in ("x86", "fbgemm") else 8
    mapping = uniform_qconfig_mapping(
        model,
        8,
        a_bits,
        first_last_bits=None,
        act_observer=act_observer,
        weight_observer=weight_observer,
        fake_quant=False,
    )
    transposed = [n for n, m in weight_layers(model).items() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    for name in transposed:
        mapping.set_module_name(
            name, qconfig(8, a_bits, act_observer=act_observer, fake_quant=False, granularity="per_tensor")
        )
    example = _to_model(_example_inputs(data, batch_size, input_fn), work)
    try:
        prepared = _compat.prepare_fx(_spatial_means_as_pooling(work, example), mapping, example)
    except AssertionError as err:  # torch validates qconfigs per module type with bare asserts
        raise ModelError(
            f"convert_int8_fx: torch.ao refused a layer of {type(model).__name__} ({err}). Use quantize_fx (the "
            "clamping simulation) for this model, or give that layer a None qconfig in your own prepare_fx flow."
        ) from err
    calibrate(prepared, data, batch_size=batch_size, input_fn=input_fn)
    try:
        converted = _compat.convert_to_reference_fx(prepared) if reference else _compat.convert_fx(prepared)
    except (AssertionError, RuntimeError, NotImplementedError) as err:
        raise ModelError(
            f"convert_int8_fx: torch's convert_fx failed on {type(model).__name__} ({type(err).__name__}: {err}). "
            "Use quantize_fx (the clamping simulation) for this model."
        ) from err
    floats = _float_weight_layers(model, prepared, lambda name: _is_quantized_module(_has_module(converted, name)))
    report_float_layers(converted, floats, "convert_int8_fx")
    return converted
