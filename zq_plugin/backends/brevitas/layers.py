"""Brevitas quant layers from a float model and a plan (:func:`to_brevitas`), and what they hold.

Brevitas is imported lazily (:func:`_brevitas`). Each Conv/ConvTranspose/Linear becomes a
quant layer quantizing its own input and weights at the plan's bits; the plugin's range
statistics can drive Brevitas's activation scaling (:class:`PluginStatistic`). Also the
layers' calibration state (:func:`uncalibrated`; a model that was never calibrated refuses
to run) and :func:`describe_layers`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import warnings
from typing import Any

import torch
from torch import nn

from zq_plugin._utils import WEIGHT_LAYERS, graph_float_ops, input_placement, module_float_ops, report_float_layers
from zq_plugin.backends.brevitas.functional import functional_layers_as_modules
from zq_plugin.errors import ConfigError, MissingDependencyError, ModelError, NotCalibratedError
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
        functional_layers_as_modules(graph, model)  # F.conv2d(x, self.mix.weight): quantized as mix
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


def float_ops_layers(qmodel: nn.Module) -> dict[str, list[str]]:
    """``kind -> node or module names`` of the ops a Brevitas model computes in float, in graph order.

    Every op but Brevitas's own modules (its quant layers and quantizers), weight layers and the
    ops that move no values (``_utils.SHAPE_KINDS``). A traced model (what :func:`to_brevitas`
    and ``from_sim`` build, a graph of Brevitas's tracer) is read from its graph, functional
    calls (``x * gate``, ``a + b``) included; a model without a graph only from its leaf modules:
    its functional calls are not seen.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> float_ops_layers(to_brevitas(net.eval()))
        {'hardswish': ['1'], 'adaptive_avg_pool2d': ['2']}
    """

    def brevitas_module(module: nn.Module | None) -> bool:
        return module is not None and type(module).__module__.startswith("brevitas.")

    if getattr(qmodel, "graph", None) is None:
        return module_float_ops(qmodel, brevitas_module)
    modules = dict(qmodel.named_modules())
    return graph_float_ops(qmodel, lambda n: n.op == "call_module" and brevitas_module(modules.get(str(n.target))))
