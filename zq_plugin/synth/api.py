"""``synthesize``: the one entry point of data-free calibration data."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from zq_plugin._utils import model_device_dtype
from zq_plugin.data import SyntheticDataset, model_fingerprint
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth.hooks import frozen, require_batchnorm
from zq_plugin.synth.registry import BatchContext, get_method
from zq_plugin.synth.store import (
    Batch,
    BatchStore,
    SynthesisInterrupted,
    dist_info,
    gather_batches,
    method_code_hash,
    run_key,
)

logger = logging.getLogger(__name__)


def batch_seed(seed: int, index: int) -> int:
    """Seed of batch ``index``: a hash of ``(seed, index)``, so batches never share a random stream."""
    digest = hashlib.sha256(f"zq_plugin:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, tuple | list)
        or len(input_shape) < 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
    ):
        raise ConfigError(
            f"input_shape={input_shape!r} must be the shape of one image without the batch dimension, "
            "e.g. (1, 28, 28) or (3, 224, 224): a tuple of positive ints, channels first."
        )
    return tuple(input_shape)


def resolve_input_range(
    model: nn.Module, input_range: tuple[float, float] | Literal["auto"] | None
) -> tuple[float, float] | None:
    """The valid input box: given, or ``model.input_range`` when ``"auto"``, or ``None`` (no box)."""
    if input_range == "auto":
        found = getattr(model, "input_range", None)
        if found is None:
            # a warning, not info: measured from outside, an unclamped box cost 8 points at W4A4; a
            # Python warning, so that warnings filters control it, and a log line for log readers
            message = (
                f"{type(model).__name__} has no input_range attribute: synthetic images are not clamped to valid "
                "inputs, which inflates activation ranges (docs/synthesis.md). Pass input_range=(lo, hi), the "
                "image of valid pixels under the model's normalization (zq: --input-range=lo,hi), or None to "
                "silence this."
            )
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
            return None
        input_range = found
    if input_range is None:
        return None
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"input_range={input_range!r} must be (lo, hi), 'auto' or None.") from exc
    if not lo < hi:
        raise ConfigError(f"input_range=({lo}, {hi}) needs lo < hi.")
    return (lo, hi)


def _check_single_input(model: nn.Module) -> None:
    """Refuse a model whose ``forward`` needs more than the one image tensor synthesis feeds it."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # builtins or C++ modules: nothing to inspect
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and (p.kind in positional or p.kind == inspect.Parameter.KEYWORD_ONLY)
    ]
    if len(required) > 1:
        extra = ", ".join(required[1:])
        raise ConfigError(
            f"{type(model).__name__}.forward({', '.join(required)}) needs more than one input, but synthesis "
            f"feeds it one image batch. Wrap it so the image is the only input and the other inputs ({extra}) "
            "are fixed, e.g. a module whose forward(x) calls model(x, mask) (docs/compatibility.md)."
        )


def _check_model_output(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> None:
    probe = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = model(probe)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"the model cannot run on input_shape={input_shape} (a batch of shape {tuple(probe.shape)} failed: "
            f"{exc}). Pass the shape of one input image, channels first."
        ) from exc
    outs = out if isinstance(out, tuple | list) else [out]
    for o in outs:
        if isinstance(o, torch.Tensor) and not torch.isfinite(o).all():
            raise ModelError(
                f"{type(model).__name__} returns NaN/Inf for an all-zero input of shape {input_shape}: "
                "its weights or BN buffers hold non-finite values. Fix or reload the checkpoint."
            )


