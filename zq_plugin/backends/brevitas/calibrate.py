"""Brevitas's ``calibration_mode`` over any data, continued across calls (:func:`calibrate`).

Also the batching and error naming that the other Brevitas steps share (:func:`_batches`,
:func:`_failed`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zq_plugin._utils import CalibrationSummary, eval_mode, forward_error, input_placement, place
from zq_plugin.backends.brevitas.layers import _act_scalers, _brevitas, _quant_layers, _steps
from zq_plugin.data import CalibrationData, collect_batches
from zq_plugin.errors import ConfigError, ModelError, ZQError


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
