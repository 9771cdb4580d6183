"""torchao PT2E backend: a bit plan through ``torch.export`` → ``prepare_pt2e`` → calibrate → ``convert_pt2e``.

PT2E annotates the **inputs** of an operator (integration-notes §2), which is what a
:class:`~zq_plugin.mixed_precision.BitPlan` means by a layer's activation bits
(``LayerBits.a_bits``: the bits of the layer's input). :class:`PlanQuantizer` gives every aten
``conv1d``/``conv2d``/``conv3d``/``linear`` node the input and weight specs of its layer, found
by the node's module path (``nn_module_stack``):

* input: per-tensor affine, ``uint8`` container, ``[0, 2^a - 1]`` (the zero point holds a
  signed input such as a normalized image), the activation observer class;
* weight: per-output-channel symmetric, narrow signed range ``[-(2^(w-1) - 1), 2^(w-1) - 1]``,
  axis 0, the weight observer class.

Layers the plan does not name keep 8 bits, as in the FX emitter. The observers must be
torchao's (``zq_plugin.observers.pt2e``, or torchao's own MinMax): torch.ao observers are
silently left unconverted by ``convert_pt2e``. The converted model's quantize ops clamp to
``quant_min``/``quant_max``, so its accuracy is the real low-bit accuracy. Needs torchao
(``pip install 'zq-plugin[pt2e]'``).

Example:
    >>> import torch, zq_plugin
    >>> from zq_plugin.backends.pt2e import quantize_pt2e
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(144, 3)).eval()
    >>> q = quantize_pt2e(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4, first_last_bits=None)
    >>> q(torch.randn(5, 1, 8, 8)).shape  # any batch size
    torch.Size([5, 3])
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import call_model, report_float_layers, weight_layer_names
from zq_plugin.backends import moved_names
from zq_plugin.backends.fx import InputFn, _example_inputs, _to_model, calibrate
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ConfigError, ModelError, NotCalibratedError
from zq_plugin.plan import BitPlan, LayerBits
from zq_plugin.qparams import quant_range

#: The aten operators :class:`PlanQuantizer` annotates (input 0: activation, input 1: weight).
TARGETS = (
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
)
DEFAULT_BITS = LayerBits(w_bits=8, a_bits=8)


def layer_name(node: torch.fx.Node) -> str:
    """The qualified name of the module that ran ``node`` in the exported model ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception raised inside torch's exporters, for a ModelError message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else type(exc).__name__}"


def _specs(bits: LayerBits, act_observer: Any, weight_observer: Any) -> tuple[Any, Any]:
    ao = _compat.torchao_pt2e()
    a_min, a_max = quant_range(bits.a_bits, signed=False)
    w_min, w_max = quant_range(bits.w_bits, signed=True, narrow=True)
    act = ao.QuantizationSpec(
        dtype=torch.uint8, quant_min=a_min, quant_max=a_max, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=act_observer,
    )  # fmt: skip
    weight = ao.QuantizationSpec(
        dtype=torch.int8, quant_min=w_min, quant_max=w_max, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=weight_observer,
    )  # fmt: skip
    return act, weight


def _observer_class(cls: Any, role: str, per_channel: bool) -> Any:
    """``cls`` if it is a torchao observer class (or ``with_args`` of one) fit for ``role``; else a ConfigError."""
    ao = _compat.torchao_pt2e()
    fix = f"zq_plugin.observers.pt2e.observer_class('mse'{', per_channel=True' if per_channel else ''})"
    base = getattr(getattr(cls, "p", None), "func", cls)  # ``Observer.with_args(...)`` wraps the class
    if not isinstance(base, type):
        raise ConfigError(f"{role}={cls!r}: pass an observer class, e.g. {fix}.")
    if not issubclass(base, ao.ObserverBase):
        raise ConfigError(
            f"{role}={base.__name__} is not a torchao observer: convert_pt2e silently leaves torch.ao observers "
            f"unconverted (the model would stay float). Use zq_plugin.observers.pt2e's, e.g. {fix}."
        )
    if per_channel and "PerChannel" not in base.__name__:
        raise ConfigError(
            f"{role}={base.__name__}: weights are quantized per channel, and torchao passes the channel axis only "
            f"to observer classes whose name contains 'PerChannel'. Use e.g. {fix}."
        )
    return cls


