"""Brevitas backend: a float model + a BitPlan -> Brevitas quant layers, calibrated, bias-corrected, exported.

Steps (integration-notes §3; Brevitas is imported lazily and is an optional extra):

1. :func:`to_brevitas`: a **deep copy** of the model goes through Brevitas's
   ``preprocess_for_quantize`` (BatchNorm merged into the convs; it rewrites weights in place,
   so the original is never handed to it; ReLU6 is kept) and ``layerwise_quantize``: each
   Conv/Linear becomes ``QuantConv*d``/``QuantLinear`` quantizing its own **input** and its
   weights at the plan's bits. Weights are symmetric narrow, per output channel (depthwise
   convs need it) or per tensor as the plan says; the bias is int32. A layer's input is
   unsigned when it comes from a ReLU/ReLU6 (through pooling or reshapes), signed otherwise
   (the image, a linear bottleneck, a residual sum).
2. :func:`calibrate`: Brevitas's ``calibration_mode`` over any loader (the backend does not
   know which synthesizer made the data). Until then the model refuses to run
   (:class:`~zq_plugin.errors.NotCalibratedError`): an uncalibrated Brevitas activation
   quantizer silently uses threshold 1.0.
3. :func:`bias_correct` (``bias_correction_mode``) and optionally :func:`gptq` (``gptq_mode``).
4. :func:`export_onnx`: QCDQ ONNX (sub-8-bit ranges kept as ``Clip`` bounds) and
   :func:`run_onnx` to check it in onnxruntime.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> qmodel = to_brevitas(net, w_bits=4, a_bits=4, first_last_bits=None)
    >>> qmodel = calibrate(qmodel, torch.randn(64, 1, 8, 8))
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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zq_plugin._utils import WEIGHT_LAYERS, eval_mode
from zq_plugin.data import CalibrationData, collect_batches
from zq_plugin.errors import ConfigError, MissingDependencyError, ModelError, NotCalibratedError
from zq_plugin.mixed_precision.plan import BitPlan
from zq_plugin.qparams import quant_range

logger = logging.getLogger(__name__)

_PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    *(nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity),
)
_PASS_THROUGH_FUNCTIONS = {"flatten", "reshape", "view", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "dropout"}
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax)
_NONNEGATIVE_FUNCTIONS = {"relu", "relu6", "relu_", "sigmoid", "softmax"}


PLUGIN_STATS = ("zq-mse", "zq-percentile", "zq-aciq", "zq-entropy")


def _plugin_range(name: str) -> Any:
    """The :mod:`zq_plugin.observers.stats` range function behind a ``"zq-..."`` statistic name."""
    from zq_plugin.observers import stats

    return {
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
        return threshold.reshape(()).to(x.dtype).clamp_min(torch.finfo(torch.float32).eps)


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
            standalone = importlib.import_module("brevitas.core.scaling.standalone")
            enum = importlib.import_module("brevitas.inject.enum")
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
        "bias_correction_mode": calibrate_mod.bias_correction_mode,
        "quant": quant,
        "runtime_scaling": standalone.ParameterFromRuntimeStatsScaling,
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


def _layer_kwargs(plan: BitPlan, unsigned: dict[str, bool], act_stats: str, b: dict[str, Any]) -> dict[str, Any]:
    """Brevitas layer keyword arguments, evaluated per module name (lambdas, as ``layerwise_quantize`` needs)."""
    quant, stats_op = b["quant"], b["StatsOp"]
    per_channel = quant.Int8WeightPerChannelFloat.let(scaling_impl=b["param_from_stats"])  # GPTQ-ready scales
    per_tensor = quant.Int8WeightPerTensorFloat.let(scaling_impl=b["param_from_stats"])
    if act_stats == "max":
        signed_act = quant.Int8ActPerTensorFloat.let(scaling_stats_op=stats_op.MAX)
        unsigned_act = quant.Uint8ActPerTensorFloat.let(scaling_stats_op=stats_op.MAX)
    elif act_stats == "percentile":
        signed_act, unsigned_act = quant.Int8ActPerTensorFloat, quant.Uint8ActPerTensorFloat
    elif act_stats == "mse":
        signed_act, unsigned_act = quant.Int8ActPerTensorFloatMSE, quant.Uint8ActPerTensorFloatMSE
    elif act_stats in PLUGIN_STATS:
        signed_act = quant.Int8ActPerTensorFloat.let(scaling_stats_impl=PluginStatistic, zq_statistic=act_stats)
        unsigned_act = quant.Uint8ActPerTensorFloat.let(scaling_stats_impl=PluginStatistic, zq_statistic=act_stats)
    else:
        raise ConfigError(
            f"act_stats={act_stats!r}: use 'max', 'percentile' (Brevitas's 99.999 %), 'mse' (Brevitas's), "
            f"or one of the plugin's statistics {PLUGIN_STATS}."
        )
    layers = plan.layers

    def bits(name: str, field: str) -> int:
        return int(getattr(layers[name], field)) if name in layers else 8

    return {
        "weight_quant": lambda module, name: (
            per_tensor if name in layers and layers[name].granularity == "per_tensor" else per_channel
        ),
        "weight_bit_width": lambda module, name: bits(name, "w_bits"),
        "input_quant": lambda module, name: unsigned_act if unsigned.get(name, False) else signed_act,
        "input_bit_width": lambda module, name: bits(name, "a_bits"),
        "bias_quant": b["quant"].Int32Bias,
        "return_quant_tensor": False,
    }


def to_brevitas(
    model: nn.Module,
    plan: BitPlan | None = None,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    first_last_bits: int | None = 8,
    act_stats: str = "max",
) -> nn.Module:
    """A Brevitas copy of ``model`` with the plan's weight and input bits (the original is untouched).

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

    Returns:
        The Brevitas model in eval mode; :func:`calibrate` it before use.

    Raises:
        ConfigError: a plan naming layers the model does not have, or a non-Conv/Linear layer
            (the message lists the supported types), or a non-uniform grid.
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
        kwargs = _layer_kwargs(plan, unsigned, act_stats, b)
        qnn = b["qnn"]
        layer_map = {
            nn.Conv1d: (qnn.QuantConv1d, kwargs),
            nn.Conv2d: (qnn.QuantConv2d, kwargs),
            nn.Conv3d: (qnn.QuantConv3d, kwargs),
            nn.Linear: (qnn.QuantLinear, kwargs),
        }
        qmodel = b["layerwise_quantize"](graph, compute_layer_map=layer_map)
    qmodel.eval()
    qmodel.zq_plan = plan
    # the activation scalers, listed once (a plain attribute: deepcopy-safe, not a submodule)
    qmodel.zq_scalers = [m for m in qmodel.modules() if isinstance(m, b["runtime_scaling"])]
    qmodel.register_forward_pre_hook(_require_calibration)
    return qmodel


