"""Brevitas backend: a float model + a BitPlan -> Brevitas quant layers, calibrated, bias-corrected, exported.

Steps (integration-notes §3; Brevitas is imported lazily and is an optional extra):

1. :func:`to_brevitas`: a **deep copy** of the model goes through Brevitas's
   ``preprocess_for_quantize`` (BatchNorm merged into the convs; it rewrites weights in place,
   so the original is never handed to it; ReLU6 is kept) and ``layerwise_quantize``: each
   Conv/ConvTranspose/Linear becomes ``QuantConv*d``/``QuantConvTranspose*d``/``QuantLinear``
   quantizing its own **input** and its weights at the plan's bits. Weights are symmetric
   narrow, per output channel (depthwise convs need it; axis 1 of a ConvTranspose weight) or per
   tensor as the plan says; the bias is int32 (a zero bias where the layer had none). A layer's
   input is unsigned when it comes from a ReLU/ReLU6 (through pooling or reshapes), signed
   otherwise (the image, a linear bottleneck, a residual sum). Weight layers left in float are
   listed in ``zq_float_layers`` (:func:`~zq_plugin._utils.report_float_layers`).
2. :func:`calibrate`: Brevitas's ``calibration_mode`` over any loader (the backend does not
   know which synthesizer made the data); a second call continues the average. Until then the
   model refuses to run (:class:`~zq_plugin.errors.NotCalibratedError`): an uncalibrated
   Brevitas activation quantizer silently uses threshold 1.0.
3. :func:`bias_correct` (per output channel, any rank) and optionally :func:`gptq` (``gptq_mode``).
4. :func:`export_onnx`: QCDQ ONNX (sub-8-bit ranges kept as ``Clip`` bounds; the logits first,
   every other output after them) and :func:`run_onnx` to check it in onnxruntime.

Every step follows the model's device; a step that fails on a batch raises a
:class:`~zq_plugin.errors.ZQError` and leaves the model as it was.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> qmodel = to_brevitas(net, w_bits=4, a_bits=4, first_last_bits=None)
    >>> calibrate(qmodel, torch.randn(64, 1, 8, 8))
    CalibrationSummary(batches=1, samples=64)
    >>> qmodel(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import os
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zq_plugin._utils import (
    WEIGHT_LAYERS,
    CalibrationSummary,
    eval_mode,
    forward_error,
    input_placement,
    place,
    report_float_layers,
    select_output,
)
from zq_plugin.backends import moved_names
from zq_plugin.data import CalibrationData, collect_batches
from zq_plugin.errors import ConfigError, MissingDependencyError, ModelError, NotCalibratedError, ZQError
from zq_plugin.plan import BitPlan
from zq_plugin.qparams import quant_range

logger = logging.getLogger(__name__)

_PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    *(nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity),
)
_PASS_THROUGH_FUNCTIONS = {"flatten", "reshape", "view", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "dropout"}
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax)
_NONNEGATIVE_FUNCTIONS = {"relu", "relu6", "relu_", "sigmoid", "softmax"}


PLUGIN_STATS = ("zq-minmax", "zq-mse", "zq-percentile", "zq-aciq", "zq-entropy")


def _plugin_range(name: str) -> Any:
    """The :mod:`zq_plugin.observers.stats` range function behind a ``"zq-..."`` statistic name."""
    from zq_plugin.observers import stats

    return {
        "zq-minmax": stats.minmax_range,
        "zq-mse": stats.lp_range,
        "zq-percentile": stats.percentile_range,
        "zq-aciq": stats.aciq_range,
        "zq-entropy": stats.entropy_range,
    }[name]


class PluginStatistic(nn.Module):
    """A Brevitas scaling statistic computed by one of the plugin's range statistics.

    Brevitas resolves the constructor arguments by name from the quantizer (``bit_width``,
    ``signed``, ``narrow_range``; ``zq_statistic`` is set with ``.let``). On each calibration
    batch, ``forward`` histograms the batch (:func:`zq_plugin.observers.histogram.observe`), takes
    the statistic's clipping range for the quantizer's real integer grid, and returns the
    threshold Brevitas expects: ``max(-lo, hi)`` for a signed quantizer, ``hi`` for an unsigned
    one. Brevitas averages the per-batch thresholds over calibration.
    """

    def __init__(self, zq_statistic: str, bit_width: Any, signed: bool, narrow_range: bool) -> None:
        super().__init__()
        self.range_fn = _plugin_range(zq_statistic)
        self.grid = quant_range(int(bit_width), signed=bool(signed), narrow=bool(narrow_range))
        self.signed = bool(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The threshold of one batch (a scalar tensor)."""
        from zq_plugin.observers.histogram import observe

        hist = observe(None, x.detach().float().flatten())
        lo, hi = self.range_fn(hist, self.grid[0], self.grid[1], self.signed)
        threshold = torch.maximum(-lo, hi) if self.signed else hi
        return threshold.reshape(()).to(device=x.device, dtype=x.dtype).clamp_min(torch.finfo(torch.float32).eps)