def plan_quantizer(
    plan: BitPlan | None,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    qat: bool = False,
    default: LayerBits = DEFAULT_BITS,
    first_last_bits: int | None = None,
) -> Any:
    """A torchao ``Quantizer`` that annotates each Conv/Linear with its layer's bits in ``plan``.

    Args:
        plan: per-layer bits; layers it does not name get ``default``. ``None``: every layer
            gets ``default`` (a model that calls ``F.conv2d`` / ``F.linear`` itself, whose layers
            no plan can name).
        act_observer: torchao observer class for layer inputs (default torchao's ``MinMaxObserver``;
            e.g. :data:`zq_plugin.observers.pt2e.MSEObserver`).
        weight_observer: torchao per-channel observer class (default ``PerChannelMinMaxObserver``);
            its class name must contain "PerChannel" (torchao passes ``ch_axis`` only then).
        qat: wrap both in torchao's ``FakeQuantize`` (for ``prepare_qat_pt2e``: weights train through
            the straight-through estimator; the weight observer's default axis 0 is the output channel).
        default: the bits of Conv/Linear operators the plan does not name (8 bits).
        first_last_bits: the bits of the first and last Conv/Linear operator in graph order that
            the plan does not name (``None``: ``default`` like the others).

    Raises:
        ConfigError: a per-tensor or non-uniform layer in the plan (not supported by this backend
            yet); an observer that is not a torchao observer class (a torch.ao one would leave the
            model float), or a weight observer whose name lacks "PerChannel".
        MissingDependencyError: torchao is not installed.
    """
    ao = _compat.torchao_pt2e()
    for name, bits in (plan.layers if plan is not None else {}).items():
        if bits.granularity != "per_channel" or bits.grid != "uniform":
            raise ConfigError(
                f"layer {name!r}: the PT2E backend quantizes weights per channel on a uniform grid; "
                f"granularity={bits.granularity!r}, grid={bits.grid!r} are FX-only for now "
                "(use zq_plugin.quantize_fx, or plan.replace_layer(name, granularity='per_channel', grid='uniform'))."
            )
    act_observer = _observer_class(act_observer or ao.MinMaxObserver, "act_observer", per_channel=False)
    weight_observer = _observer_class(weight_observer or ao.PerChannelMinMaxObserver, "weight_observer", True)
    named = plan.layers if plan is not None else {}
    if qat:
        act_observer = ao.FakeQuantize.with_args(observer=act_observer)
        weight_observer = ao.FakeQuantize.with_args(observer=weight_observer)

    class PlanQuantizer(ao.Quantizer):  # type: ignore[name-defined]
        """Conv/Linear inputs and weights at the plan's bits (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.annotated: set[str] = set()  # the module names of the layers it annotated

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            specs: dict[tuple[int, int], tuple[Any, Any]] = {}  # one pair of specs per distinct bits
            layers = [n for n in model.graph.nodes if n.op == "call_function" and n.target in TARGETS]
            edges = {layers[0], layers[-1]} if layers and first_last_bits is not None else set()

            def bits_of(node: torch.fx.Node) -> LayerBits:
                name = _weight_owner(node)
                if name in named:
                    return named[name]
                if node in edges:
                    return LayerBits(w_bits=first_last_bits, a_bits=first_last_bits)  # type: ignore[arg-type]
                return default

            def spec(w_bits: int, a_bits: int) -> tuple[Any, Any]:
                if (w_bits, a_bits) not in specs:
                    specs[w_bits, a_bits] = _specs(
                        LayerBits(w_bits=w_bits, a_bits=a_bits), act_observer, weight_observer
                    )
                return specs[w_bits, a_bits]

            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                if node.target in TARGETS and len(node.args) >= 2:
                    bits = bits_of(node)
                    act, weight = spec(bits.w_bits, bits.a_bits)
                    inputs = {node.args[0]: act, node.args[1]: weight}
                    node.meta["zq_layer"] = _weight_owner(node)  # kept by prepare/convert: describe reads it
                    self.annotated.add(node.meta["zq_layer"])
                else:
                    continue
                node.meta["quantization_annotation"] = ao.QuantizationAnnotation(
                    input_qspec_map=inputs, _annotated=True
                )
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            """Nothing to check beyond the plan (checked when the quantizer was built)."""

    return PlanQuantizer()


_NEGATIVE_LOBE_OPS = frozenset({"hardswish", "silu", "gelu", "mish"})


def keep_negative_lobes(prepared: torch.fx.GraphModule) -> list[str]:
    """Make the observers of Hardswish/SiLU/GELU/Mish outputs keep their minimum; return their names.

    The PT2E twin of :func:`zq_plugin.backends.fx.keep_negative_lobes` (why: there), on the aten
    ops of a ``prepare_pt2e`` or ``prepare_qat_pt2e`` model. Observers without ``keep_min`` are left alone. In place.
    """
    kept = []
    for node in prepared.graph.nodes:
        observer = getattr(prepared, str(node.target), None) if node.op == "call_module" else None
        observer = getattr(observer, "activation_post_process", observer)  # inside a FakeQuantize (QAT)
        source = node.args[0] if node.args else None
        if observer is None or not hasattr(type(observer), "keep_min") or not isinstance(source, torch.fx.Node):
            continue
        op = getattr(source.target, "_opname", "") if source.op == "call_function" else ""
        if str(op).rstrip("_") in _NEGATIVE_LOBE_OPS:
            observer.keep_min = True
            kept.append(str(node.target))
    return kept


def _unfed(observer: Any) -> bool:
    low = getattr(observer, "min_val", None)
    return isinstance(low, torch.Tensor) and (low.numel() == 0 or not bool(torch.isfinite(low).all()))


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``convert_pt2e`` that refuses an uncalibrated model, then eval mode; ``prepared`` is consumed.

    torchao converts an observer that saw no data with ``scale=1, zero_point=0`` and a warning:
    a model that runs and is wrong. This raises instead.

    Raises:
        NotCalibratedError: an observer saw no data (names up to five); calibrate first, e.g.
            ``zq_plugin.calibrate(prepared, data)``.
    """
    ao = _compat.torchao_pt2e()
    unfed = [name for name, m in prepared.named_modules() if isinstance(m, ao.ObserverBase) and _unfed(m)]
    if unfed:
        raise NotCalibratedError(
            f"{len(unfed)} observer(s) of the prepared model saw no data ({', '.join(unfed[:5])}); converting now "
            "would quantize with scale 1. Run calibration first: zq_plugin.calibrate(prepared, data)."
        )
    _running_var_for_torchao_eps(prepared)  # after it torchao's eps is right: nothing to restore later
    left_float = getattr(prepared, "zq_left_float", [])
    converted = ao.convert_pt2e(prepared)
    ao.move_exported_model_to_eval(converted)
    report_float_layers(converted, left_float, "PT2E")
    return converted


