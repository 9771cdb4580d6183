"""The measured-best zero-shot pipeline in one call: synthesis, then reconstruction in the FX simulation.

:func:`quantize` runs, from the model alone: ZeroQ synthesis (:func:`zq_plugin.synthesize`, 256
images), the clamping FX simulation with the MSE observers and Genie-M reconstruction
(:func:`zq_plugin.reconstruct_fx`). Cross-layer equalization is not in it: with per-channel
weights it moved ``resnet_s`` by less than 0.3 at W4A4 and lowered ``mobilenetv2_s`` from 89.68
to 83.11 (docs/reconstruction.md). Each default is
the one measured best in docs/reconstruction.md and docs/results.md; change one by passing it.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from zq_plugin.data import CalibrationData
from zq_plugin.errors import ConfigError
from zq_plugin.mixed_precision.plan import BitPlan
from zq_plugin.reconstruct.engine import METHODS, ReconstructConfig, reconstruct_fx

#: The synthesizer, image count and reconstruction method of :func:`quantize` (measured best).
BEST_SYNTHESIZER, BEST_NUM_SAMPLES, BEST_RECONSTRUCTION = "zeroq", 256, "genie-m"


def quantize(
    model: nn.Module,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    plan: BitPlan | None = None,
    input_shape: tuple[int, ...] | None = None,
    data: CalibrationData | None = None,
    synthesizer: str = BEST_SYNTHESIZER,
    num_samples: int = BEST_NUM_SAMPLES,
    reconstruction: str = BEST_RECONSTRUCTION,
    config: ReconstructConfig | None = None,
    first_last_bits: int | None = 8,
    backend: str = "fx",
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **synth_options: Any,
) -> nn.Module:
    """Quantize ``model`` at W``w_bits``A``a_bits`` (or a ``plan``) with no data: the best recipe measured.

    1. calibration images: ``data`` if given, else ``num_samples`` images made by
       ``synthesizer`` (ZeroQ) from the model's BatchNorm statistics;
    2. the clamping FX simulation with the MSE observers, BN folded;
    3. ``reconstruction`` (Genie-M) unit by unit (:func:`zq_plugin.reconstruct_fx`);
    4. with ``backend="brevitas"``, the result carried into Brevitas quant layers
       (:func:`zq_plugin.backends.brevitas.reconstruct_brevitas`), ready for ``export_onnx``;
       with ``backend="pt2e"``, into a converted torchao PT2E model
       (:func:`zq_plugin.backends.pt2e.reconstruct_pt2e`).

    Args:
        model: the trained float model; not changed.
        w_bits: weight bits of all but the first/last layer.
        a_bits: activation bits of all but the first/last layer.
        plan: per-layer bits (:class:`~zq_plugin.mixed_precision.BitPlan`) instead of the two above.
        input_shape: one image's shape, e.g. ``(3, 224, 224)`` (zoo models: ``zoo.INPUT_SHAPE``).
            Needed only to synthesize.
        data: calibration images to use instead of synthesizing (any source).
        synthesizer: a :data:`zq_plugin.METHODS` name.
        num_samples: how many images to synthesize.
        reconstruction: a :data:`zq_plugin.reconstruct.METHODS` name.
        config: overrides the reconstruction method's configuration.
        first_last_bits: bits of the first and last weight layer (``None``: like the others).
        backend: ``"fx"`` (the result is a ``prepare_qat_fx`` GraphModule), ``"brevitas"``
            (a calibrated Brevitas model) or ``"pt2e"`` (a converted PT2E model).
        seed: synthesis and reconstruction seed; the same seed gives the same model.
        cache_dir: synthesis batches and reconstruction checkpoints (resume after a stop).
        progress: tqdm bars.
        **synth_options: the synthesizer's own options (e.g. ``steps=200``).

    Returns:
        The reconstructed clamping simulation (see :func:`zq_plugin.reconstruct_fx`), the
        Brevitas model (:func:`~zq_plugin.backends.brevitas.reconstruct_brevitas`) or the PT2E
        model (:func:`~zq_plugin.backends.pt2e.reconstruct_pt2e`);
        ``.zq_calibration`` holds the images it was calibrated and reconstructed on.

    Raises:
        ConfigError: an unknown backend, synthesizer or reconstruction method, a missing
            ``input_shape``, bad bits.
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
    from zq_plugin.synth import METHODS as SYNTHESIZERS
    from zq_plugin.synth import synthesize

    if backend not in ("fx", "brevitas", "pt2e"):
        raise ConfigError(
            f"backend {backend!r}: quantize runs the best recipe for backend='fx' (the clamping simulation), "
            "backend='brevitas' (Brevitas layers, ONNX export) or backend='pt2e' (torchao PT2E)."
        )
    if config is None and reconstruction not in METHODS:
        raise ConfigError(f"unknown reconstruction method {reconstruction!r}; choose one of {sorted(METHODS)}.")
    if data is None:
        if synthesizer not in SYNTHESIZERS:
            raise ConfigError(f"unknown synthesizer {synthesizer!r}; choose one of {sorted(SYNTHESIZERS)}.")
        if input_shape is None:
            raise ConfigError(
                "quantize needs the shape of one input image to synthesize calibration data: pass "
                "input_shape=(C, H, W), e.g. (3, 224, 224), or data=<your images>."
            )
        data = synthesize(
            model, synthesizer, num_samples=num_samples, input_shape=tuple(input_shape), seed=seed,
            progress=progress, cache_dir=cache_dir, **synth_options,
        )  # fmt: skip
    options: dict[str, Any] = {"w_bits": w_bits, "a_bits": a_bits, "plan": plan, "config": config}
    options.update(method=reconstruction, first_last_bits=first_last_bits, seed=seed)
    options.update(cache_dir=cache_dir, progress=progress)
    if backend == "brevitas":
        from zq_plugin.backends.brevitas import reconstruct_brevitas

        sim: nn.Module = reconstruct_brevitas(model, data, **options)
    elif backend == "pt2e":
        from zq_plugin.backends.pt2e import reconstruct_pt2e

        sim = reconstruct_pt2e(model, data, **options)
    else:
        sim = reconstruct_fx(model, data, **options)
    sim.zq_calibration = data  # type: ignore[assignment]
    return sim