@functools.lru_cache(maxsize=1)
def _brevitas() -> dict[str, Any]:
    """The Brevitas pieces used here, imported on first use (a missing install is not cached)."""
    try:
        with warnings.catch_warnings():  # brevitas.fx announces its own deprecation on import
            warnings.simplefilter("ignore")
            qnn = importlib.import_module("brevitas.nn")
            quantize = importlib.import_module("brevitas.graph.quantize")
            calibrate_mod = importlib.import_module("brevitas.graph.calibrate")
            quant = importlib.import_module("brevitas.quant")
            quant_layer = importlib.import_module("brevitas.nn.quant_layer")
            runtime_quant = importlib.import_module("brevitas.proxy.runtime_quant")
            standalone = importlib.import_module("brevitas.core.scaling.standalone")
            zero_point = importlib.import_module("brevitas.core.zero_point")
            enum = importlib.import_module("brevitas.inject.enum")
        # Brevitas notes, at each layer fed an affine (zero-point) input, that it does not track the
        # output accumulator's zero point; the outputs are right (they are float) and nothing reads it
        warnings.filterwarnings("ignore", message="Computing zero point of output accumulator", module="brevitas")
    except ImportError as exc:
        raise MissingDependencyError(
            "the Brevitas backend needs brevitas: pip install 'zq-plugin[brevitas]' "
            "(and 'zq-plugin[onnx]' for ONNX export)."
        ) from exc
    return {
        "qnn": qnn,
        "preprocess": quantize.preprocess_for_quantize,
        "layerwise_quantize": quantize.layerwise_quantize,
        "calibration_mode": calibrate_mod.calibration_mode,
        "status_manager": calibrate_mod.quantization_status_manager,
        "QuantWBIOL": quant_layer.QuantWeightBiasInputOutputLayer,
        "act_proxy": runtime_quant.ActQuantProxyFromInjectorBase,
        "quant": quant,
        "runtime_scaling": standalone.ParameterFromRuntimeStatsScaling,
        "runtime_zero_point": zero_point.ParameterFromRuntimeZeroPoint,
        "param_from_stats": standalone.ParameterFromStatsFromParameterScaling,
        "StatsOp": enum.StatsOp,
    }


def nonnegative_inputs(model: nn.Module) -> dict[str, bool]:
    """``layer -> True`` when a Conv/Linear's input is the output of a ReLU-like op (through pooling/reshapes).

    Found on an FX trace; layers of an untraceable model are all reported signed (False),
    which never clips and costs one bit of resolution on ReLU outputs.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # untraceable: signed everywhere is always safe
        logger.info("%s does not trace (%s): every layer input is treated as signed", type(model).__name__, exc)
        return {}
    result: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), WEIGHT_LAYERS):
            continue
        arg = node.args[0] if node.args else None
        nonneg = False
        while isinstance(arg, torch.fx.Node):
            target = modules.get(str(arg.target)) if arg.op == "call_module" else None
            name = getattr(arg.target, "__name__", str(arg.target)) if arg.op != "call_module" else ""
            if isinstance(target, _NONNEGATIVE_MODULES) or name in _NONNEGATIVE_FUNCTIONS:
                nonneg = True
                break
            if isinstance(target, _PASS_THROUGH_MODULES) or name in _PASS_THROUGH_FUNCTIONS:
                arg = arg.args[0] if arg.args else None
                continue
            break
        result[str(node.target)] = nonneg
    return result


def _grouped_transpose(module: nn.Module) -> bool:
    """A grouped ConvTranspose: its output channels are not one weight axis, so Brevitas scales it per tensor."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1


def _layer_kwargs(
    plan: BitPlan, unsigned: dict[str, bool], act_stats: str, b: dict[str, Any], input_grid: str = "symmetric"
) -> dict[str, Any]:
    """Brevitas layer keyword arguments, evaluated per module name (lambdas, as ``layerwise_quantize`` needs)."""
    quant, stats_op = b["quant"], b["StatsOp"]
    per_channel = quant.Int8WeightPerChannelFloat.let(scaling_impl=b["param_from_stats"])  # GPTQ-ready scales
    per_tensor = quant.Int8WeightPerTensorFloat.let(scaling_impl=b["param_from_stats"])
    if input_grid not in ("symmetric", "affine"):
        raise ConfigError(f"input_grid={input_grid!r}: use 'affine' (a zero point, as FX and PT2E) or 'symmetric'.")
    if input_grid == "affine":  # every input on [0, 2^b - 1] with a zero point: the grid of FX and PT2E
        shifted = quant.ShiftedUint8ActPerTensorFloatMSE if act_stats == "mse" else quant.ShiftedUint8ActPerTensorFloat
        signed_act = unsigned_act = shifted
    elif act_stats == "max":
        signed_act = quant.Int8ActPerTensorFloat.let(scaling_stats_op=stats_op.MAX)
        unsigned_act = quant.Uint8ActPerTensorFloat.let(scaling_stats_op=stats_op.MAX)
    elif act_stats == "percentile":
        signed_act, unsigned_act = quant.Int8ActPerTensorFloat, quant.Uint8ActPerTensorFloat
    elif act_stats == "mse":
        signed_act, unsigned_act = quant.Int8ActPerTensorFloatMSE, quant.Uint8ActPerTensorFloatMSE
    elif act_stats in PLUGIN_STATS:
        signed_act = quant.Int8ActPerTensorFloat.let(scaling_stats_impl=PluginStatistic, zq_statistic=act_stats)
        unsigned_act = quant.Uint8ActPerTensorFloat.let(scaling_stats_impl=PluginStatistic, zq_statistic=act_stats)
    if act_stats not in ("max", "percentile", "mse", *PLUGIN_STATS):
        raise ConfigError(
            f"act_stats={act_stats!r}: use 'max', 'percentile' (Brevitas's 99.999 %), 'mse' (Brevitas's), "
            f"or one of the plugin's statistics {PLUGIN_STATS}."
        )
    layers = plan.layers

    def bits(name: str, field: str) -> int:
        return int(getattr(layers[name], field)) if name in layers else 8

    return {
        "weight_quant": lambda module, name: (
            per_tensor
            if _grouped_transpose(module) or (name in layers and layers[name].granularity == "per_tensor")
            else per_channel
        ),
        "weight_bit_width": lambda module, name: bits(name, "w_bits"),
        "input_quant": lambda module, name: unsigned_act if unsigned.get(name, False) else signed_act,
        "input_bit_width": lambda module, name: bits(name, "a_bits"),
        "bias_quant": None if input_grid == "affine" else b["quant"].Int32Bias,
        "return_quant_tensor": False,
    }