def load_program(path: str | os.PathLike[str]) -> Any:
    """``torch.export.load(path)`` of a saved PT2E program, with torchao's q/dq ops registered first.

    Raises:
        MissingDependencyError: torchao is not installed.
    """
    _compat.torchao_pt2e()  # registers the quantized_decomposed ops the program calls
    return torch.export.load(path)


def export_program(converted: torch.fx.GraphModule, example: torch.Tensor) -> Any:
    """A converted PT2E model as a ``torch.export`` program with a dynamic batch, for ``torch.export.save``.

    Load it in any process with ``torch.export.load(path).module()`` after ``import
    torchao.quantization.pt2e`` (which registers the ``quantized_decomposed`` q/dq ops the program calls).

    Raises:
        ModelError: torch.export refused the converted model (its reason is named).
    """
    batch = torch.export.Dim("batch")
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        return torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many kinds; name its reason
        raise ModelError(f"torch.export could not export the converted model ({_reason(exc)}).") from exc


_QUANTIZE_PER_TENSOR = "quantized_decomposed.quantize_per_tensor.default"


def clip_sub_8_bit(converted: torch.fx.GraphModule) -> int:
    """After each activation quantize op narrower than its container, add a clamp to its range; return the count.

    In torch the clamp changes nothing (the quantize op clamps already); ONNX's QuantizeLinear
    clamps to the container (``uint8``: 0..255) only, so without it a 4-bit activation becomes
    8-bit in the file (integration-notes §2). Exported, the clamp is a ``Clip`` on the integer
    tensor, between QuantizeLinear and DequantizeLinear (QCDQ, as Brevitas writes). In place.
    """
    graph, count = converted.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != _QUANTIZE_PER_TENSOR or len(node.args) < 6:
            continue
        qmin, qmax, dtype = int(node.args[3]), int(node.args[4]), node.args[5]
        info = torch.iinfo(dtype)
        if (qmin, qmax) == (info.min, info.max):
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            clipped = graph.call_function(torch.ops.aten.clamp.default, (node, qmin, qmax))
        for user in users:
            user.replace_input_with(node, clipped)
        count += 1
    graph.lint()
    converted.recompile()
    return count


