"""The generic calibration loop: batches of any data source into any model, and the FX trace check.

Not tied to a backend: the FX flow, PT2E (``prepare_pt2e`` models) and users' own prepared
models are all calibrated by :func:`calibrate`. A batch is ``x`` or ``(x, label, ...)``
(:func:`batch_inputs`); tensors and :class:`~zq_plugin.data.SyntheticDataset` are cut into
batches, loaders and iterables are read as they come. :func:`check_traceable` names why
``torch.fx`` cannot trace a model, for the flows that need a graph.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from zq_plugin._utils import CalibrationSummary, call_model, eval_mode, input_placement, place
from zq_plugin.data import CalibrationData, SyntheticDataset, iter_batches
from zq_plugin.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


InputFn = Callable[[Any], Any]


def batch_inputs(batch: Any, input_fn: InputFn | None = None) -> tuple[Any, ...]:
    """The positional model inputs of one calibration batch.

    The rule: a batch is ``x`` or ``(x, label, ...)`` and the model gets ``x``; ``input_fn(batch)``
    (a tensor or a tuple of positional inputs) overrides it for models with extra inputs.

    Raises:
        ConfigError: a batch (or what ``input_fn`` returned) holds no tensor input.
    """
    if input_fn is not None:
        picked = input_fn(batch)
        inputs = tuple(picked) if isinstance(picked, tuple | list) else (picked,)
    else:
        inputs = (batch[0] if isinstance(batch, tuple | list) and batch else batch,)
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        what = "input_fn returned" if input_fn is not None else "a calibration batch is"
        raise ConfigError(
            f"{what} {type(inputs[0] if inputs else None).__name__}, not a tensor: batches are x or (x, label, ...); "
            "pass input_fn=lambda batch: (x, extra, ...) for a model with several inputs."
        )
    return inputs


def _raw_batches(data: CalibrationData, batch_size: int) -> Iterable[Any]:
    """Image batches of a tensor or SyntheticDataset; the batches of a loader or iterable as they come."""
    if isinstance(data, torch.Tensor | SyntheticDataset):
        return iter_batches(data, batch_size)
    return data


def _to_model(inputs: tuple[Any, ...], model: nn.Module) -> tuple[Any, ...]:
    """``inputs`` on the model's device, floating tensors in its parameters' dtype."""
    device, dtype = input_placement(model)
    return tuple(place(t, device, dtype) for t in inputs)


def calibrate(
    prepared: nn.Module,
    data: CalibrationData,
    *,
    batch_size: int = 64,
    max_batches: int | None = None,
    input_fn: InputFn | None = None,
) -> CalibrationSummary:
    """Run a prepared model over calibration data so its observers record ranges (in place).

    Runs in eval mode (BN running statistics are not updated, even for a ``prepare_qat_fx``
    model) and under ``torch.no_grad``; each module's ``training`` flag is restored afterwards.
    A ``torch.export`` / ``prepare_pt2e`` GraphModule (whose ``eval()`` raises) is switched with
    torchao's ``move_exported_model_to_eval`` and gets its own graph back afterwards. Observer and fake-quant switches
    are left as the caller set them. Each batch is moved to the model's device (its first
    parameter or buffer); its dtype is kept.

    A batch is ``x`` or ``(x, label, ...)`` and the model gets ``x``. For a model with extra
    inputs, ``input_fn(batch)`` returns the tuple of positional inputs.

    Args:
        prepared: the output of ``prepare_fx`` / ``prepare_qat_fx`` / ``prepare_pt2e`` (or any module).
        data: a SyntheticDataset, a DataLoader, a tensor ``[N, C, H, W]`` or an iterable of batches.
        batch_size: used when ``data`` is a tensor or a SyntheticDataset.
        max_batches: stop after this many batches.
        input_fn: maps a batch to the model's positional inputs, e.g. ``lambda b: (b[0], b[1])``
            for ``forward(x, mask)`` fed by a loader of ``(x, mask)``. Tensor and SyntheticDataset
            data give it image batches.

    Returns:
        A :class:`~zq_plugin._utils.CalibrationSummary` (batches and samples seen); ``prepared``
        itself is calibrated in place, as torch's own calibration loops leave it.

    Raises:
        ConfigError: no batches, or a batch with NaN/Inf, or a batch without a tensor input.

    Example:
        >>> import torch
        >>> class Masked(torch.nn.Module):
        ...     def forward(self, x, mask):
        ...         return x * mask
        >>> batches = [(torch.randn(2, 3), torch.ones(2, 3))]
        >>> calibrate(Masked(), batches, input_fn=lambda b: (b[0], b[1]))
        CalibrationSummary(batches=1, samples=2)
    """
    seen = samples = 0
    device, dtype = input_placement(prepared)
    with eval_mode(prepared), torch.no_grad():
        for batch in _raw_batches(data, batch_size):
            if max_batches is not None and seen >= max_batches:
                break
            inputs = batch_inputs(batch, input_fn)
            if not all(
                torch.isfinite(t).all() for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()
            ):
                raise ConfigError(f"calibration batch {seen} contains NaN or Inf; clean the data first.")
            placed = tuple(place(t, device, dtype) for t in inputs)
            call_model(prepared, placed, seen, "calibrate")
            seen += 1
            samples += next((len(t) for t in placed if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    if seen == 0:
        raise ConfigError("the calibration data yielded no batch; pass at least one sample.")
    logger.debug("calibrated on %d batches", seen)
    return CalibrationSummary(batches=seen, samples=samples)


def _example_inputs(data: CalibrationData, batch_size: int, input_fn: InputFn | None = None) -> tuple[Any, ...]:
    if data is None:
        raise ConfigError(
            "no calibration data (data=None): pass images, e.g. zq_plugin.synthesize(model, 'zeroq', ...) "
            "or a tensor [N, C, H, W]."
        )
    if isinstance(data, Iterator):
        raise ConfigError(
            "the calibration data is a one-shot iterator, but it is read twice (an example input for tracing, "
            "then calibration); pass a list, a tensor, a DataLoader or a SyntheticDataset."
        )
    try:
        first = next(iter(_raw_batches(data, batch_size)))
    except StopIteration:
        raise ConfigError("the calibration data yielded no batch; pass at least one sample.") from None
    inputs = batch_inputs(first, input_fn)
    return inputs if input_fn is not None else (inputs[0][:1],)


_HERE = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _user_line(err: BaseException) -> str:
    """``file:line: code`` of the innermost frame of ``err`` outside torch and zq_plugin ('' if none)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not os.path.abspath(f.filename).startswith(_HERE)]
    if not frames:
        return ""
    last = frames[-1]
    return f" at {last.filename}:{last.lineno}: `{(last.line or '').strip()}`"


def check_traceable(model: nn.Module, entry: str = "the FX flow") -> None:
    """Raise :class:`ModelError` when torch.fx cannot trace ``model`` (the FX flow and its plans need a graph).

    The message names torch's reason and the offending line of the model's code when the
    traceback shows it, and the ways out. The model is not changed.

    Raises:
        ModelError: data-dependent control flow, iteration over a traced value, and other trace failures.
    """
    try:
        torch.fx.Tracer().trace(model)
    except Exception as err:
        raise ModelError(
            f"{entry}: {type(model).__name__} is not symbolically traceable by torch.fx "
            f"({type(err).__name__}: {err}){_user_line(err)}. The FX flow (and a plan for it) needs a traceable "
            "forward: replace data-dependent Python control flow by tensor ops (torch.where), or move it into a "
            "submodule that you prepare yourself with prepare_fx(..., prepare_custom_config="
            "PrepareCustomConfig().set_non_traceable_module_names([...])) (that submodule stays float); or export "
            "the model with torch.export (torch.cond for data-dependent branches) and quantize it in the torchao "
            "PT2E flow with zq_plugin's PT2E observers (docs/observers.md)."
        ) from err