# float layer type -> the brevitas.nn layer that replaces it
_QUANT_LAYERS: dict[type[nn.Module], str] = {
    nn.Conv1d: "QuantConv1d",
    nn.Conv2d: "QuantConv2d",
    nn.Conv3d: "QuantConv3d",
    nn.ConvTranspose1d: "QuantConvTranspose1d",
    nn.ConvTranspose2d: "QuantConvTranspose2d",
    nn.ConvTranspose3d: "QuantConvTranspose3d",
    nn.Linear: "QuantLinear",
}
# modules with weights that Brevitas's layerwise flow never replaces: reported as float when present
_OTHER_WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.Bilinear, nn.RNNBase, nn.RNNCellBase)


_FUNCTIONAL_WEIGHT_OPS = {
    *("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"),
}


def to_brevitas(
    model: nn.Module,
    plan: BitPlan | None = None,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    first_last_bits: int | None = 8,
    act_stats: str = "max",
    input_grid: str = "symmetric",
) -> nn.Module:
    """A Brevitas copy of ``model`` with the plan's weight and input bits (the original is untouched).

    Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear become ``QuantConv*d`` /
    ``QuantConvTranspose*d`` / ``QuantLinear``. Weights are scaled per output channel (axis 0
    of a Conv/Linear weight ``[C_out, C_in/groups, k...]``, axis 1 of a ConvTranspose weight
    ``[C_in, C_out/groups, k...]``); a *grouped* ConvTranspose has no single output-channel
    axis and is scaled per tensor (with a warning). Every quant layer gets a bias (zeros where
    the float layer had none), so :func:`bias_correct` never adds parameters and a saved
    ``state_dict`` always loads into a fresh ``to_brevitas`` copy. Weight layers left in float
    (subclasses of Conv/Linear with their own ``forward``, ``nn.MultiheadAttention``,
    ``nn.Bilinear``, RNNs) are listed in ``qmodel.zq_float_layers``, with a warning.

    Args:
        model: the float model.
        plan: per-layer bits (:class:`~zq_plugin.mixed_precision.plan.BitPlan`, input bits per
            layer); without one, a uniform plan from ``w_bits``/``a_bits``/``first_last_bits``.
        w_bits: uniform weight bits when no plan is given.
        a_bits: uniform input bits when no plan is given.
        first_last_bits: bits of the first and last layer of the uniform plan.
        act_stats: statistic of the activation ranges: ``"max"`` (average of per-batch maxima,
            closest to torch's MinMax), ``"percentile"`` (Brevitas's 99.999 %), ``"mse"``
            (Brevitas's), or the plugin's own ``"zq-mse"``, ``"zq-percentile"``, ``"zq-aciq"``,
            ``"zq-entropy"`` (:class:`PluginStatistic`, the statistics of ``docs/observers.md``
            on the quantizer's real bit width).
        input_grid: ``"symmetric"`` (Brevitas's default: unsigned ``[0, 2^b - 1]`` after ReLU-like
            ops, signed otherwise, no zero point) or ``"affine"`` (every input on ``[0, 2^b - 1]`` with a
            zero point, Brevitas's ``ShiftedUint8ActPerTensorFloat``: the grid of the FX simulation and
            PT2E, which :func:`from_sim` carries; its own calibration uses Brevitas's percentile
            interval, or its MSE with ``act_stats="mse"``).

    Returns:
        The Brevitas model in eval mode, on the model's device; :func:`calibrate` it before use.

    Raises:
        ConfigError: a plan naming layers the model does not have, or a non-weight layer
            (the message lists the supported types), or a non-uniform grid.
        ModelError: Brevitas's tracer cannot trace the model.
        MissingDependencyError: Brevitas is not installed.
    """
    b = _brevitas()
    if plan is None:
        plan = BitPlan.uniform(model, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits)
    plan.check(model)
    nonuniform = [n for n, lb in plan.layers.items() if lb.grid == "nonuniform"]
    if nonuniform:
        raise ConfigError(
            f"layers {nonuniform} ask for the non-uniform grid, which Brevitas's integer layers cannot hold; "
            "use grid='uniform' for Brevitas (the clustered grid is an FX fake-quant simulation)."
        )
    unsigned = nonnegative_inputs(model)
    work = copy.deepcopy(model).eval()  # preprocess_for_quantize rewrites weights in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = b["preprocess"](work, relu6_to_relu=False, equalize_iters=0)
        except Exception as exc:  # Brevitas's own FX tracer: data-dependent control flow fails here
            raise ModelError(
                f"Brevitas could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). Its graph "
                "quantization needs a model without data-dependent Python control flow in forward."
            ) from exc
        kwargs = _layer_kwargs(plan, unsigned, act_stats, b, input_grid)
        layer_map = {float_cls: (getattr(b["qnn"], name), kwargs) for float_cls, name in _QUANT_LAYERS.items()}
        qmodel = b["layerwise_quantize"](graph, compute_layer_map=layer_map)
    qmodel.eval().to(input_placement(model)[0])  # the quantizers' own tensors go where the model's weights are
    grouped = []
    for name, layer in _quant_layers(qmodel):
        if layer.bias is None:  # a zero bias: bias correction then never changes the parameter set
            out_dim = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            layer.bias = nn.Parameter(torch.zeros(out_dim, device=layer.weight.device, dtype=layer.weight.dtype))
        if _grouped_transpose(layer):
            grouped.append(name)
    for owner, attr, _ in _act_scalers(qmodel):
        _steps(owner, attr)  # registered now, so a fresh copy has the keys of a calibrated state_dict
    if grouped:
        message = f"to_brevitas: grouped ConvTranspose layers {grouped} have their weights scaled per tensor."
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    qmodel.zq_plan = plan
    qmodel.register_forward_pre_hook(_require_calibration)
    report_float_layers(qmodel, _float_layers(qmodel), "to_brevitas")
    return qmodel