def export_onnx(converted: torch.fx.GraphModule, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a converted PT2E model as QCDQ ONNX that keeps sub-8-bit ranges (``Clip`` after QuantizeLinear).

    The batch dimension is dynamic; weights are stored pre-quantized (their range is exact).
    The file is written atomically; ``converted`` is not changed.

    Returns:
        ``path``; run it with :func:`zq_plugin.backends.brevitas.run_onnx` (onnxruntime only, no Brevitas).

    Raises:
        MissingDependencyError: onnx / onnxscript are not installed (``pip install 'zq-plugin[onnx]'``).
        ModelError: the exporter refused the model (its reason is named).
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        from zq_plugin.errors import MissingDependencyError

        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript ({err}): pip install 'zq-plugin[onnx]'."
        ) from err
    from zq_plugin.data import atomic_write

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        module = copy.deepcopy(converted)
    clip_sub_8_bit(module)
    batch = torch.export.Dim("batch")
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress notes
            program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # the exporter raises many kinds; name its reason
        raise ModelError(f"torch.onnx.export could not export the converted model ({_reason(exc)}).") from exc
    if program is None:  # dynamo=True returns the program; a future torch that does not is named, not asserted
        raise ModelError("torch.onnx.export returned no ONNX program; export with torch's own torch.onnx.export.")
    proto = program.model_proto
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return Path(path)


def export_for_pt2e(model: nn.Module, example: tuple[Any, ...]) -> torch.fx.GraphModule:
    """``torch.export`` of an eval-mode copy of ``model`` with a dynamic batch dimension on tensor inputs.

    Raises:
        ModelError: ``torch.export`` rejected the model (its reason is named).
    """
    batch = torch.export.Dim("batch")
    tensors = [isinstance(x, torch.Tensor) and x.dim() > 0 for x in example]
    # a batch of one would be specialized to 1 by torch.export: show it two
    example = tuple(
        x.repeat(2, *[1] * (x.dim() - 1)) if t and x.shape[0] == 1 else x for x, t in zip(example, tensors, strict=True)
    )
    shapes = tuple({0: batch} if t else None for t in tensors)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():  # inputs that do not fit the model get a named error, not torch.export's
        call_model(model, example, 0, "PT2E export")
    try:
        return torch.export.export(model, example, dynamic_shapes=shapes).module()
    except Exception as exc:  # torch.export raises many kinds; name its reason
        raise ModelError(
            f"torch.export could not export {type(model).__name__} for PT2E ({_reason(exc)}). "
            "Make forward traceable by torch.export (no data-dependent Python control flow), or use "
            "zq_plugin.quantize_fx."
        ) from exc


def quantize_pt2e(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    plan: BitPlan | None = None,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    batch_size: int = 64,
    input_fn: InputFn | None = None,
) -> torch.fx.GraphModule:
    """Quantize ``model`` through torchao PT2E: export, ``prepare_pt2e``, calibrate on ``data``, ``convert_pt2e``.

    Args:
        model: float model (BatchNorm is folded by ``prepare_pt2e``); not changed.
        data: calibration data (any source: tensor, dataset, loader, ``SyntheticDataset``).
        w_bits: weight bits of all but the first/last layer (ignored with ``plan``).
        a_bits: input activation bits of all but the first/last layer (ignored with ``plan``).
        plan: per-layer bits instead (:class:`~zq_plugin.mixed_precision.BitPlan`).
        first_last_bits: bits of the first and last Conv/Linear (``None``: like the others).
        act_observer: torchao observer class for layer inputs (see :func:`plan_quantizer`).
        weight_observer: torchao per-channel observer class for weights.
        batch_size: calibration batch size for tensor data.
        input_fn: maps a batch to the model's positional inputs (see :func:`zq_plugin.calibrate`).

    Returns:
        The converted exported module (q/dq nodes at the plan's ranges), in eval mode; any batch size.

    Raises:
        ConfigError: bad bits or plan, no calibration data.
        ModelError: the model does not export.
        MissingDependencyError: torchao is not installed.
    """
    bits = {"w_bits": w_bits, "a_bits": a_bits, "plan": plan, "first_last_bits": first_last_bits}
    observers = {"act_observer": act_observer, "weight_observer": weight_observer}
    return convert(_prepared(model, data, bits, observers, batch_size, input_fn, qat=False))


