"""The one place where calibration data, a bit plan, a simulation stage and a backend meet.

Every entry point that quantizes (:func:`zq_plugin.quantize`, :func:`zq_plugin.finetune` with
``backend=``, ``reconstruct_pt2e``, ``reconstruct_brevitas``, the ``zq`` command) is a
:class:`Request` run by :func:`run`:

1. **data**: the calibration images (given, or made by a synthesizer before this module);
2. **plan**: a :class:`~zq_plugin.mixed_precision.BitPlan` (uniform bits become
   ``BitPlan.uniform``): per weight layer, its weight bits and its **input** bits;
3. **stage**: one simulation of that plan (:mod:`zq_plugin.backends.fx.sim`: every weight layer's
   weight and input quantized, nothing else), calibrated with the ``observer`` statistic
   (``"calibrate"``), then reconstructed (``"reconstruct"``: Genie-M, BRECQ, QDrop, AdaRound) or
   fine-tuned (``"finetune"``);
4. **backend**: the simulation itself (``"fx"``), or carried into a converted torchao PT2E model
   (``"pt2e"``) or into Brevitas quant layers (``"brevitas"``) through the one seam
   (:func:`~zq_plugin.backends.fx.sim.read_sim`): weights, weight steps and input steps are
   carried wherever the grids match; a step the simulation has none for is calibrated by the
   backend and says so.

So one request gives one model on every backend; :func:`zq_plugin.describe` reports, from the
built model, what each layer applies and where each step came from.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(144, 3)).eval()
    >>> request = Request(w_bits=4, a_bits=4, first_last_bits=None, stage="calibrate")
    >>> sim = run(net, torch.randn(32, 1, 8, 8), request, progress=False)
    >>> sim.zq_build.stage, sim(torch.randn(2, 1, 8, 8)).shape
    ('calibrate', torch.Size([2, 3]))
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from torch import fx, nn

from zq_plugin._utils import weight_layers
from zq_plugin.backends import carried_counts
from zq_plugin.errors import ConfigError
from zq_plugin.plan import BitPlan
from zq_plugin.qparams import check_bits

logger = logging.getLogger(__name__)

STAGES = ("calibrate", "reconstruct", "finetune")
BACKENDS = ("fx", "pt2e", "brevitas")
#: Observer names, one meaning on every backend (:func:`zq_plugin.observers.ao.observer_class`).
OBSERVERS = ("minmax", "histogram", "mse", "percentile", "aciq", "entropy")
#: The Brevitas statistic for each observer name (what ``to_brevitas(act_stats=)`` takes).
BREVITAS_STATS = {
    "minmax": "zq-minmax",
    "histogram": "zq-minmax",
    "mse": "zq-mse",
    "percentile": "zq-percentile",
    "aciq": "zq-aciq",
    "entropy": "zq-entropy",
}


@dataclass(frozen=True, kw_only=True)
class Request:
    """One quantization request, the same on every backend.

    Attributes:
        w_bits: weight bits of all but the first and last weight layer (2-8).
        a_bits: **input** bits of all but the first and last weight layer (2-8).
        first_last_bits: bits (weight and input) of the first and last weight layer in execution
            order; ``None``: like the others.
        plan: per-layer bits instead of the three above.
        stage: ``"calibrate"``, ``"reconstruct"`` or ``"finetune"``.
        backend: ``"fx"``, ``"pt2e"`` or ``"brevitas"``.
        observer: the range statistic of activations (:data:`OBSERVERS`).
        weight_observer: the range statistic of weights, per channel (default: ``observer``;
            ``"minmax"`` where ``observer`` is ``"histogram"``, which exists only per tensor).
        reconstruction: the reconstruction method (:data:`zq_plugin.reconstruct.METHODS`).
        reconstruction_config: overrides the method's configuration.
        finetune_options: keyword arguments of :func:`zq_plugin.finetune` (``generator``, ``steps``, ...).
        seed: the seed of reconstruction and fine-tuning.
        batch_size: calibration batch size for tensor data.

    Raises:
        ConfigError: an unknown stage, backend, observer or reconstruction method; bad bits.
    """

    w_bits: int = 4
    a_bits: int = 4
    first_last_bits: int | None = 8
    plan: BitPlan | None = None
    stage: str = "reconstruct"
    backend: str = "fx"
    observer: str = "mse"
    weight_observer: str | None = None
    reconstruction: str = "genie-m"
    reconstruction_config: Any = None
    finetune_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        from zq_plugin.reconstruct.engine import METHODS, ReconstructConfig

        for value, allowed, what in (
            (self.stage, STAGES, "stage"),
            (self.backend, BACKENDS, "backend"),
            (self.observer, OBSERVERS, "observer"),
        ):
            if value not in allowed:
                raise ConfigError(f"{what}={value!r} is unknown; choose one of {list(allowed)}.")
        if self.weight_observer is not None and self.weight_observer not in OBSERVERS:
            raise ConfigError(f"weight_observer={self.weight_observer!r} is unknown; choose one of {list(OBSERVERS)}.")
        if self.weight_observer == "histogram":
            raise ConfigError("weight_observer='histogram' exists only per tensor; weights are per channel: use 'mse'.")
        if self.reconstruction_config is not None and not isinstance(self.reconstruction_config, ReconstructConfig):
            raise ConfigError(
                f"reconstruction_config (config=) is a {type(self.reconstruction_config).__name__}: pass a "
                "ReconstructConfig, e.g. dataclasses.replace(zq_plugin.reconstruct.METHODS['genie-m'], iterations=100)."
            )
        if self.stage == "reconstruct" and self.reconstruction_config is None and self.reconstruction not in METHODS:
            raise ConfigError(
                f"unknown reconstruction method {self.reconstruction!r}; choose one of {sorted(METHODS)}."
            )
        if self.plan is None:
            check_bits(self.w_bits, "w_bits")
            check_bits(self.a_bits, "a_bits")
            if self.first_last_bits is not None:
                check_bits(self.first_last_bits, "first_last_bits")
        elif not isinstance(self.plan, BitPlan):
            raise ConfigError(f"plan={type(self.plan).__name__}: pass a zq_plugin.mixed_precision.BitPlan.")

    @property
    def weight_statistic(self) -> str:
        """The weight observer's name (see :attr:`weight_observer`)."""
        if self.weight_observer is not None:
            return self.weight_observer
        return "minmax" if self.observer == "histogram" else self.observer

    def bit_plan(self, model: nn.Module) -> BitPlan | None:
        """The plan (checked against ``model``), or ``BitPlan.uniform`` of the uniform bits.

        ``None`` for a model whose weight layers are all functional calls (no module for a plan
        to name): the simulation then gives them the uniform bits by position.
        """
        if self.plan is not None:
            return self.plan.check(model)
        if not weight_layers(model):
            return None
        return BitPlan.uniform(model, w_bits=self.w_bits, a_bits=self.a_bits, first_last_bits=self.first_last_bits)

    def summary(self) -> dict[str, Any]:
        """The bits asked for and the stage's settings, as a JSON-ready dict.

        ``reconstruction`` and ``reconstruction_config`` (every field of the configuration that ran)
        with the ``reconstruct`` stage; ``weight_observer`` always.
        """
        import dataclasses

        from zq_plugin.reconstruct.engine import METHODS

        out: dict[str, Any] = (
            {"plan": self.plan.to_json()}
            if self.plan is not None
            else {"w_bits": self.w_bits, "a_bits": self.a_bits, "first_last_bits": self.first_last_bits}
        )
        out["weight_observer"] = self.weight_statistic
        if self.stage == "reconstruct":
            config = self.reconstruction_config or METHODS[self.reconstruction]
            out["reconstruction"] = self.reconstruction if self.reconstruction_config is None else "config"
            out["reconstruction_config"] = {k: _plain(v) for k, v in dataclasses.asdict(config).items()}
        return out


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a config value (tuples as lists, anything else unusual as its repr)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _observers(request: Request) -> dict[str, Any]:
    from zq_plugin.observers.ao import observer_class

    return {
        "act_observer": observer_class(request.observer),
        "weight_observer": observer_class(request.weight_statistic, per_channel=True),
    }