def _quant_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every Brevitas weight layer (``QuantConv*d``, ``QuantConvTranspose*d``, ``QuantLinear``)."""
    cls = _brevitas()["QuantWBIOL"]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _float_layers(qmodel: nn.Module) -> list[str]:
    """Weight layers of ``qmodel`` that still compute in float.

    Two kinds: weight modules Brevitas did not swap (outermost only), and functional
    ``conv*d``/``conv_transpose*d``/``linear`` calls left in the traced graph, named by the
    module that holds their weight (Brevitas's tracer inlines a Conv/Linear subclass with its
    own ``forward``, and ``F.linear(x, self.fc.weight)`` is such a call).
    """
    cls = _brevitas()["QuantWBIOL"]
    names: list[str] = []
    for name, m in qmodel.named_modules():
        if any(name.startswith(f"{outer}.") for outer in names) or isinstance(m, cls):
            continue
        if isinstance(m, WEIGHT_LAYERS + _OTHER_WEIGHT_MODULES):
            names.append(name)
    graph = getattr(qmodel, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _FUNCTIONAL_WEIGHT_OPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if getattr(weight, "op", None) == "get_attr":  # Brevitas's graph has its own Node class
            names.append(str(weight.target).rsplit(".", 1)[0])
        else:
            names.append(node.name)
    return list(dict.fromkeys(names))


def _act_scalers(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """``(owner, proxy attribute, scaler)`` for every runtime-statistics activation scaler of ``model``.

    Looked up every time: Brevitas rebuilds a proxy's quantizer (and its scaler) when a
    ``state_dict`` is loaded, so a list kept from build time goes stale. The owner (the quant
    layer) is not rebuilt and holds the scaler's calibration step count.
    """
    b = _brevitas()
    found: list[tuple[nn.Module, str, Any]] = []
    for owner in model.modules():
        for attr, proxy in owner.named_children():
            if isinstance(proxy, b["act_proxy"]):
                found.extend((owner, attr, m) for m in proxy.modules() if isinstance(m, b["runtime_scaling"]))
    return found


def _steps(owner: nn.Module, attr: str) -> torch.Tensor:
    """The buffer ``owner.zq_<attr>_steps``: calibration steps its quantizer has averaged (0 = none)."""
    key = f"zq_{attr}_steps"
    if not hasattr(owner, key):
        device = next(iter(owner.parameters()), torch.empty(0)).device
        owner.register_buffer(key, torch.zeros((), dtype=torch.long, device=device))
    steps: torch.Tensor = getattr(owner, key)
    return steps


def _seen_no_data(scaler: Any) -> bool:
    """True for a Brevitas runtime-statistics scaler whose statistics counter never moved."""
    return int(scaler.counter) == 0


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of activation quantizers of ``model`` that never saw calibration data."""
    cls = _brevitas()["runtime_scaling"]
    return [n for n, m in model.named_modules() if isinstance(m, cls) and _seen_no_data(m)]


def _require_calibration(model: nn.Module, _args: Any) -> None:
    if model.training:
        return
    cls = _brevitas()["runtime_scaling"]
    missing = [n for n, m in model.named_modules() if isinstance(m, cls) and _seen_no_data(m) and not m.training]
    if missing:
        raise NotCalibratedError(
            f"this Brevitas model has not been calibrated ({len(missing)} activation quantizer(s), e.g. "
            f"{missing[0]!r}): they would run with Brevitas's default threshold 1.0. Call "
            "zq_plugin.backends.brevitas.calibrate(model, data) first."
        )


def _batches(model: nn.Module, data: CalibrationData, batch_size: int) -> list[torch.Tensor]:
    """The batches of ``data``, moved to the model's device (floating batches also to its dtype)."""
    device, dtype = input_placement(model)
    return [place(x, device, dtype) for x in collect_batches(data, batch_size)]


def _failed(step: str, index: int, exc: Exception, left: str, batch: torch.Tensor | None = None) -> ZQError:
    """The error raised when a step fails on one batch.

    A ZQError as is; a forward that needs more inputs than the image (a ``TypeError``) as the
    :func:`zq_plugin._utils.forward_error` ConfigError; anything else as a ModelError.
    """
    if isinstance(exc, ZQError):
        return exc
    if isinstance(exc, TypeError):
        named = forward_error(exc, index, [batch], f"{step} (the Brevitas backend feeds one image input)")
        if isinstance(named, ZQError):
            return named
    return ModelError(f"{step} failed on batch {index} ({type(exc).__name__}: {exc}); {left}")