def restore_batchnorm_eps(prepared: torch.fx.GraphModule, model: nn.Module | None = None) -> list[str]:
    """Give each BatchNorm of a ``prepare_qat_pt2e`` model its own ``eps`` and ``momentum`` back; return their names.

    torchao writes ``eps=1e-5`` and ``momentum=0.1`` into every BatchNorm it rewrites: its QAT
    Conv+BN pattern ("TODO: allow setting eps"), in the ``batch_norm`` op and in the running
    standard deviation ``sqrt(running_var + eps)`` that scales the weight before its fake
    quantizer, and again at every ``move_exported_model_to_train`` / ``_eval`` ("fails to
    support custom momentum and eps value"); ``convert_pt2e`` then folds with that ``eps``. A
    model built with another ``eps`` changes function: torchvision's GoogLeNet (``eps=1e-3``,
    BN variances near 0.01 when warmed on noise) was off by up to 5 % per channel in every
    layer, and its converted W8A8 logits only 0.40 cosine-similar to float.

    With ``model``, each ``batch_norm`` node is matched to its module by the name of its weight
    (``<module>.weight``) and the values are kept on ``prepared`` (``zq_batchnorm``); without,
    the kept values are written again (after a mode switch: :func:`move_to_train`,
    :func:`move_to_eval` and :func:`convert` do it). In place.
    """
    kept: dict[str, tuple[float, float | None]] = getattr(prepared, "zq_batchnorm", {})
    if model is not None:
        for node in prepared.graph.nodes:
            weight = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
            if node.target is not torch.ops.aten.batch_norm.default or getattr(weight, "op", None) != "get_attr":
                continue
            owner = str(weight.target).rpartition(".")[0]  # type: ignore[union-attr]
            try:
                bn = model.get_submodule(owner)
            except AttributeError:
                continue
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                momentum = None if bn.momentum is None else float(bn.momentum)
                kept[str(weight.target)] = (float(bn.eps), momentum)  # type: ignore[union-attr]
        prepared.zq_batchnorm = kept  # type: ignore[assignment]
    restored = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default or len(node.args) < 8:
            continue
        weight = node.args[1]
        key = str(weight.target) if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else ""
        if key not in kept:
            continue
        eps, momentum = kept[key]
        args = list(node.args)
        old_eps, args[7] = args[7], eps
        if momentum is not None:
            args[6] = momentum
        node.args = tuple(args)
        running_var = node.args[4]
        for user in list(running_var.users) if isinstance(running_var, torch.fx.Node) else []:
            if user.target is torch.ops.aten.add.Tensor and len(user.args) == 2 and user.args[1] == old_eps:
                user.args = (user.args[0], eps)  # the running std that scales the weight
        restored.append(key.rpartition(".")[0])
    prepared.recompile()
    return restored


_TORCHAO_BN_EPS = 1e-5  # the eps torchao's BatchNorm rewrites write


@torch.no_grad()
def _running_var_for_torchao_eps(prepared: torch.fx.GraphModule) -> None:
    """Before ``convert_pt2e``: ``running_var += eps - 1e-5`` and ``eps = 1e-5``, the same BatchNorm in eval mode.

    ``convert_pt2e`` replaces each QAT Conv+BN pattern by a fresh one with torchao's ``eps=1e-5``
    and folds it; with the variance shifted, ``sqrt(running_var + 1e-5)`` is the model's own
    ``sqrt(running_var + eps)``, so the fold is the model's. ``prepared`` is consumed.
    """
    kept = getattr(prepared, "zq_batchnorm", {})
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default or len(node.args) < 8:
            continue
        weight, running_var = node.args[1], node.args[4]
        key = str(weight.target) if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else ""
        if key not in kept or not isinstance(running_var, torch.fx.Node) or running_var.op != "get_attr":
            continue
        eps = kept[key][0]
        prepared.get_buffer(str(running_var.target)).add_(eps - _TORCHAO_BN_EPS)
        for user in list(running_var.users):
            if user.target is torch.ops.aten.add.Tensor and len(user.args) == 2 and user.args[1] == eps:
                user.args = (user.args[0], _TORCHAO_BN_EPS)
        node.args = (*node.args[:7], _TORCHAO_BN_EPS, *node.args[8:])
    prepared.recompile()


