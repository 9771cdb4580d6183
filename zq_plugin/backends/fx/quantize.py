"""The clamping FX simulation in one call (:func:`quantize_fx`), with its folding and freezing steps.

Also the ConvTranspose weight fake quantization torch.ao lacks (:class:`FakeQuantConvTranspose`)
and the bookkeeping of weight layers a traced model leaves in float.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import model_device_dtype, opaque_weight_modules, report_float_layers, weight_layers
from zq_plugin.backends.fx.passes import clip_before_shared_observer, keep_negative_lobes, relu6_as_relu_then_clamp
from zq_plugin.calibration import InputFn, _example_inputs, _to_model, calibrate, check_traceable
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ConfigError
from zq_plugin.qparams import check_bits

if TYPE_CHECKING:
    from zq_plugin.plan import BitPlan


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
    from zq_plugin.backends.fx.sim import weight_bits_of

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

    The bits mean what they mean on every backend (:mod:`zq_plugin.backends.fx.sim`): each
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
        from zq_plugin.backends.fx.sim import simulate
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
