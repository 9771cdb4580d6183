"""The PT2E flow: ``torch.export``, ``prepare_pt2e`` / ``prepare_qat_pt2e``, calibration, ``convert_pt2e``.

:func:`quantize_pt2e` in one call; :func:`prepare_qat` and :func:`convert` for training in
between; the BatchNorm ``eps`` that torchao's rewrites overwrite, kept (:func:`restore_batchnorm_eps`,
:func:`move_to_train`, :func:`move_to_eval`).
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import call_model, report_float_layers, weight_layer_names
from zq_plugin.backends.pt2e.quantizer import keep_negative_lobes, plan_quantizer
from zq_plugin.calibration import InputFn, _example_inputs, _to_model, calibrate
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ModelError, NotCalibratedError
from zq_plugin.plan import BitPlan, LayerBits


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception raised inside torch's exporters, for a ModelError message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else type(exc).__name__}"


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