def calibrate(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> CalibrationSummary:
    """Collect activation ranges over ``data`` in Brevitas's ``calibration_mode``, in place.

    Returns a :class:`~zq_plugin._utils.CalibrationSummary` (batches and samples seen), not the
    model, so that a REPL shows one line.

    Every activation threshold is the average over calibration batches of the statistic
    (``act_stats``) of each batch. A second call **continues** that average, as the FX
    ``calibrate`` continues its observers: ``calibrate(q, a); calibrate(q, b)`` gives the model
    that one call over the batches of ``a`` then ``b`` gives. The step counts live in buffers
    (``zq_input_quant_steps``), so this holds after a ``state_dict`` round trip too; build a
    fresh :func:`to_brevitas` copy to start over. The weight scales are set at the end, so
    ``state_dict()`` right after calibration holds every key. Batches are moved to the model's
    device and dtype.

    Args:
        model: a :func:`to_brevitas` model.
        data: a tensor ``[N, C, H, W]``, a :class:`~zq_plugin.data.SyntheticDataset`, a
            DataLoader or any iterable of batches (images first).
        batch_size: batch size when ``data`` is a tensor or dataset.

    Raises:
        ConfigError: no batch, or NaN/Inf in the data.
        ModelError: the model fails on a batch; the model is left as it was before the call.
    """
    b = _brevitas()
    batches = _batches(model, data, batch_size)
    scalers = _act_scalers(model)
    saved = [
        (s.counter, s.collect_stats_steps, s.momentum, s.buffer.clone(), s.value.detach().clone(), _steps(o, a).clone())
        for o, a, s in scalers
    ]
    index, counts = 0, []
    try:
        with eval_mode(model), torch.no_grad(), b["calibration_mode"](model):
            for owner, attr, scaler in scalers:
                _resume(scaler, int(_steps(owner, attr)))
            for x in batches:
                model(x)
                index += 1
            counts = [int(s.counter) for _, _, s in scalers]  # before the exit freezes the scales
    except Exception as exc:
        with torch.no_grad():
            for (owner, attr, s), (counter, steps, momentum, buffer, value, n) in zip(scalers, saved, strict=True):
                s.counter, s.collect_stats_steps, s.momentum = counter, steps, momentum
                s.buffer.copy_(buffer)
                s.value.detach().copy_(value)
                _steps(owner, attr).copy_(n)
        batch = batches[index] if index < len(batches) else None
        raise _failed("calibration", index, exc, "the model is as it was before this call.", batch) from exc
    for (owner, attr, scaler), count in zip(scalers, counts, strict=True):
        _steps(owner, attr).fill_(count)
        if count == 0:  # never reached: keep refusing to run rather than use threshold 1.0
            scaler.counter = 0
    _init_weight_scales(model)
    return CalibrationSummary(batches=len(batches), samples=sum(len(x) for x in batches))


def _resume(scaler: Any, steps: int) -> None:
    """Prepare ``scaler`` (inside ``calibration_mode``) to continue an average over ``steps`` earlier steps.

    Brevitas averages into ``buffer`` while ``counter < collect_stats_steps`` and, on exit,
    multiplies ``value`` by ``buffer``; after a first calibration ``counter`` is past the end and
    further data would be ignored. With float scales (all this backend builds) ``value`` is the
    average itself, so it goes back into ``buffer`` with its step count.
    """
    with torch.no_grad():
        if steps > 0 and int(scaler.counter) > 0:
            if type(scaler.restrict_scaling.restrict_value_impl).__name__ != "FloatRestrictValue":
                raise ConfigError(
                    "this quantizer restricts its scale (e.g. power of two), so its calibration cannot be "
                    "continued; calibrate a fresh to_brevitas copy on all the data in one call."
                )
            scaler.buffer.copy_(scaler.value.detach().reshape(scaler.buffer.shape))
            scaler.counter = steps
        else:  # never calibrated here (a fresh model, or one calibrated outside this backend): start over
            scaler.counter = 0
        scaler.value.detach().fill_(1.0)  # the exit multiplies it by the average


def _init_weight_scales(model: nn.Module) -> None:
    """Compute every quant layer's weight scale now (Brevitas does it at the first quantized forward)."""
    with eval_mode(model), torch.no_grad():
        for _, layer in _quant_layers(model):
            if layer.weight_quant.is_quant_enabled:
                layer.quant_weight()


def bias_correct(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Shift each quant layer's bias by its mean output error over ``data`` (bias correction); returns ``model``.

    As Brevitas's ``bias_correction_mode``: each layer runs once quantized and once in float on
    the same (float) input, the float output goes on (errors do not pile up), and the bias
    absorbs the mean of ``float - quantized`` per output channel. The channel is axis 1 of a
    Conv/ConvTranspose output and the **last** axis of a Linear output, whatever its rank (a
    Linear on ``[N, H, W, C]``, the ConvNeXt MLP, is corrected over ``N, H, W``). The mean is
    over every element of every batch. Hooks are removed and no bias changes unless every
    batch ran.

    Raises:
        NotCalibratedError: the model has not been calibrated.
        ConfigError: no batch, or NaN/Inf in the data.
        ModelError: the model fails on a batch (the model is left as it was).
    """
    b = _brevitas()
    missing = uncalibrated(model)
    if missing:
        raise NotCalibratedError(f"calibrate the model before bias correction ({missing[0]!r} has no range).")
    batches = _batches(model, data, batch_size)
    layers = _quant_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def correct(name: str, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        off = {"disable_act_quant": True, "disable_weight_quant": True, "disable_bias_quant": True}
        with b["status_manager"](module, is_training=False, **off):
            ref = module.forward(*args)  # .forward, not __call__: no hook recursion
        dim = ref.dim() - 1 if isinstance(module, nn.Linear) else 1
        err = (ref - output).movedim(dim, -1).reshape(-1, ref.shape[dim])  # [elements, channels]
        sums[name] = sums.get(name, 0) + err.sum(0, dtype=torch.float64)
        counts[name] = counts.get(name, 0) + err.shape[0]
        return ref

    handles = [layer.register_forward_hook(functools.partial(correct, name)) for name, layer in layers]
    index = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
                index += 1
    except Exception as exc:
        batch = batches[index] if index < len(batches) else None
        raise _failed("bias correction", index, exc, "no bias was changed and no hook is left.", batch) from exc
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, layer in layers:
            if counts.get(name):
                correction = sums[name] / counts[name]
                if layer.bias is None:  # a layer built outside to_brevitas
                    layer.bias = nn.Parameter(torch.zeros_like(correction, dtype=layer.weight.dtype))
                layer.bias.add_(correction.to(layer.bias.dtype))
    return model


def gptq(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Brevitas's GPTQ on every quant layer over ``data`` (float inputs to each layer); returns ``model``.

    Call it after :func:`calibrate` (and before :func:`bias_correct`). Its Hessians live on the
    model's device.
    """
    _brevitas()
    gptq_mode = importlib.import_module("brevitas.graph.gptq").gptq_mode
    batches = _batches(model, data, batch_size)
    _init_weight_scales(model)  # fixed before GPTQ moves the weights
    with (
        eval_mode(model),
        torch.no_grad(),
        gptq_mode(model, use_quant_activations=False, device=str(input_placement(model)[0])) as g,
    ):
        for _ in range(g.num_layers):
            for x in batches:
                g.model(x)
            g.update()
    return model


@torch.no_grad()
def _rescale(value: torch.Tensor, current: torch.Tensor, target: torch.Tensor, read: Any = None) -> None:
    """Set a Brevitas scale parameter so that the quantizer's scale ``current`` becomes ``target`` exactly.

    The parameter is multiplied by ``target / current``; Brevitas derives the scale from it by a
    division, so the result can miss ``target`` by an ulp. With ``read`` (a function giving the
    quantizer's scale now) the parameter is then nudged one ulp at a time, per element, until the
    scale equals ``target`` bit for bit (a few steps at most), so a carried weight's
    ``q * scale`` equals the simulation's.
    """
    value.mul_((target.reshape(current.shape) / current).reshape(value.shape).to(value.dtype))
    if read is None:
        return
    goal = target.reshape(-1).to(value.dtype)
    for _ in range(8):
        now = read().detach().reshape(-1).to(value.dtype)
        if torch.equal(now, goal):
            return
        toward = torch.where(now < goal, torch.full_like(now, float("inf")), torch.full_like(now, float("-inf")))
        flat = value.detach().reshape(-1)
        moved = torch.where(now == goal, flat, torch.nextafter(flat, toward.expand_as(flat)))
        value.detach().copy_(moved.reshape(value.shape))


def from_sim(
    model: nn.Module, sim: Any, data: CalibrationData, *, plan: BitPlan, act_stats: str = "zq-mse"
) -> nn.Module:
    """Carry a clamping FX simulation's weights and steps into calibrated Brevitas layers.

    ``sim`` is a result of :func:`zq_plugin.reconstruct_fx` or :func:`zq_plugin.finetune` (or
    :func:`zq_plugin.quantize_fx` with ``fold=False``) on ``model`` at the bits of ``plan``; see
    :func:`reconstruct_brevitas` for what is carried: each layer's folded weight and bias and
    its per-channel weight step (Brevitas's round-to-nearest then gives the simulation's
    integers), and the input steps of layers with unsigned inputs; the other activation ranges
    are calibrated on ``data`` with ``act_stats``.

    Args:
        model: the float model the simulation was made from (not changed).
        sim: the FX simulation (not changed).
        data: calibration images (any source).
        plan: the simulation's per-layer bits (``BitPlan.uniform`` for uniform ones).
        act_stats: the statistic of the calibrated activation ranges (:func:`to_brevitas`).

    Returns:
        The calibrated Brevitas model (eval mode); ``.zq_carried`` counts the weight and
        activation steps taken from the simulation and the layers.

    Raises:
        ModelError: a Brevitas layer has no counterpart of the same shape in ``sim``.
        MissingDependencyError: Brevitas is not installed.

    Example:
        >>> import torch, zq_plugin
        >>> from zq_plugin.plan import BitPlan
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> x = torch.randn(32, 1, 8, 8)
        >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=4)
        >>> q = from_sim(net, zq_plugin.quantize_fx(net, x, w_bits=4, a_bits=4, fold=False), x, plan=plan)
        >>> q.zq_carried["weight_steps"], q(torch.randn(2, 1, 8, 8)).shape
        (2, torch.Size([2, 10]))
    """
    from zq_plugin.backends.fx_sim import read_sim

    b = _brevitas()
    layers = read_sim(sim)
    qmodel = to_brevitas(model, plan, act_stats=act_stats, input_grid="affine")
    with torch.no_grad():
        for name, layer in _quant_layers(qmodel):
            source = layers.get(name)
            if source is None or source.weight.shape != layer.weight.shape:
                raise ModelError(
                    f"layer {name!r} has no counterpart of the same shape in the FX simulation; use the FX "
                    "simulation itself (zq_plugin.reconstruct_fx / finetune) for this model."
                )
            layer.weight.copy_(source.weight)
            layer.bias.copy_(source.bias if source.bias is not None else torch.zeros_like(layer.bias))
    calibrate(qmodel, data)  # every quantizer in its calibrated state; the simulation's steps replace the ranges
    steps: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        for name, layer in _quant_layers(qmodel):
            source = layers[name]
            how = steps[name] = {"weight": "calibrated", "input": "calibrated"}
            grid, w_quant = source.weight_grid, layer.weight_quant
            if grid is not None and grid.axis is not None and w_quant.is_quant_enabled:
                bits = int(w_quant.bit_width())
                if (grid.quant_min, grid.quant_max) == quant_range(bits, signed=True, narrow=True):
                    scaler = w_quant.tensor_quant.scaling_impl
                    target = grid.scale.to(layer.weight.device)
                    _rescale(scaler.value, layer.quant_weight().scale, target, lambda q=layer: q.quant_weight().scale)
                    how["weight"] = "carried"
            grid, i_quant = source.input_grid, layer.input_quant
            if grid is None or not i_quant.is_quant_enabled:
                continue
            bits = int(i_quant.bit_width())
            if (grid.quant_min, grid.quant_max) != quant_range(bits, signed=False, narrow=False):
                continue
            scaler = next(m for m in i_quant.modules() if isinstance(m, b["runtime_scaling"]))
            zero_point = next((m for m in i_quant.modules() if isinstance(m, b["runtime_zero_point"])), None)
            if zero_point is None and int(grid.zero_point[0]) != 0:
                continue
            target = grid.scale.to(layer.weight.device)
            _rescale(scaler.value, i_quant.scale(), target, i_quant.scale)
            if zero_point is not None:
                zero_point.value.detach().fill_(float(grid.zero_point[0]) * float(target[0]))
            how["input"] = "carried"
    qmodel.zq_carried = {  # type: ignore[assignment]
        "weight_steps": sum(h["weight"] == "carried" for h in steps.values()),
        "act_steps": sum(h["input"] == "carried" for h in steps.values()),
        "layers": len(steps),
    }
    qmodel.zq_steps = steps  # type: ignore[assignment]
    return qmodel


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple/list/dict output, depth first in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple | list) else ()
    return [t for value in values for t in _tensors(value)]


class _LogitsFirst(nn.Module):
    """Export wrapper: the model's outputs as a flat tuple, the logits (:func:`select_output`) first."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def flatten(output: Any) -> tuple[torch.Tensor, ...]:
        """The logits, then every other tensor of ``output``."""
        logits = select_output(output)
        return (logits, *(t for t in _tensors(output) if t is not logits))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.flatten(self.model(x))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as QCDQ ONNX (TorchScript exporter: int32 bias and sub-8-bit ``Clip`` bounds kept).

    The batch dimension is dynamic. The input is ``"input"``; the outputs are the model's
    tensors flattened (tuple/list order, dict insertion order, nested depth first) with the
    logits of :func:`~zq_plugin._utils.select_output` moved first as ``"output"``, the others
    ``"output_1"``, ``"output_2"``, ... (:func:`run_onnx` returns the first, or all with
    ``all_outputs=True``). ``example`` goes to the model's device. Written to a temporary file
    beside ``path`` and renamed, so a failed export leaves nothing.

    Raises:
        NotCalibratedError: the model has not been calibrated.
        ModelError: the written graph has no ``QuantizeLinear`` (the model ran in float); no file is left.
        MissingDependencyError: onnx or onnxoptimizer is missing.
    """
    _brevitas()
    if uncalibrated(model):
        raise NotCalibratedError("calibrate the model before exporting it (its activation ranges are unset).")
    try:
        export_onnx_qcdq = importlib.import_module("brevitas.export").export_onnx_qcdq
        onnx = importlib.import_module("onnx")
        importlib.import_module("onnxoptimizer")
    except ImportError as exc:
        raise MissingDependencyError(
            "ONNX export needs onnx and onnxoptimizer: pip install 'zq-plugin[onnx]'."
        ) from exc
    example = example.to(input_placement(model)[0])
    with eval_mode(model), torch.no_grad():
        output = model(example)
    flat = _LogitsFirst.flatten(output)
    names = ["output", *(f"output_{i}" for i in range(1, len(flat)))]
    dynamic = {"input": {0: "batch"}, **{n: {0: "batch"} for n, t in zip(names, flat, strict=True) if t.dim() > 0}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), eval_mode(model), torch.no_grad():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(
                model if isinstance(output, torch.Tensor) else _LogitsFirst(model),
                args=example,
                export_path=str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=names,
                dynamic_axes=dynamic,
            )
        ops = {node.op_type for node in onnx.load(str(tmp), load_external_data=False).graph.node}
        if _quant_layers(model) and "QuantizeLinear" not in ops:
            raise ModelError(
                f"the exported graph of {type(model).__name__} has no QuantizeLinear node: the model ran in float "
                "(a Brevitas mode left active?). Nothing was written; rebuild it with to_brevitas and calibrate."
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def _own_weight_zero_points(path: str | os.PathLike[str]) -> str | bytes:
    """``path``, or the model's bytes with each weight ``DequantizeLinear`` given its own zero point.

    The exporters deduplicate equal constants, so layers share one weight zero point; onnxruntime's
    x86 precision mode (``session.x64quantprecision``) rewrites each int8 weight and its zero point
    to uint8 and refuses the second rewrite of a shared one ("Attempt to replace the existing tensor").
    """
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        return str(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    clips = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Clip"}  # QCDQ: weight -> Clip -> DQ
    known = constants.keys() | constant_nodes.keys()
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, copied = [], set()
    for index, node in enumerate(graph.node):
        node = copy.deepcopy(node)
        if (
            node.op_type == "DequantizeLinear"
            and len(node.input) > 2
            and uses[node.input[2]] > 1
            and clips.get(node.input[0], node.input[0]) in known
            and node.input[2] in known
        ):
            zero_point, own = node.input[2], f"{node.input[2]}.{node.name or index}"
            if zero_point in constant_nodes:
                twin = copy.deepcopy(constant_nodes[zero_point])
                twin.name, twin.output[0] = own, own
                nodes.append(twin)
            else:
                graph.initializer.append(copy.deepcopy(constants[zero_point]))
                graph.initializer[-1].name = own
            node.input[2] = own
            copied.add(zero_point)
        nodes.append(node)
    if not copied:
        return str(path)
    orphans = copied - {name for node in nodes for name in node.input}  # copied for every reader
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant" or n.output[0] not in orphans)
    kept = [copy.deepcopy(t) for t in graph.initializer if t.name not in orphans]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.load_external_data_for_model(model, str(Path(path).parent))
    return model.SerializeToString()


@typing.overload
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = ...,
    all_outputs: Literal[False] = ...,
    optimize: bool = ...,
) -> torch.Tensor: ...
@typing.overload
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = ...,
    all_outputs: Literal[True],
    optimize: bool = ...,
) -> list[torch.Tensor]: ...
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = 250,
    all_outputs: bool = False,
    optimize: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    """Run an exported model in onnxruntime (CPU) on ``x`` ``[N, ...]``.

    Returns the first output ``[N, ...]`` (the logits, for a file from :func:`export_onnx`), or
    with ``all_outputs=True`` the list of every output in the file's order, each concatenated
    over the batches. ``x`` may live on any device. ``optimize=False`` turns onnxruntime's graph
    optimizations off: then QDQ patterns are computed as written, as torch computes them; at
    the default level onnxruntime fuses them into integer kernels that round differently (its
    exact U8U8 kernels on x86 CPUs without VNNI, where the faster U8S8 ones saturate).

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> qmodel = to_brevitas(net, w_bits=4, a_bits=4)
        >>> _ = calibrate(qmodel, torch.randn(64, 1, 8, 8))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp + "/m.onnx")
        ...     run_onnx(path, torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependencyError("running ONNX needs onnxruntime: pip install 'zq-plugin[onnx]'.") from exc
    options = ort.SessionOptions()
    # x86 without VNNI (AVX2, AVX-512F): the fused uint8 x int8 kernels add products pairwise in
    # saturating int16 (255 * 127 * 2 > 32767), so full-range 8-bit weights lost up to 1.8 units
    # per output (17 dB); onnxruntime's exact U8U8 kernels instead. No effect on other CPUs.
    options.add_session_config_entry("session.x64quantprecision", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # onnxruntime's WeightBiasQuantization pass rounds a float bias beside Q/DQ weights to int32 with
    # its own scale; the plugin's models keep biases float (as the simulation computes them), so the
    # pass is turned off: the outputs are then PyTorch's (docs/api.md, "exports")
    session = ort.InferenceSession(
        _own_weight_zero_points(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["WeightBiasQuantization"],
    )
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    fixed = isinstance(shape[0], int)  # a traced batch size: run one sample at a time
    step = 1 if fixed else batch_size
    x = x.detach().cpu()
    runs = [session.run(None, {name: x[i : i + step].numpy()}) for i in range(0, len(x), step)]
    outs = [
        torch.cat([torch.from_numpy(r[k]) for r in runs]) if runs[0][k].ndim else torch.from_numpy(runs[0][k])
        for k in range(len(runs[0]))
    ]
    return outs if all_outputs else outs[0]


def describe_layers(qmodel: nn.Module) -> dict[str, tuple[int | None, int | None, str | None]]:
    """``layer -> (w_bits, a_bits, granularity)`` of a Brevitas model, read from its quantizers, in module order."""
    rows: dict[str, tuple[int | None, int | None, str | None]] = {}
    with torch.no_grad():
        for name, layer in _quant_layers(qmodel):
            w_quant, i_quant = layer.weight_quant, layer.input_quant
            w_bits = int(w_quant.bit_width()) if w_quant.is_quant_enabled else None
            a_bits = int(i_quant.bit_width()) if i_quant.is_quant_enabled else None
            granularity = None
            if w_bits is not None:
                granularity = "per_channel" if layer.quant_weight().scale.numel() > 1 else "per_tensor"
            rows[name] = (w_bits, a_bits, granularity)
    return rows


#: A stage x backend composition that lives above the backends now (one release with a warning).
__getattr__ = moved_names(__name__, {"reconstruct_brevitas": "zq_plugin.recipe"}, backend="brevitas")