def simulate(
    model: nn.Module,
    data: Any,
    request: Request,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """The simulation stage: ``(simulation, stage report)`` for ``request`` on ``data``.

    The simulation is unfolded (its layers keep their weight FakeQuantize), BatchNorm folded
    into the weights first, so that any backend can carry it.
    """
    from torch.fx.experimental.optimization import fuse

    from zq_plugin.backends.fx import check_traceable, quantize_fx

    check_traceable(model, f"the {request.stage} stage")
    plan = request.bit_plan(model)
    if request.stage == "calibrate":
        folded = fuse(copy.deepcopy(model).eval(), inplace=True)
        sim = quantize_fx(
            folded, data, w_bits=request.w_bits, a_bits=request.a_bits, first_last_bits=request.first_last_bits,
            plan=None if plan is None else plan.traced(folded), fold=False, batch_size=request.batch_size,
            **_observers(request),
        )  # fmt: skip
        return sim, None
    if request.stage == "reconstruct":
        from zq_plugin.reconstruct.engine import reconstruct_fx

        sim = reconstruct_fx(
            model, data, w_bits=request.w_bits, a_bits=request.a_bits, first_last_bits=request.first_last_bits,
            plan=plan if request.plan is not None else None, method=request.reconstruction,
            config=request.reconstruction_config, seed=request.seed, cache_dir=cache_dir, progress=progress,
            observer=request.observer, weight_observer=request.weight_statistic,
        )  # fmt: skip
        return sim, getattr(sim, "zq_reconstruction", None)
    from zq_plugin.finetuning import finetune

    if request.observer != "mse" or request.weight_statistic != "mse":
        raise ConfigError(
            f"stage='finetune' starts from the MSE-calibrated student; observer={request.observer!r} applies to "
            "stage='calibrate' and 'reconstruct'."
        )
    options = dict(request.finetune_options)
    for taken in ("backend", "plan", "w_bits", "a_bits", "first_last_bits", "seed", "cache_dir", "progress"):
        if taken in options:
            raise ConfigError(f"finetune_options={{{taken!r}: ...}}: set {taken} on the request itself.")
    if options.get("init") == "reconstruct" and "reconstruct_config" not in options:
        from zq_plugin.reconstruct import METHODS

        options["reconstruct_config"] = request.reconstruction_config or METHODS[request.reconstruction]
    sim = finetune(
        model, data, w_bits=request.w_bits, a_bits=request.a_bits, first_last_bits=request.first_last_bits,
        plan=request.plan, seed=request.seed, cache_dir=cache_dir, progress=progress, **options,
    )  # fmt: skip
    return sim, getattr(sim, "zq_finetune", None)


def carry(model: nn.Module, sim: nn.Module, data: Any, request: Request) -> tuple[nn.Module, dict[str, Any]]:
    """The backend stage: ``(quantized model, layer -> step sources)`` for ``request.backend``."""
    if request.backend == "fx":
        return sim, {}
    plan = request.bit_plan(model)
    if plan is None:
        raise ConfigError(
            f"{type(model).__name__} computes its weight layers by functional calls only, which no plan can name; "
            f"the {request.backend} carrier needs Conv/Linear modules: use backend='fx'."
        )
    qmodel: nn.Module
    if request.backend == "pt2e":
        from zq_plugin.backends.pt2e import from_sim as pt2e_from_sim

        qmodel = pt2e_from_sim(model, cast(fx.GraphModule, sim), data, plan=plan, batch_size=request.batch_size)
    else:
        from zq_plugin.backends.brevitas import from_sim as brevitas_from_sim

        qmodel = brevitas_from_sim(model, sim, data, plan=plan, act_stats=BREVITAS_STATS[request.observer])
    return qmodel, dict(getattr(qmodel, "zq_steps", {}))


def _generated_images(sim: nn.Module, count: int = 256) -> Any:
    """``count`` images of the generator a fine-tuned student carries (``sim.zq_generator``)."""
    import torch

    stream = getattr(sim, "zq_generator", None)
    if stream is None:
        raise ConfigError("no calibration data: pass data=<images> (or fine-tune on a generator).")
    images, index, total = [], 0, 0
    while total < count:
        batch, _ = stream.batch(index)
        images.append(batch)
        total, index = total + len(batch), index + 1
    return torch.cat(images)[:count]


def _deprecated_views(qmodel: nn.Module, backend: str) -> None:
    """``qmodel.zq_carried`` / ``.zq_reconstruction`` read from ``zq_build``, with a DeprecationWarning (one release).

    A ``GraphModule`` has a class of its own per instance (torch.fx), so the properties touch no other model.
    """
    views = {
        "zq_carried": lambda build: carried_counts(build.steps),
        "zq_reconstruction": lambda build: build.stage_report,
    }
    if backend == "fx" or not isinstance(qmodel, fx.GraphModule):
        if backend != "fx" and qmodel.zq_build.stage == "reconstruct":  # type: ignore[union-attr]
            qmodel.zq_reconstruction = qmodel.zq_build.stage_report  # type: ignore[union-attr]
        return
    cls = type(qmodel)
    for name, view in views.items():
        qmodel.__dict__.pop(name, None)

        def read(self: nn.Module, _name: str = name, _view: Any = view) -> Any:
            warnings.warn(
                f"qmodel.{_name} is deprecated: read zq_plugin.describe(qmodel) (each layer's step sources) "
                "or qmodel.zq_build (the stage's report).",
                DeprecationWarning,
                stacklevel=2,
            )
            return _view(self.zq_build)

        setattr(cls, name, property(read))


def run(
    model: nn.Module,
    data: Any,
    request: Request,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` as ``request`` says, on calibration ``data``: the one pipeline.

    Args:
        model: the trained float model (not changed).
        data: calibration images (a tensor ``[N, C, H, W]``, a SyntheticDataset, a loader).
        request: the bits, stage, backend and observer (:class:`Request`).
        cache_dir: reconstruction and fine-tuning checkpoints (resume after a stop).
        progress: tqdm bars.

    Returns:
        The quantized model of ``request.backend``: the FX simulation (a ``prepare_qat_fx``
        GraphModule in eval mode), a converted PT2E model or a calibrated Brevitas model;
        ``qmodel.zq_build`` is its :class:`~zq_plugin.report.Build` record
        (:func:`zq_plugin.describe` reads it); fine-tuned on a generator, ``qmodel.zq_generator``
        is the trained generator's :class:`~zq_plugin.synth.stream.GeneratorStream`.

    Raises:
        ConfigError: bad bits, a functional-only model on a carrier backend, options in the wrong place.
        ModelError: the model does not trace or export.
        MissingDependencyError: the backend's package (torchao, Brevitas) is missing.
    """
    from zq_plugin.report import Build, provenance

    if request.backend == "pt2e":
        from zq_plugin import _compat

        _compat.torchao_pt2e()  # the missing extra is named before the simulation runs
    elif request.backend == "brevitas":
        from zq_plugin.backends.brevitas import _brevitas

        _brevitas()
    sim, stage_report = simulate(model, data, request, cache_dir=cache_dir, progress=progress)
    if data is None:  # fine-tuned on a generator's stream: its images calibrate what the simulation lacks
        data = _generated_images(sim)
    qmodel, steps = carry(model, sim, data, request)
    build = Build(
        backend=request.backend, stage=request.stage, observer=request.observer, request=request.summary(),
        data=provenance(data), steps=steps, stage_report=stage_report,
    )  # fmt: skip
    qmodel.zq_build = build  # type: ignore[assignment]
    if request.backend != "fx" and getattr(sim, "zq_generator", None) is not None:
        qmodel.zq_generator = sim.zq_generator  # the fine-tuning game's generator, on every backend
    _deprecated_views(qmodel, request.backend)
    shown = dict(build.request)
    if request.plan is not None:  # the plan's JSON is in describe(q).build.request; the log names it
        shown["plan"] = f"{len(request.plan.layers)} layers {dict(request.plan.meta)}"
    logger.info("built %s/%s: %s", request.stage, request.backend, shown)
    return qmodel