def move_to_train(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Training mode, as torchao's ``move_exported_model_to_train``, each BatchNorm's ``eps`` kept.

    torchao's switch writes ``eps=1e-5`` into every BatchNorm (:func:`restore_batchnorm_eps`).
    """
    _compat.torchao_pt2e().move_exported_model_to_train(prepared)
    restore_batchnorm_eps(prepared)
    return prepared


def move_to_eval(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Eval mode, as torchao's ``move_exported_model_to_eval``, each BatchNorm's ``eps`` kept.

    torchao's switch writes ``eps=1e-5`` into every BatchNorm (:func:`restore_batchnorm_eps`).
    """
    _compat.torchao_pt2e().move_exported_model_to_eval(prepared)
    restore_batchnorm_eps(prepared)
    return prepared


def _prepared(
    model: nn.Module,
    data: CalibrationData,
    bits: dict[str, Any],
    observers: dict[str, Any],
    batch_size: int,
    input_fn: InputFn | None,
    *,
    qat: bool,
) -> torch.fx.GraphModule:
    """Export, ``prepare_pt2e`` / ``prepare_qat_pt2e`` with the plan's quantizer, keep negative lobes, calibrate.

    ``bits`` holds ``plan``; the uniform ``w_bits``/``a_bits``/``first_last_bits`` are read only
    when ``plan`` is ``None``.
    """
    from zq_plugin._utils import weight_layers

    ao = _compat.torchao_pt2e()
    plan, uniform = bits["plan"], cast(dict[str, Any], {})
    if plan is not None:
        plan.check(model)
    elif weight_layers(model):
        plan = BitPlan.uniform(
            model, w_bits=bits["w_bits"], a_bits=bits["a_bits"], first_last_bits=bits["first_last_bits"]
        )
    else:  # Conv/Linear by functional calls only: uniform bits by operator, first and last in graph order
        uniform = {"default": LayerBits(w_bits=bits["w_bits"], a_bits=bits["a_bits"])}
        uniform["first_last_bits"] = bits["first_last_bits"]
    quantizer = plan_quantizer(plan, qat=qat, **observers, **uniform)
    example = _to_model(_example_inputs(data, batch_size, input_fn), model)
    prepare = ao.prepare_qat_pt2e if qat else ao.prepare_pt2e
    prepared = prepare(export_for_pt2e(model, example), quantizer)
    prepared.zq_left_float = [n for n in weight_layer_names(model) if n not in quantizer.annotated]
    # torchao's QAT rewrites give every BatchNorm eps=1e-5 (restore_batchnorm_eps); restoring the
    # model's eps here made eval-mode calibration of torchvision's MobileNetV3 and EfficientNet
    # record ranges of 1e5 (issue 16, open), so the QAT path keeps torchao's values for now
    keep_negative_lobes(prepared)
    calibrate(prepared, data, batch_size=batch_size, input_fn=input_fn)
    return prepared


def prepare_qat(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    plan: BitPlan | None = None,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    batch_size: int = 64,
    input_fn: InputFn | None = None,
) -> torch.fx.GraphModule:
    """A ``prepare_qat_pt2e`` model of ``model`` at the plan's bits, its ranges calibrated on ``data``, in train mode.

    Train it as any model (its weights and BN fold learn through FakeQuantize's straight-through
    estimator; the observers keep updating the ranges), then :func:`convert` it. Arguments as
    :func:`quantize_pt2e`; the source model is not changed.

    Raises:
        ConfigError: bad bits or plan, no calibration data.
        ModelError: the model does not export.
        MissingDependencyError: torchao is not installed.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 3)).eval()
        >>> qat = prepare_qat(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4, first_last_bits=None)
        >>> torch.optim.SGD(qat.parameters(), lr=0.01).zero_grad()  # ... train ...
        >>> convert(qat)(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """
    bits = {"w_bits": w_bits, "a_bits": a_bits, "plan": plan, "first_last_bits": first_last_bits}
    observers = {"act_observer": act_observer, "weight_observer": weight_observer}
    prepared = _prepared(model, data, bits, observers, batch_size, input_fn, qat=True)
    return move_to_train(prepared)


@functools.cache
def _preset_observer_class() -> type:
    """The class of :func:`carry_steps`'s observers, built on first use (torchao's base is an extra)."""
    ao = _compat.torchao_pt2e()

    class PresetObserver(ao.ObserverBase):  # type: ignore[name-defined]
        """An observer that records nothing and converts with given ``(scale, zero_point)`` (learned steps).

        Takes ``dtype``, ``qscheme``, ``quant_min``/``quant_max`` and ``ch_axis`` from the observer it
        replaces, so ``convert_pt2e`` writes the same q/dq ops with the given parameters.
        """

        def __init__(self, like: Any, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
            super().__init__(dtype=like.dtype, is_dynamic=False)
            self.qscheme = like.qscheme
            self.quant_min, self.quant_max = int(like.quant_min), int(like.quant_max)
            self.ch_axis = getattr(like, "ch_axis", None)
            self.scale: torch.Tensor
            self.zero_point: torch.Tensor
            self.register_buffer("scale", scale.detach().clone().float().reshape(-1))
            self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int64).reshape(-1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """``x`` unchanged."""
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The given ``(scale, zero_point)``."""
            return self.scale, self.zero_point

    return PresetObserver


def _same_grid(grid: Any, observer: Any) -> bool:
    """A simulation :class:`~zq_plugin.backends.fx_sim.Grid` and a torchao observer with the same range and axis."""
    if grid is None or (int(grid.quant_min), int(grid.quant_max)) != (int(observer.quant_min), int(observer.quant_max)):
        return False
    axis = getattr(observer, "ch_axis", None) if "PerChannel" in type(observer).__name__ else None
    return grid.axis == (None if axis is None else int(axis))


def _weight_owner(node: torch.fx.Node) -> str:
    """The model layer a conv/linear node computes: its weight's owner (``fc`` for ``F.linear(x, self.fc.weight)``)."""
    weight = node.args[1] if len(node.args) > 1 else None
    while isinstance(weight, torch.fx.Node) and weight.op == "call_module" and weight.args:
        weight = weight.args[0]  # the weight's observer
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return str(weight.target).rpartition(".")[0] or str(weight.target)
    return layer_name(node)


def carry_steps(prepared: torch.fx.GraphModule, sim: torch.fx.GraphModule) -> dict[str, dict[str, str]]:
    """Give a ``prepare_pt2e`` model the simulation's steps where both quantize the same tensor; in place.

    For every Conv/Linear node of ``prepared`` whose layer is a layer of ``sim`` (read through
    :func:`zq_plugin.backends.fx_sim.read_sim`), its **weight** observer is replaced by one that
    converts with the simulation's weight steps and its **input** observer by one with the
    simulation's input ``(scale, zero_point)``, when the integer ranges and axes match (both
    quantize the layer's input: the same tensor). Returns ``layer -> {"weight": how, "input": how}``
    with ``how`` one of ``"carried"``, ``"calibrated"`` (the grids differ, or the simulation has
    none: the observer's own statistics stay).
    """
    from zq_plugin.backends.fx_sim import read_sim

    preset = _preset_observer_class()
    layers = read_sim(sim)
    report: dict[str, dict[str, str]] = {}
    for node in list(prepared.graph.nodes):
        if node.op != "call_function" or node.target not in TARGETS or len(node.args) < 2:
            continue
        name = _weight_owner(node)
        layer = layers.get(name)
        how = report.setdefault(name, {"weight": "calibrated", "input": "calibrated"})
        for role, obs_node, grid in (
            ("weight", node.args[1], layer.weight_grid if layer is not None else None),
            ("input", node.args[0], layer.input_grid if layer is not None else None),
        ):
            if not isinstance(obs_node, torch.fx.Node) or obs_node.op != "call_module":
                continue
            observer = getattr(prepared, str(obs_node.target), None)
            if observer is not None and grid is not None and _same_grid(grid, observer):
                setattr(prepared, str(obs_node.target), preset(observer, grid.scale, grid.zero_point))
                how[role] = "carried"
    return report


def from_sim(
    model: nn.Module,
    sim: torch.fx.GraphModule,
    data: CalibrationData,
    *,
    plan: BitPlan,
    batch_size: int = 64,
) -> torch.fx.GraphModule:
    """Carry a clamping FX simulation's weights and steps into a converted PT2E model.

    ``sim`` is a result of :func:`zq_plugin.reconstruct_fx`, :func:`zq_plugin.finetune` or
    :func:`zq_plugin.quantize_fx` (``fold=False``: its layers keep their weight FakeQuantize)
    on ``model`` with the same ``plan`` (so that FX, too, quantizes each layer's input at its
    ``a_bits``):

    1. the model with BatchNorm folded into its convolutions (as the simulation has it) gets the
       simulation's weights and biases (a weight that is ``s * q`` on its grid quantizes back
       to ``q`` bit for bit; a fine-tuned float weight rounds as the simulation rounds it);
    2. it is exported and prepared with :func:`plan_quantizer` at ``plan``, calibrated on
       ``data`` with the MSE observers (for what the simulation has no step for, e.g. the
       inputs of a residual ``add``);
    3. :func:`carry_steps` sets each layer's weight steps and input ``(scale, zero_point)`` to
       the simulation's; then :func:`convert`.

    Args:
        model: the float model the simulation was made from (not changed).
        sim: the FX simulation (not changed).
        data: calibration images (any source) for the steps the simulation does not have.
        plan: the per-layer bits the simulation was made with.
        batch_size: calibration batch size for tensor data.

    Returns:
        The converted model (eval mode, any batch size); ``.zq_carried`` counts the weight and
        input steps taken from the simulation. Its logits differ from the simulation's by the
        FakeQuantize FX puts on the last layer's output.

    Raises:
        ConfigError, ModelError: as :func:`quantize_pt2e`.
        MissingDependencyError: torchao is not installed.

    Example:
        >>> import torch, zq_plugin
        >>> from zq_plugin.plan import BitPlan
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> x = torch.randn(32, 1, 8, 8)
        >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)
        >>> q = from_sim(net, zq_plugin.quantize_fx(net, x, plan=plan, fold=False), x, plan=plan)
        >>> q(torch.randn(3, 1, 8, 8)).shape, q.zq_carried
        (torch.Size([3, 10]), {'weight_steps': 2, 'act_steps': 2})
    """
    from torch.fx.experimental.optimization import fuse

    from zq_plugin.backends.fx_sim import read_sim
    from zq_plugin.observers import pt2e as observers

    _compat.torchao_pt2e()
    plan.check(model)
    folded = fuse(copy.deepcopy(model).eval(), inplace=True)
    layers = read_sim(sim)
    with torch.no_grad():
        for name, layer in folded.named_modules():
            source = layers.get(name) if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) else None
            if source is None or source.weight.shape != layer.weight.shape:
                continue
            layer.weight.copy_(source.weight)
            if layer.bias is not None and source.bias is not None:
                layer.bias.copy_(source.bias)
    bits = {"plan": plan.traced(folded)}  # with a plan, _prepared reads no uniform bits
    chosen = {"act_observer": observers.MSEObserver, "weight_observer": observers.PerChannelMSEObserver}
    prepared = _prepared(folded, data, bits, chosen, batch_size, None, qat=False)
    carried = carry_steps(prepared, sim)
    converted = convert(prepared)
    converted.zq_carried = {  # type: ignore[assignment]
        "weight_steps": sum(h["weight"] == "carried" for h in carried.values()),
        "act_steps": sum(h["input"] == "carried" for h in carried.values()),
    }
    converted.zq_steps = carried  # type: ignore[assignment]
    return converted


def _grid_bits(node: Any, qmin_index: int) -> tuple[int | None, str | None]:
    """``(bits, granularity)`` of a dequantize node (its ``quant_min``/``quant_max``); else ``(None, None)``."""
    import math

    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or "dequantize" not in str(node.target):
        return None, None
    per_channel = "per_channel" in str(node.target)
    index = qmin_index + (1 if per_channel else 0)  # dequantize_per_channel has an axis before the range
    levels = int(cast(int, node.args[index + 1])) - int(cast(int, node.args[index])) + 1
    return max(1, math.ceil(math.log2(levels))), "per_channel" if per_channel else "per_tensor"


def describe_converted(converted: torch.fx.GraphModule) -> dict[str, tuple[int | None, int | None, str | None]]:
    """``layer -> (w_bits, a_bits, granularity)`` of a converted PT2E model, read from its q/dq nodes, in graph order.

    A Conv/Linear whose weight or input is not dequantized from integers reports ``None`` there.
    """
    rows: dict[str, tuple[int | None, int | None, str | None]] = {}
    for node in converted.graph.nodes:
        if node.op != "call_function" or node.target not in TARGETS or len(node.args) < 2:
            continue
        w_bits, granularity = _grid_bits(node.args[1], 3)
        a_bits, _ = _grid_bits(node.args[0], 3)
        rows.setdefault(node.meta.get("zq_layer") or _weight_owner(node), (w_bits, a_bits, granularity))
    return rows


#: A stage x backend composition that lives above the backends now (one release with a warning).
__getattr__ = moved_names(__name__, {"reconstruct_pt2e": "zq_plugin.recipe"}, backend="pt2e")