@contextlib.contextmanager
def _report_interrupt(store: BatchStore | None, num_batches: int) -> Iterator[None]:
    """Turn Ctrl-C into :class:`SynthesisInterrupted` (batches kept, folder) when there is a cache."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if store is None or isinstance(exc, SynthesisInterrupted):
            raise
        raise SynthesisInterrupted(store.count(), num_batches, store.path) from exc


def synthesize(
    model: nn.Module,
    method: str = "zeroq",
    *,
    num_samples: int = 256,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    input_range: tuple[float, float] | Literal["auto"] | None = "auto",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> SyntheticDataset:
    """Make ``num_samples`` calibration images from ``model`` alone.

    The model is never changed: it runs in eval mode with frozen parameters, and its modes,
    ``requires_grad`` flags and hooks are restored afterwards, also if synthesis raises or is
    interrupted. Batch ``b`` is generated with its own seed ``hash(seed, b)``, so its images
    depend on ``(seed, b, batch_size)`` only:

    * with ``cache_dir``, each finished batch is written there atomically and a rerun (after an
      exception, Ctrl-C or a killed process) loads the finished batches and makes only the rest:
      the final dataset equals an uninterrupted run (:mod:`zq_plugin.synth.store`);
    * inside an initialized ``torch.distributed`` group (e.g. ``torchrun`` with the gloo backend)
      rank ``r`` makes the batches ``b`` with ``b % world_size == r`` and the ranks exchange them:
      every rank returns the same dataset as a single process.

    **Devices and dtypes.** Images, generators and probes are made on the model's device and run
    through the model in its dtype (float32, float64, bfloat16, float16; one device, one dtype).
    Random draws come from a CPU generator, so the starting points do not depend on the device.
    For float16/bfloat16 models the optimized tensors, BN sums and targets are float32 (Adam
    steps vanish below bfloat16's resolution and ``sum f^2 - n mean^2`` cancels to noise); the
    model still runs in its own dtype. The dataset is returned on the CPU in float32.

    **Inputs and outputs.** The model takes one image batch; a ``forward(x, mask)`` with more
    required inputs is refused (wrap it). Class-targeted methods read the logits by the rule of
    :func:`zq_plugin._utils.select_output` (a tensor, the first tensor of a tuple, ``"logits"``
    of a dict).

    Args:
        model: the trained float model (read its BN statistics before any prepare/fusion).
        method: a registered method: ``"zeroq"``, ``"dsg"``, ``"retro"``, ``"genie"``, ``"adadfq"``,
            ``"gdfq"``, ``"noise"`` (see :data:`zq_plugin.synth.METHODS`). ``"adadfq"``/``"gdfq"``
            play a whole generator game per batch (:func:`zq_plugin.finetune` trains one generator
            and streams from it).
        num_samples: number of images, >= 1.
        input_shape: one image's shape, channels first, e.g. ``(1, 28, 28)``; required unless the
            model declares it as ``model.input_shape`` (the zoo's models do).
        seed: the same seed (and options) gives the same images.
        batch_size: images optimized together.
        input_range: ``(lo, hi)`` box of valid inputs in the model's input space; ``"auto"`` reads
            ``model.input_range`` (set on zoo models); ``None`` disables the clamp.
        progress: show a tqdm bar per batch.
        cache_dir: folder for finished batches (resume, reuse); ``None`` keeps everything in memory.
        **options: the method's own options (e.g. ``steps=200`` for ZeroQ); unknown names raise.
            ``synthesizer=`` is accepted as the same as ``method`` (the spelling of :func:`zq_plugin.quantize`).

    Returns:
        A :class:`~zq_plugin.data.SyntheticDataset`; ``.images`` is float32 ``[N, *input_shape]`` on the CPU.

    Raises:
        ConfigError: bad options, an ``input_shape`` the model cannot run on, a model on several
            devices or with mixed dtypes, or a forward needing more than one input.
        ModelError: a BN-statistics method on a model without BatchNorm, non-finite outputs.
        SynthesisInterrupted: Ctrl-C with a ``cache_dir`` (a ``KeyboardInterrupt`` that says how many
            batches are cached and where; the same call resumes).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> data = synthesize(net, "zeroq", num_samples=4, input_shape=(1, 8, 8), steps=5, progress=False)
        >>> data.images.shape
        torch.Size([4, 1, 8, 8])
    """
    if "synthesizer" in options:  # the spelling of quantize() and finetune(), accepted here too
        named = options.pop("synthesizer")
        if method not in ("zeroq", named):
            raise ConfigError(f"method={method!r} and synthesizer={named!r}: name the synthesizer once.")
        method = named
    spec = get_method(method)
    config = spec.config(options)
    if input_shape is None:
        declared = getattr(model, "input_shape", None)
        if declared is None:
            raise ConfigError(
                f"synthesize needs the shape of one input image of {type(model).__name__}: pass input_shape=(C, H, W), "
                "e.g. (1, 28, 28) or (3, 224, 224) (a model may declare it as model.input_shape)."
            )
        input_shape = tuple(declared)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r} must be a positive int (e.g. 256).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int (e.g. 64).")
    shape = _check_input_shape(input_shape)
    box = resolve_input_range(model, input_range)
    _check_single_input(model)
    device, dtype = model_device_dtype(model)
    if spec.needs_batchnorm:
        require_batchnorm(model, method)
    num_batches = math.ceil(num_samples / batch_size)
    fingerprint = model_fingerprint(model)
    store = None
    if cache_dir is not None:
        key = run_key(
            model=fingerprint,
            method=method,
            code=method_code_hash(spec.config_cls),  # the module that defines the method
            config=dataclasses.asdict(config),
            seed=seed,
            batch_size=batch_size,
            input_shape=list(shape),
            input_range=box,
        )
        store = BatchStore(cache_dir, key)
    rank, world = dist_info()
    mine: dict[int, Batch] = {}
    shared: dict[str, Any] = {}  # the call's state for methods that train once per call
    with frozen(model), _report_interrupt(store, num_batches):
        _check_model_output(model, shape, device, dtype)
        for b in range(rank, num_batches, world):
            n = min(batch_size, num_samples - b * batch_size)
            cached = store.load(b, n, shape) if store is not None else None
            if cached is not None:
                logger.debug("batch %d loaded from %s", b, store.file(b, n) if store else "")
                mine[b] = cached
                continue
            ctx = BatchContext(
                batch_size=n,
                input_shape=shape,
                input_range=box,
                generator=torch.Generator().manual_seed(batch_seed(seed, b)),
                progress=progress,
                desc=f"{method} batch {b + 1}/{num_batches}",
                offset=b * batch_size,
                device=device,
                dtype=dtype,
                seed=seed,
                shared=shared,
            )
            out = spec.make_batch(model, config, ctx)
            images, labels = out if isinstance(out, tuple) else (out, None)
            # stored and returned on the CPU in float32, whatever the model's device and dtype
            mine[b] = (images.detach().to("cpu", torch.float32), None if labels is None else labels.cpu())
            if store is not None:
                store.save(b, *mine[b])
    batches = gather_batches(mine)
    record = {**dataclasses.asdict(config), "batch_size": batch_size, "input_range": box, "input_shape": list(shape)}
    return SyntheticDataset(
        torch.cat([batches[b][0] for b in range(num_batches)]),
        labels=None
        if any(batches[b][1] is None for b in range(num_batches))
        else torch.cat(
            [batches[b][1] for b in range(num_batches)]  # type: ignore[misc]
        ),
        method=method,
        options=record,
        seed=seed,
        model_fingerprint=fingerprint,
    )
