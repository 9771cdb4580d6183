"""The measured-best zero-shot pipeline in one call: synthesis, then reconstruction in the FX simulation.

:func:`quantize` runs, from the model alone: ZeroQ synthesis (:func:`zq_plugin.synthesize`, 256
images), the clamping FX simulation with the MSE observers and Genie-M reconstruction
(:func:`zq_plugin.reconstruct_fx`). Cross-layer equalization is not in it: with per-channel
weights it moved ``resnet_s`` by less than 0.3 at W4A4 and lowered ``mobilenetv2_s`` from 89.68
to 83.11 (docs/reconstruction.md). Each default is
the one measured best in docs/reconstruction.md and docs/results.md; change one by passing it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from torch import nn

from zq_plugin.data import CalibrationData, SyntheticDataset, model_fingerprint
from zq_plugin.errors import ConfigError, DataMismatchError, ModelError
from zq_plugin.plan import BitPlan
from zq_plugin.reconstruct.engine import ReconstructConfig

#: The synthesizer, image count and reconstruction method of :func:`quantize` (measured best).
BEST_SYNTHESIZER, BEST_NUM_SAMPLES, BEST_RECONSTRUCTION = "zeroq", 256, "genie-m"


def quantize(
    model: nn.Module,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    first_last_bits: int | None = 8,
    plan: BitPlan | None = None,
    budget: str | int | None = None,
    backend: str = "fx",
    stage: str = "reconstruct",
    observer: str = "mse",
    data: CalibrationData | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_range: tuple[float, float] | Literal["auto"] | None = "auto",
    synthesizer: str = BEST_SYNTHESIZER,
    num_samples: int = BEST_NUM_SAMPLES,
    reconstruction: str = BEST_RECONSTRUCTION,
    config: ReconstructConfig | None = None,
    finetune_options: dict[str, Any] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **synth_options: Any,
) -> nn.Module:
    """Quantize ``model`` at W``w_bits``A``a_bits`` (or a ``plan``) with no data: the best recipe measured.

    One request, one model on every backend (:mod:`zq_plugin.pipeline`):

    1. calibration images: ``data`` if given, else ``num_samples`` images made by
       ``synthesizer`` (ZeroQ) from the model's BatchNorm statistics;
    2. the plan: per weight layer its weight bits and its **input** bits (uniform bits become
       ``BitPlan.uniform``: the first and last layer at ``first_last_bits``);
    3. the simulation of that plan, calibrated with the ``observer`` statistic (MSE), then
       ``stage``: ``"reconstruct"`` (``reconstruction``, Genie-M, unit by unit), ``"finetune"``
       (:func:`zq_plugin.finetune` with ``finetune_options``) or ``"calibrate"`` (nothing more);
    4. ``backend``: the FX simulation itself, or the simulation carried into a converted PT2E
       model or Brevitas quant layers (weights, weight steps and input steps carried exactly).

    :func:`zq_plugin.describe` tells, from the result, what each layer applies.

    Args:
        model: the trained float model; not changed.
        w_bits: weight bits of all but the first/last layer.
        a_bits: input bits of all but the first/last layer.
        first_last_bits: bits of the first and last weight layer (``None``: like the others).
        plan: per-layer bits (:class:`~zq_plugin.mixed_precision.BitPlan`) instead of the three above.
        budget: instead of uniform bits, spend the bit operations of a uniform plan (``"W4A4"``,
            first and last layer at ``first_last_bits``; or BOPs per image as an int) where the
            sensitivities measured on the calibration images say they pay
            (:func:`~zq_plugin.mixed_precision.bops_plan`: weight and input bits per layer).
        backend: ``"fx"`` (a ``prepare_qat_fx`` GraphModule), ``"pt2e"`` (a converted torchao
            PT2E model) or ``"brevitas"`` (a calibrated Brevitas model, ready for ``export_onnx``).
        stage: ``"reconstruct"`` (default), ``"finetune"`` or ``"calibrate"``.
        observer: the range statistic (:data:`zq_plugin.pipeline.OBSERVERS`; one meaning on every backend).
        data: calibration images to use instead of synthesizing (any source).
        input_shape: one image's shape, e.g. ``(3, 224, 224)``; needed only to synthesize, unless
            the model declares ``model.input_shape`` (the zoo's do).
        input_range: the valid input box of the synthetic images (see :func:`zq_plugin.synthesize`).
        synthesizer: a :data:`zq_plugin.METHODS` name.
        num_samples: how many images to synthesize.
        reconstruction: a :data:`zq_plugin.reconstruct.METHODS` name.
        config: overrides the reconstruction method's configuration.
        finetune_options: keyword arguments of :func:`zq_plugin.finetune` for ``stage="finetune"``.
        seed: synthesis, reconstruction and fine-tuning seed; the same seed gives the same model.
        cache_dir: synthesis batches, reconstruction and fine-tuning checkpoints (resume after a stop).
        progress: tqdm bars.
        **synth_options: the synthesizer's own options (e.g. ``steps=200``).

    Returns:
        The quantized model of ``backend``; ``.zq_build`` records how it was built and
        ``.zq_calibration`` holds the calibration images.

    Raises:
        ConfigError: an unknown backend, stage, observer, synthesizer or reconstruction method, a
            missing ``input_shape``, bad bits, ``method=`` (say ``synthesizer=`` or ``reconstruction=``).
        ModelError: a BN-statistics synthesizer on a model without BatchNorm (pass ``data`` or
            ``synthesizer="retro"``), a model that does not trace.

    Example:
        >>> import dataclasses, torch, zq_plugin
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
        >>> quick = dataclasses.replace(zq_plugin.reconstruct.METHODS["genie-m"], iterations=5)
        >>> sim = zq_plugin.quantize(net, input_shape=(1, 8, 8), num_samples=8, steps=2, config=quick,
        ...                          progress=False)
        >>> sim(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """
    from zq_plugin.hooks import batchnorm_layers
    from zq_plugin.pipeline import Request, run
    from zq_plugin.synth import METHODS as SYNTHESIZERS
    from zq_plugin.synth import synthesize

    if "method" in synth_options:
        raise ConfigError(
            f"quantize(method={synth_options['method']!r}): name the synthesizer with synthesizer=... (e.g. "
            "synthesizer='retro') and the reconstruction with reconstruction=... (e.g. 'genie-m')."
        )
    _check_keywords(synth_options, synthesizer if data is None else None)
    if budget is not None and (plan is not None or (w_bits, a_bits) != (4, 4)):
        raise ConfigError(
            "budget= chooses every layer's weight and input bits: drop plan=, w_bits= and a_bits= "
            "(budget='W3A3' spends the bit operations of a uniform W3A3 plan)."
        )
    if plan is not None and (w_bits, a_bits, first_last_bits) != (4, 4, 8):
        raise ConfigError(
            "plan= sets every layer's weight and input bits: drop w_bits/a_bits/first_last_bits, or drop plan= "
            "(plan.replace_layer(name, w_bits=..., a_bits=...) changes one layer)."
        )
    if config is not None and reconstruction != BEST_RECONSTRUCTION and not _is_method(config, reconstruction):
        raise ConfigError(
            f"config= is the whole reconstruction configuration and replaces reconstruction={reconstruction!r}'s: "
            f"pass dataclasses.replace(zq_plugin.reconstruct.METHODS[{reconstruction!r}], iterations=...) as config=."
        )
    if (config is not None and stage != "reconstruct") or (finetune_options and stage != "finetune"):
        given = "config=" if config is not None and stage != "reconstruct" else "finetune_options="
        wants = "'reconstruct'" if given == "config=" else "'finetune'"
        raise ConfigError(f"{given} applies to stage={wants}, and stage={stage!r} was asked for: drop it.")
    if isinstance(data, SyntheticDataset) and data.model_fingerprint:
        own = model_fingerprint(model)
        if data.model_fingerprint != own:
            raise DataMismatchError(
                f"data= was synthesized from another model (fingerprint {data.model_fingerprint[:12]}, this model's "
                f"{own[:12]}): its images match that model's statistics. Synthesize for this model, or pass "
                "data=data.images to use them anyway."
            )
    request = Request(
        w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, plan=plan, stage=stage, backend=backend,
        observer=observer, reconstruction=reconstruction, reconstruction_config=config,
        finetune_options=dict(finetune_options or {}), seed=seed,
    )  # fmt: skip
    if data is None:
        if synthesizer not in SYNTHESIZERS:
            raise ConfigError(f"unknown synthesizer {synthesizer!r}; choose one of {sorted(SYNTHESIZERS)}.")
        if input_shape is None and getattr(model, "input_shape", None) is None:
            raise ConfigError(
                "quantize needs the shape of one input image to synthesize calibration data: pass "
                "input_shape=(C, H, W), e.g. (3, 224, 224), or data=<your images>."
            )
        if SYNTHESIZERS[synthesizer].needs_batchnorm and not batchnorm_layers(model):
            raise ModelError(
                f"synthesizer={synthesizer!r} matches BatchNorm statistics, and {type(model).__name__} has no "
                "BatchNorm layer with running statistics. Use synthesizer='retro' (Retro-Synthesis needs none), "
                "or pass data=<your images>."
            )
        data = synthesize(
            model, synthesizer, num_samples=num_samples, input_range=input_range,
            input_shape=None if input_shape is None else tuple(input_shape), seed=seed, progress=progress,
            cache_dir=cache_dir, **synth_options,
        )  # fmt: skip
    if budget is not None:
        from zq_plugin.mixed_precision.bops import bops_plan

        chosen = bops_plan(model, data, budget=budget, first_last_bits=first_last_bits, progress=progress).plan
        request = dataclasses.replace(request, plan=chosen)
    # with data=, _check_keywords has refused every synthesizer option already
    qmodel = run(model, data, request, cache_dir=cache_dir, progress=progress)
    qmodel.zq_calibration = data  # type: ignore[assignment]
    return qmodel


def _reconstruct_on(
    backend: str,
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int,
    a_bits: int,
    plan: BitPlan | None,
    method: str,
    config: ReconstructConfig | None,
    first_last_bits: int | None,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    observer: str = "mse",
) -> nn.Module:
    from zq_plugin.pipeline import Request, run

    request = Request(
        w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, plan=plan, stage="reconstruct",
        backend=backend, observer=observer, reconstruction=method, reconstruction_config=config, seed=seed,
    )  # fmt: skip
    return run(model, data, request, cache_dir=cache_dir, progress=progress)


def reconstruct_pt2e(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    plan: BitPlan | None = None,
    method: str = "genie-m",
    config: ReconstructConfig | None = None,
    first_last_bits: int | None = 8,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """A converted PT2E model holding a reconstruction: ``quantize(model, data=data, backend="pt2e")``.

    The reconstruction runs in the simulation of the plan (:mod:`zq_plugin.pipeline`) and is carried
    into the converted model exactly: its rounded weights, weight steps and input steps
    (``zq_plugin.describe(q)`` says "carried" for each).

    Raises:
        ConfigError, ModelError: as :func:`quantize`.
        MissingDependencyError: torchao is not installed (before any work).

    Example:
        >>> import dataclasses, torch
        >>> from zq_plugin.reconstruct import METHODS
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> quick = dataclasses.replace(METHODS["genie-m"], iterations=5)
        >>> q = reconstruct_pt2e(net, torch.randn(32, 1, 8, 8), config=quick, progress=False)
        >>> q(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    return _reconstruct_on(
        "pt2e", model, data, w_bits=w_bits, a_bits=a_bits, plan=plan, method=method, config=config,
        first_last_bits=first_last_bits, seed=seed, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip


def reconstruct_brevitas(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    plan: BitPlan | None = None,
    method: str = "genie-m",
    config: ReconstructConfig | None = None,
    first_last_bits: int | None = 8,
    act_stats: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """A Brevitas model holding a reconstruction: ``quantize(model, data=data, backend="brevitas")``.

    The reconstruction runs in the simulation of the plan (:mod:`zq_plugin.pipeline`) and is carried
    into Brevitas quant layers exactly (affine inputs, Brevitas's ``ShiftedUint8ActPerTensorFloat``):
    rounded weights, weight steps, input steps and zero points.

    Args:
        model: the float model (not changed).
        data: calibration images (any source).
        w_bits: weight bits of all but the first/last layer.
        a_bits: input bits of all but the first/last layer.
        plan: per-layer bits instead.
        method: the reconstruction method.
        config: overrides the method's configuration.
        first_last_bits: bits of the first and last weight layer.
        seed: the reconstruction seed.
        cache_dir: reconstruction checkpoints (resume).
        progress: tqdm bars.
        act_stats: deprecated and ignored (every step is carried from the simulation); use
            ``quantize(observer=...)`` to choose the statistic.

    Raises:
        ConfigError, ModelError: as :func:`quantize`.
        MissingDependencyError: Brevitas is not installed (before any work).

    Example:
        >>> import dataclasses, torch
        >>> from zq_plugin.reconstruct import METHODS
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> quick = dataclasses.replace(METHODS["genie-m"], iterations=5)
        >>> q = reconstruct_brevitas(net, torch.randn(32, 1, 8, 8), config=quick, progress=False)
        >>> q(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    if act_stats is not None:
        import warnings

        warnings.warn(
            "reconstruct_brevitas(act_stats=...) is ignored: every step is carried from the simulation; "
            "choose the statistic with zq_plugin.quantize(observer=...).",
            DeprecationWarning,
            stacklevel=2,
        )
    return _reconstruct_on(
        "brevitas", model, data, w_bits=w_bits, a_bits=a_bits, plan=plan, method=method, config=config,
        first_last_bits=first_last_bits, seed=seed, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip


def finetune(
    model: nn.Module,
    data: CalibrationData | None = None,
    *,
    backend: str = "fx",
    w_bits: int = 4,
    a_bits: int = 4,
    first_last_bits: int | None = 8,
    plan: BitPlan | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """Fine-tune a quantized copy of ``model`` by distillation, then deploy it on ``backend``.

    The fine-tuning stage of the one pipeline (:mod:`zq_plugin.pipeline`): the student is the
    simulation of the plan (each weight layer's weight and input quantized), trained by
    :func:`zq_plugin.finetuning.finetune` (AdaDFQ's or GDFQ's generator, or a fixed set), then
    carried into ``backend`` exactly. The bits mean what they mean in :func:`quantize`.

    Args:
        model: the trained float model (not changed).
        data: calibration images (any source); ``None``: a generator plays the game and its images
            initialize the student (and calibrate the carrier where needed).
        backend: ``"fx"``, ``"pt2e"`` or ``"brevitas"``.
        w_bits: weight bits of all but the first/last layer.
        a_bits: input bits of all but the first/last layer.
        first_last_bits: bits of the first and last weight layer (``None``: like the others).
        plan: per-layer bits instead.
        seed: the game's and the student's seed.
        cache_dir: checkpoints (resume after a stop).
        progress: tqdm bars.
        **options: :func:`zq_plugin.finetuning.finetune`'s other options (``generator``, ``steps``,
            ``config``, ``init``, ``input_shape``, ``input_range``, ``batch_size``, ...).

    Returns:
        The fine-tuned model of ``backend``; ``.zq_build.stage_report`` holds the run's summary.

    Raises:
        ConfigError, ModelError: as :func:`zq_plugin.finetuning.finetune` and :func:`quantize`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
        >>> q = finetune(net, torch.randn(32, 1, 8, 8), steps=3, batch_size=8, progress=False)
        >>> q.zq_build.stage, q(torch.randn(2, 1, 8, 8)).shape
        ('finetune', torch.Size([2, 3]))
    """
    from zq_plugin.pipeline import Request, run

    request = Request(
        w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, plan=plan, stage="finetune", backend=backend,
        finetune_options=options, seed=seed,
    )  # fmt: skip
    return run(model, data, request, cache_dir=cache_dir, progress=progress)


#: keywords of other calls that users bring to ``quantize``, and where they belong
_ELSEWHERE = {
    "act_observer": "observer= (one name on every backend, e.g. observer='mse')",
    "act_stats": "observer= (one name on every backend, e.g. observer='mse')",
    "weight_observer": "Request(weight_observer=...) with zq_plugin.pipeline.run, or observer= for both",
    "bias_correction": (
        "a Brevitas tool: q = quantize(..., backend='brevitas'), then zq_plugin.backends.brevitas.bias_correct(q, data)"
    ),
    "gptq": "a Brevitas tool: q = quantize(..., backend='brevitas'), then zq_plugin.backends.brevitas.gptq(q, data)",
    "generator": "finetune_options={'generator': ...} with stage='finetune', or zq_plugin.finetune",
}


def _check_keywords(options: dict[str, Any], synthesizer: str | None) -> None:
    """``quantize``'s ``**synth_options`` that no synthesizer takes, named with where they belong.

    ``synthesizer``: the one that runs (``None`` when ``data=`` is given: nothing takes options).
    """
    import difflib
    import inspect

    from zq_plugin.synth import METHODS as SYNTHESIZERS

    spec = SYNTHESIZERS.get(synthesizer) if synthesizer else None
    known = {f.name for f in dataclasses.fields(spec.config_cls)} if spec is not None else set()
    own = [p for p in inspect.signature(quantize).parameters if p not in ("model", "synth_options")]
    for name in options:
        if name in known:
            continue
        if name in _ELSEWHERE:
            raise ConfigError(f"quantize({name}=...): {_ELSEWHERE[name]}.")
        close = difflib.get_close_matches(name, [*own, *known], n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"quantize({name}=...): no such keyword; did you mean {close[0]}=?")
        if synthesizer is None:
            raise ConfigError(
                f"options {sorted(options)} are the synthesizer's, and data= was given (nothing is synthesized); "
                "drop them, or drop data=."
            )


def _is_method(config: Any, name: str) -> bool:
    """Whether ``config`` is reconstruction method ``name``'s configuration with only its iterations changed."""
    from zq_plugin.reconstruct import METHODS

    preset = METHODS.get(name)
    return (
        preset is not None
        and isinstance(config, ReconstructConfig)
        and dataclasses.replace(config, iterations=preset.iterations) == preset
    )