def _seen_no_data(scaler: Any) -> bool:
    """True for a Brevitas runtime-statistics scaler whose statistics counter never moved."""
    return int(scaler.counter) == 0


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of activation quantizers of ``model`` that never saw calibration data."""
    cls = _brevitas()["runtime_scaling"]
    return [n for n, m in model.named_modules() if isinstance(m, cls) and _seen_no_data(m)]


def _require_calibration(model: nn.Module, _args: Any) -> None:
    scalers: list[nn.Module] = getattr(model, "zq_scalers", [])
    if not model.training and any(_seen_no_data(m) and not m.training for m in scalers):
        raise NotCalibratedError(
            "this Brevitas model has not been calibrated: its activation quantizers would run with Brevitas's "
            "default threshold 1.0. Call zq_plugin.backends.brevitas.calibrate(model, data) first."
        )


def _run(model: nn.Module, mode: Any, batches: list[torch.Tensor]) -> nn.Module:
    """Run ``model`` over ``batches`` in eval mode, without grad, inside a Brevitas ``mode`` context."""
    with eval_mode(model), torch.no_grad(), mode:
        for x in batches:
            model(x)
    return model


def calibrate(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Collect activation ranges over ``data`` in Brevitas's ``calibration_mode``; returns ``model``."""
    return _run(model, _brevitas()["calibration_mode"](model), collect_batches(data, batch_size))


def bias_correct(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Brevitas's ``bias_correction_mode``: shift each layer's bias by its mean output error over ``data``."""
    return _run(model, _brevitas()["bias_correction_mode"](model), collect_batches(data, batch_size))


def gptq(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Brevitas's GPTQ on every quant layer over ``data`` (float inputs to each layer); returns ``model``.

    Call it after :func:`calibrate` (and before :func:`bias_correct`).
    """
    _brevitas()
    gptq_mode = importlib.import_module("brevitas.graph.gptq").gptq_mode
    batches = collect_batches(data, batch_size)
    _run(model, contextlib.nullcontext(), batches[:1])  # initialises the weight scales (calibration ran unquantized)
    with eval_mode(model), torch.no_grad(), gptq_mode(model, use_quant_activations=False) as g:
        for _ in range(g.num_layers):
            for x in batches:
                g.model(x)
            g.update()
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as QCDQ ONNX (TorchScript exporter: int32 bias and sub-8-bit ``Clip`` bounds kept).

    The batch dimension is dynamic (input ``"input"``, output ``"output"``). Written to a
    temporary file beside ``path`` and renamed, so a failed export leaves nothing.
    """
    _brevitas()
    if uncalibrated(model):
        raise NotCalibratedError("calibrate the model before exporting it (its activation ranges are unset).")
    try:
        export_onnx_qcdq = importlib.import_module("brevitas.export").export_onnx_qcdq
        importlib.import_module("onnx")
        importlib.import_module("onnxoptimizer")
    except ImportError as exc:
        raise MissingDependencyError(
            "ONNX export needs onnx and onnxoptimizer: pip install 'zq-plugin[onnx]'."
        ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), eval_mode(model), torch.no_grad():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(
                model,
                args=example,
                export_path=str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def run_onnx(path: str | os.PathLike[str], x: torch.Tensor, *, batch_size: int = 250) -> torch.Tensor:
    """Run an exported model in onnxruntime (CPU) on ``x`` ``[N, ...]``; returns the outputs ``[N, ...]``."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependencyError("running ONNX needs onnxruntime: pip install 'zq-plugin[onnx]'.") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    fixed = isinstance(shape[0], int)  # a traced batch size: run one sample at a time
    step = 1 if fixed else batch_size
    outs = [torch.from_numpy(session.run(None, {name: x[i : i + step].numpy()})[0]) for i in range(0, len(x), step)]
    return torch.cat(outs)
