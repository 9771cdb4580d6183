"""Data-free fine-tuning: a clamping FX simulation trained by distillation from the float model.

The student is the :func:`zq_plugin.quantize_fx` simulation of the model (a ``prepare_qat_fx``
``GraphModule``, BatchNorm folded first, MSE-calibrated steps, then frozen) or, with
``init="reconstruct"``, the :func:`zq_plugin.reconstruct_fx` result. Its weights train through
the FakeQuantize modules (straight-through, zero gradient outside the clamping range), with
the steps fixed or, with ``learn_steps``, learned with them (LSQ: :class:`LearnedStep`),
distilled from the untouched float model (the teacher) on:

* a **generator** playing AdaDFQ's or GDFQ's game (:mod:`zq_plugin.synth.adadfq`): each
  iteration updates the generator against the current student, then the student on the
  generator's (detached) images, after ``warmup`` generator-only iterations; or
* a **fixed synthetic set** from any method (``data=``), batches drawn with replacement.

Each iteration's student loss is :func:`zq_plugin.synth.adadfq.student_loss` (KL at a
temperature, plus CE on the generator's labels or the set's labels when it has them).
The student optimizer is SGD with Nesterov momentum 0.9 and weight decay 1e-4 (GDFQ's),
its learning rate decayed by a cosine to zero; the generator's is Adam with betas (0.5, 0.999).

Runs are seeded (the same call gives the same model), never change the float model, and with
``cache_dir`` keep a checkpoint every ``checkpoint_every`` iterations from which the same call
resumes to the same result.

**Several processes** (``torchrun``, any backend: gloo on CPUs, NCCL on GPUs): started inside an
initialized ``torch.distributed`` group, the student (and the generator) train under
``DistributedDataParallel``. ``batch_size`` is the batch of all processes together: every rank
draws the whole batch from the same seeded stream and trains on its slice, and DDP averages the
gradients, so on a fixed set the run gives the single-process model (to float rounding); with a
generator, its BatchNorm layers see each rank's slice. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from zq_plugin._utils import model_device_dtype, select_output
from zq_plugin.data import CalibrationData, atomic_torch_save, iter_batches, model_fingerprint
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.oscillation import OscillationConfig, WeightOscillations
from zq_plugin.plan import BitPlan
from zq_plugin.runs import dist_info, method_code_hash, run_key
from zq_plugin.synth.adadfq import (
    AdaDFQConfig,
    ConditionalGenerator,
    GDFQConfig,
    batchnorm_statistics_loss,
    generate,
    generator_loss,
    running_moments,
    sample_inputs,
    student_loss,
)
from zq_plugin.synth.hooks import bn_sums, frozen, require_batchnorm
from zq_plugin.synth.registry import BatchContext, register

logger = logging.getLogger(__name__)

GENERATORS: dict[str, type[AdaDFQConfig]] = {"adadfq": AdaDFQConfig, "gdfq": GDFQConfig}
Init = Literal["calibrate", "reconstruct"]
_NO_BN_FIX = (
    "Fine-tune on images instead: finetune(model, images) with real images or a synthetic set from a "
    "method that needs no BatchNorm (zq_plugin.synthesize(model, method='retro' or 'noise'))."
)


def fx_student(
    model: nn.Module,
    images: torch.Tensor,
    *,
    w_bits: int,
    a_bits: int,
    first_last_bits: int | None = 8,
    init: Init = "calibrate",
    plan: BitPlan | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    reconstruct_config: Any = None,
) -> fx.GraphModule:
    """The student: a clamping FX simulation of ``model`` whose weights train (eval mode, steps fixed).

    ``init="calibrate"``: :func:`zq_plugin.quantize_fx` of the BN-folded model with the MSE
    observers on ``images``; ``"reconstruct"``: :func:`zq_plugin.reconstruct_fx` (Genie-M, or
    ``reconstruct_config``) on them, its checkpoints under ``cache_dir``. ``plan``: per-layer bits
    instead of the uniform ones (each layer's input quantized at its ``a_bits``, as every backend
    reads a plan).
    """
    from torch.fx.experimental.optimization import fuse

    from zq_plugin.backends.fx import quantize_fx
    from zq_plugin.observers.ao import MSEObserver, PerChannelMSEObserver
    from zq_plugin.reconstruct.engine import reconstruct_fx

    if plan is not None:
        plan.check(model)
    if init == "reconstruct":
        sim = reconstruct_fx(
            model, images, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, plan=plan, seed=seed,
            cache_dir=cache_dir, progress=False, config=reconstruct_config,
        )  # fmt: skip
    else:
        folded = fuse(copy.deepcopy(model).eval(), inplace=True)
        sim = quantize_fx(
            folded, images, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, fold=False,
            plan=None if plan is None else plan.traced(folded), act_observer=MSEObserver,
            weight_observer=PerChannelMSEObserver,
        )  # fmt: skip
    sim.eval()
    for p in sim.parameters():
        p.requires_grad_(True)
    return sim


class LearnedStep(nn.Module):
    """A FakeQuantize whose step trains with the weights (LSQ, Esser et al., ICLR 2020).

    ``x_q = s * (clamp(round(x / s) + z, qmin, qmax) - z)`` with ``s`` a parameter (per tensor,
    or per channel along the FakeQuantize's ``ch_axis``) starting at the calibrated step, the
    zero point fixed, straight-through gradients for ``x`` and LSQ's gradient for ``s`` scaled by
    ``1 / sqrt(numel(x) * qmax)`` (torch's ``_fake_quantize_learnable_*`` ops). Wraps the
    FakeQuantize it stands for; :meth:`write_back` stores the learned step in it.
    """

    def __init__(self, fake_quant: nn.Module) -> None:
        """Wrap ``fake_quant`` (an enabled torch.ao FakeQuantize, observer off)."""
        super().__init__()
        self.fake_quant = fake_quant
        fq: Any = fake_quant
        self.scale = nn.Parameter(fq.scale.detach().clone().float())
        self.register_buffer("zero_point", fq.zero_point.detach().clone().float())
        self.qmin, self.qmax = int(fq.quant_min), int(fq.quant_max)
        self.axis = int(fq.ch_axis) if fq.is_per_channel else None
        # the grid as a FakeQuantize names it (zq_plugin.oscillation reads these)
        self.quant_min, self.quant_max, self.ch_axis = self.qmin, self.qmax, self.axis or 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with the learned step (same shape and dtype)."""
        grad_factor = 1.0 / math.sqrt(x.numel() * max(self.qmax, 1))
        scale = self.scale.abs().clamp_min(1e-8).to(x.dtype)
        zero_point = cast(torch.Tensor, self.zero_point).to(x.dtype)
        if self.axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero_point, self.qmin, self.qmax, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, self.axis, self.qmin, self.qmax, grad_factor
        )

    def write_back(self) -> nn.Module:
        """The wrapped FakeQuantize with the learned step in its ``scale`` buffer."""
        fq: Any = self.fake_quant
        with torch.no_grad():
            fq.scale.copy_(self.scale.detach().abs().clamp_min(1e-8).to(fq.scale.dtype))
        return self.fake_quant


def _swap_steps(sim: fx.GraphModule, learn: bool) -> None:
    """Wrap every enabled FakeQuantize of ``sim`` in :class:`LearnedStep` (``learn``) or unwrap them."""
    from zq_plugin import _compat

    wanted = LearnedStep if not learn else _compat.FakeQuantize
    found = [(name, m) for name, m in sim.named_modules() if isinstance(m, wanted)]
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = sim.get_submodule(parent_name) if parent_name else sim
        if isinstance(module, LearnedStep):
            setattr(parent, attr, module.write_back())
        elif bool(cast(Any, module).fake_quant_enabled[0]):
            setattr(parent, attr, LearnedStep(module))


class _Run:
    """One fine-tuning run's trainable state: student, optional generator, optimizers, RNG, step."""

    def __init__(
        self,
        teacher: nn.Module,
        student: fx.GraphModule,
        generator: ConditionalGenerator | None,
        config: AdaDFQConfig,
        *,
        images: torch.Tensor | None,
        labels: torch.Tensor | None,
        batch_size: int,
        input_range: tuple[float, float] | None,
        num_classes: int,
        seed: int,
        check_images: torch.Tensor | None = None,
    ) -> None:
        self.teacher, self.student, self.generator, self.config = teacher, student, generator, config
        self.images, self.labels = images, labels
        # the held-out check set: a fixed share of a fixed image set (never trained on), or the
        # calibration images a generator made at the start
        self.train_index: torch.Tensor | None = None
        self.held: torch.Tensor | None = check_images
        if images is not None:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 2))
            held = round(len(images) * config.holdout) if len(images) >= 16 else 0
            self.train_index = order[: len(images) - held] if held else order
            self.held = images[order[len(images) - held :]] if held else (images if config.holdout > 0 else None)
        self.batch_size, self.input_range, self.num_classes = batch_size, input_range, num_classes
        self.device, self.dtype = model_device_dtype(teacher)
        self.rng = torch.Generator().manual_seed(seed)
        self.step = 0
        self.rank, self.world = dist_info()
        # under torchrun: every rank draws the whole batch from the same stream and trains on its
        # slice; DDP averages the gradients, so the update is the single-process one of that batch
        self.trained_student: nn.Module = student
        self.trained_generator: nn.Module | None = generator
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.trained_student = DistributedDataParallel(student)
            if generator is not None:
                self.trained_generator = DistributedDataParallel(generator)
        params = [p for p in student.parameters() if p.requires_grad]
        self.opt_s = torch.optim.SGD(params, lr=config.lr_student, momentum=0.9, nesterov=True, weight_decay=1e-4)
        student_steps = config.steps - (config.warmup if generator is not None else 0)
        self.sched_s = torch.optim.lr_scheduler.LambdaLR(
            self.opt_s, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, student_steps) / student_steps))
        )
        self.opt_g = (
            torch.optim.Adam(generator.parameters(), lr=config.lr_generator, betas=(0.5, 0.999))
            if generator is not None
            else None
        )
        self.bns = require_batchnorm(teacher, "adadfq") if generator is not None else {}
        self.targets = running_moments(self.bns)
        layers = {n: m for n, m in student.named_modules() if _quantized_weight(m)}
        remedy = cast(Any, config.oscillation)
        self.oscillations = WeightOscillations(
            layers,
            OscillationConfig(remedy=remedy, threshold=config.freeze_threshold, dampen_weight=config.dampen_weight),
        )
        self.held_teacher: torch.Tensor | None = None
        self.best: tuple[float, int, dict[str, torch.Tensor] | None] = (math.inf, 0, None)
        self.history: list[tuple[int, float]] = []

    # -- the held-out check ---------------------------------------------------------------------------
    @torch.no_grad()
    def held_loss(self) -> float:
        """Mean KL of the student's from the teacher's class probabilities on the check set (nats)."""
        held = cast(torch.Tensor, self.held)
        if self.held_teacher is None:
            self.held_teacher = torch.cat(
                [select_output(self.teacher(b.to(self.device, self.dtype))).float() for b in held.split(64)]
            ).log_softmax(1)
        self.student.train(False)
        student = torch.cat(
            [select_output(self.student(b.to(self.device, self.dtype))).float() for b in held.split(64)]
        )
        kl = torch.nn.functional.kl_div(student.log_softmax(1), self.held_teacher, log_target=True, reduction="sum")
        return float(kl) / len(held)

    def check(self) -> None:
        """Measure the check set; keep the student's state if it is the best so far."""
        if self.held is None:
            return
        loss = self.held_loss()
        self.history.append((self.step, loss))
        if loss < self.best[0]:
            state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            self.best = (loss, self.step, state)

    def restore_best(self) -> None:
        """Put the best checked state back into the student (the last one if nothing was checked)."""
        if self.best[2] is not None:
            self.student.load_state_dict(self.best[2])

    # -- one iteration --------------------------------------------------------------------------------
    def advance(self) -> dict[str, float]:
        """One iteration; returns its losses."""
        config, out = self.config, {}
        labels: torch.Tensor | None
        if self.generator is not None:
            x, labels, z_p, parts = self._generator_step()
            out.update({f"g_{k}": v for k, v in parts.items()})
            train_student = self.step >= config.warmup
        else:
            x, labels = self._fixed_batch()
            with torch.no_grad():
                z_p = select_output(self.teacher(x))
            train_student = True
        if train_student:
            self.student.train(False)
            z_q = select_output(self.trained_student(x))
            loss = student_loss(
                z_q,
                z_p,
                labels,
                kind=config.student_loss,
                temperature=config.temperature,
                hard_threshold=config.hard_threshold,
            )
            loss = loss + self.oscillations.dampening_loss()
            if not math.isfinite(float(loss.detach())):
                raise ModelError(f"the student loss became {float(loss)} at iteration {self.step}; lower lr_student.")
            self.opt_s.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_s.step()
            self.sched_s.step()
            self.oscillations.after_step()
            out["student"] = float(loss.detach())
        self.step += 1
        return out

    def _generator_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        opt_g, trained_generator = cast(torch.optim.Optimizer, self.opt_g), cast(nn.Module, self.trained_generator)
        config = self.config
        z, labels = sample_inputs(config, self.num_classes, self.batch_size, self.rng, self.device, self.dtype)
        z, labels = self._mine(z), self._mine(labels)
        x = generate(trained_generator, z, labels, input_range=self.input_range, lowpass=config.lowpass)
        with bn_sums(dict(self.bns)) as stats:
            z_p = select_output(self.teacher(x))
            bns = batchnorm_statistics_loss(stats, self.targets)
        self.student.requires_grad_(False)  # the generator's loss reaches the images, not the student
        try:
            z_q = select_output(self.student(x))
        finally:
            for p in self.student.parameters():
                p.requires_grad_(True)
        loss, parts = generator_loss(z_p, z_q, labels, bns, config)
        if not math.isfinite(float(loss.detach())):
            raise ModelError(f"the generator loss became {float(loss)} at iteration {self.step}; lower lr_generator.")
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        return x.detach(), labels, z_p.detach(), parts

    def _fixed_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = cast(torch.Tensor, self.images)  # a run without a generator always has images
        pool = cast(torch.Tensor, self.train_index)
        index = self._mine(pool[torch.randint(0, len(pool), (self.batch_size,), generator=self.rng)])
        x = images[index].to(self.device, self.dtype)
        return x, None if self.labels is None else self.labels[index].to(self.device)

    def _mine(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a batch drawn for all ranks (the whole batch without a group)."""
        share = len(batch) // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (CPU tensors)."""

        def cpu(sd: dict[str, Any]) -> dict[str, Any]:
            return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}

        blob: dict[str, Any] = {
            "step": self.step,
            "rng": self.rng.get_state(),
            "student": cpu(self.student.state_dict()),
            "opt_s": self.opt_s.state_dict(),
            "sched_s": self.sched_s.state_dict(),
            "oscillations": self.oscillations.state_dict(),
            "best": {
                "loss": self.best[0],
                "step": self.best[1],
                "state": None if self.best[2] is None else cpu(self.best[2]),
            },
            "history": [list(h) for h in self.history],
        }
        if self.generator is not None and self.opt_g is not None:
            blob.update(generator=cpu(self.generator.state_dict()), opt_g=self.opt_g.state_dict())
        return blob

    def load(self, blob: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.step = int(blob["step"])
        self.rng.set_state(blob["rng"])
        self.student.load_state_dict(blob["student"])
        self.opt_s.load_state_dict(blob["opt_s"])
        self.sched_s.load_state_dict(blob["sched_s"])
        self.oscillations.load_state_dict(blob["oscillations"])
        best = blob["best"]
        self.best = (float(best["loss"]), int(best["step"]), best["state"])
        self.history = [(int(step), float(loss)) for step, loss in blob["history"]]
        if self.generator is not None and self.opt_g is not None:
            self.generator.load_state_dict(blob["generator"])
            self.opt_g.load_state_dict(blob["opt_g"])


def _quantized_weight(module: nn.Module) -> bool:
    """A layer whose weight is fake-quantized and trains (an enabled weight quantizer, per channel or not)."""
    fq = getattr(module, "weight_fake_quant", None)
    if fq is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    enabled = getattr(fq, "fake_quant_enabled", None)
    return enabled is None or bool(enabled[0])


def _checkpoint(folder: Path) -> Path:
    return folder / "state.pt"


def _resume(folder: Path, run: _Run) -> None:
    path = _checkpoint(folder)
    if not path.is_file():
        return
    try:
        run.load(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a damaged checkpoint is recomputed, never trusted
        logger.warning("ignoring fine-tuning checkpoint %s (%s)", path, exc)
        return
    logger.info("resuming fine-tuning at iteration %d from %s", run.step, path)


def _images_and_labels(data: CalibrationData) -> tuple[torch.Tensor, torch.Tensor | None]:
    labels = getattr(data, "labels", None)
    images = data if isinstance(data, torch.Tensor) else torch.cat(list(iter_batches(data, 64)))
    if images.dim() < 2 or len(images) == 0:
        raise ConfigError(f"fine-tuning needs a batch of images [N, ...], got shape {tuple(images.shape)}.")
    if labels is not None and len(labels) != len(images):
        labels = None
    return images.detach().cpu(), None if labels is None else labels.cpu().long()


def _num_classes(model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> int:
    with torch.no_grad():
        out = select_output(model(torch.zeros(2, *shape, device=device, dtype=dtype)))
    if out.dim() != 2:
        raise ModelError(f"the model's logits have shape {tuple(out.shape)}; fine-tuning needs [N, classes].")
    return int(out.shape[1])


def _checked_config(
    config: AdaDFQConfig | None,
    generator: str | None,
    *,
    w_bits: int,
    a_bits: int,
    first_last_bits: int | None,
    init: str,
    steps: int | None,
    batch_size: int,
    calibration_samples: int,
    checkpoint_every: int,
    reconstruct_config: Any = None,
) -> AdaDFQConfig:
    """:func:`finetune`'s arguments checked (named :class:`ConfigError` s); the config the run uses."""
    from zq_plugin.qparams import check_bits

    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if first_last_bits is not None:
        check_bits(first_last_bits, "first_last_bits")
    if generator is not None and generator not in GENERATORS:
        raise ConfigError(f"generator={generator!r} is not one of {sorted(GENERATORS)}.")
    counts = {
        "batch_size": batch_size,
        "calibration_samples": calibration_samples,
        "checkpoint_every": checkpoint_every,
    }
    if steps is not None:
        counts["steps"] = steps
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive int.")
    if init not in ("calibrate", "reconstruct"):
        raise ConfigError(f"init={init!r} is not 'calibrate' or 'reconstruct'.")
    if reconstruct_config is not None and init != "reconstruct":
        raise ConfigError("reconstruct_config applies to init='reconstruct' (the student starts calibrated otherwise).")
    world = dist_info()[1]
    if batch_size % world:
        raise ConfigError(
            f"batch_size={batch_size} is the batch of all {world} processes together and must divide among them."
        )
    config = config if config is not None else GENERATORS[generator or "adadfq"]()
    changes: dict[str, Any] = {"w_bits": w_bits, "a_bits": a_bits}
    if steps is not None:
        changes["steps"] = steps
        if generator is not None and config.warmup >= steps:  # keep the warm-up's share of the run
            changes["warmup"] = min(round(config.warmup * steps / config.steps), steps - 1)
            logger.warning(
                "steps=%d leaves no room for the %d generator-only warm-up iterations; the warm-up is scaled "
                "with the steps to %d (set config.warmup, or --option warmup=N, to choose it).",
                steps, config.warmup, changes["warmup"],
            )  # fmt: skip
    if generator is None:
        changes["warmup"] = 0
    return dataclasses.replace(config, **changes)


def _train(run: _Run, folder: Path | None, checkpoint_every: int, progress: bool) -> dict[str, float]:
    """Advance ``run`` to its last iteration, checkpointing under ``folder``; the last losses."""
    losses: dict[str, float] = {}
    config = run.config
    every = max((config.steps - config.warmup) // config.checks, 1)
    if run.step == 0:
        run.check()  # the starting student is a candidate: fine-tuning never ends worse on the check set
    bar = tqdm(range(run.step, run.config.steps), desc="finetune", disable=None if progress else True)
    for _ in bar:
        losses = run.advance()
        trained = run.step - config.warmup
        if trained > 0 and (trained % every == 0 or run.step == config.steps):
            run.check()
        if run.step % 10 == 0:
            bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
        if folder is not None and (run.step % checkpoint_every == 0 or run.step == run.config.steps):
            if run.rank == 0:
                atomic_torch_save(run.state(), _checkpoint(folder))
            if run.world > 1:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint it may resume from
    return losses


def finetune(
    model: nn.Module,
    data: CalibrationData | None = None,
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    first_last_bits: int | None = 8,
    generator: str | None = None,
    steps: int | None = None,
    config: AdaDFQConfig | None = None,
    init: Init = "calibrate",
    reconstruct_config: Any = None,
    plan: BitPlan | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_range: tuple[float, float] | Literal["auto"] | None = "auto",
    batch_size: int = 64,
    calibration_samples: int = 256,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
) -> fx.GraphModule:
    """Fine-tune a quantized copy of ``model`` by distillation, on a generator or on ``data``.

    Args:
        model: the trained float model (not changed: weights, buffers, modes, hooks).
        data: calibration images (any source; labels of a :class:`~zq_plugin.data.SyntheticDataset`
            are used): they initialize the student and, without ``generator``, are the fixed set
            it is fine-tuned on. ``None``: a generator (AdaDFQ's by default) plays the game and
            its first ``calibration_samples`` images initialize the student.
        w_bits: weight bits of all but the first and last layer (2-8).
        a_bits: activation bits of all but the first and last layer (2-8).
        first_last_bits: bits of the first and last layer; ``None``: like the others (all layers
            quantized, the fine-tuning literature's setting).
        generator: ``"adadfq"`` or ``"gdfq"`` (:data:`GENERATORS`): fine-tune on the generator's
            stream (with ``data``, the data still initialize the student); ``None``: on ``data``,
            or on AdaDFQ's generator when there are no data.
        steps: iterations (replaces ``config.steps``). The generator-only warm-up
            (``config.warmup``) is kept; if it does not fit in ``steps`` it is scaled to the
            same share of ``steps`` (with a warning).
        config: the game's and the student's options (:class:`~zq_plugin.synth.adadfq.AdaDFQConfig`;
            default: the generator's). With ``data`` only the student's options apply and there is
            no warm-up.
        init: the student before fine-tuning: ``"calibrate"`` (MSE observers) or ``"reconstruct"``
            (:func:`zq_plugin.reconstruct_fx` with Genie-M on the calibration images).
        reconstruct_config: with ``init="reconstruct"``, the reconstruction's
            :class:`~zq_plugin.reconstruct.ReconstructConfig` (default: Genie-M's).
        plan: per-layer bits (:class:`~zq_plugin.mixed_precision.BitPlan`) instead of ``w_bits``,
            ``a_bits`` and ``first_last_bits``; each layer's input is quantized at its ``a_bits``
            (as PT2E reads a plan: :func:`zq_plugin.backends.pt2e.from_sim` then carries every
            step of the result into a converted PT2E model).
        input_shape: one image's shape, e.g. ``(1, 28, 28)``; needed with a generator.
        input_range: the valid input box (``"auto"``: ``model.input_range``); generated images are clamped to it.
        batch_size: images per iteration (of all processes together under ``torchrun``).
        calibration_samples: images that calibrate the student with a generator (drawn from it first).
        seed: the same seed and arguments give the same model.
        cache_dir: keep a checkpoint every ``checkpoint_every`` iterations under
            ``cache_dir/finetune-<key>/``; the same call resumes there to the same result.
        checkpoint_every: iterations between checkpoints.
        progress: a tqdm bar with the losses.

    Returns:
        The fine-tuned clamping simulation (eval mode); ``.zq_finetune`` records the options,
        the last losses and the seconds taken; with a generator, ``.zq_generator`` is the
        trained generator as a :class:`~zq_plugin.synth.stream.GeneratorStream` (save it, stream
        from it). ``convert_fx``, :func:`zq_plugin.accuracy` and
        :func:`zq_plugin.backends.fx.export_sim` take it like any :func:`zq_plugin.quantize_fx` result.

    Raises:
        ConfigError: bad bits, steps, batch size, generator name or options; no ``input_shape``
            with a generator.
        ModelError: a generator on a model without BatchNorm (give ``data``), logits that are
            not ``[N, classes]``, non-finite losses.

    Example:
        >>> import torch, zq_plugin
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
        >>> q = zq_plugin.finetune(net, w_bits=4, a_bits=4, steps=4, input_shape=(1, 8, 8), batch_size=8,
        ...                        calibration_samples=16, progress=False, config=AdaDFQConfig(steps=4, warmup=1))
        >>> q(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """
    from zq_plugin.reconstruct.engine import _tensor_hash
    from zq_plugin.synth.api import resolve_input_range

    if generator is None and data is None:
        generator = "adadfq"
    config = _checked_config(
        config, generator, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits, init=init, steps=steps,
        batch_size=batch_size, calibration_samples=calibration_samples, checkpoint_every=checkpoint_every,
        reconstruct_config=reconstruct_config,
    )  # fmt: skip
    device, dtype = model_device_dtype(model)
    started = time.perf_counter()
    with frozen(model):
        images: torch.Tensor | None = None
        labels: torch.Tensor | None = None
        shape = input_shape
        if data is not None:
            images, labels = _images_and_labels(data)
            shape = tuple(images.shape[1:])
        if shape is None:
            raise ConfigError("a generator needs input_shape=(C, H, W) (one image's shape, e.g. (1, 28, 28)).")
        shape = tuple(int(v) for v in shape)
        num_classes = _num_classes(model, shape, device, dtype)
        box, gen_module = None, None  # the input box matters only to images the generator makes
        if generator is not None:
            require_batchnorm(model, generator, argument="generator", fix=_NO_BN_FIX)
            box = resolve_input_range(model, input_range)
            with torch.random.fork_rng(devices=[]):  # the generator's init draws from torch's global RNG
                torch.manual_seed(seed)
                gen_module = ConditionalGenerator(shape, num_classes, config.latent_dim, config.width)
            gen_module = gen_module.to(device, dtype)
        if images is not None:
            calibration = images
        else:
            gen_module = cast(ConditionalGenerator, gen_module)  # no images: a generator was made above
            calib_rng = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                z, y = sample_inputs(config, num_classes, calibration_samples, calib_rng, device, dtype)
                calibration = generate(gen_module, z, y, input_range=box, lowpass=config.lowpass)
        student = fx_student(
            model,
            calibration.to(device, dtype),
            w_bits=w_bits,
            a_bits=a_bits,
            first_last_bits=first_last_bits,
            init=init,
            plan=plan,
            seed=seed,
            cache_dir=cache_dir,
            reconstruct_config=reconstruct_config,
        )
        if config.learn_steps:
            _swap_steps(student, learn=True)
        run = _Run(
            model,
            student,
            gen_module,
            config,
            images=images,
            labels=labels,
            batch_size=batch_size,
            input_range=box,
            num_classes=num_classes,
            seed=seed,
            check_images=None if images is not None or config.holdout == 0 else calibration.detach().cpu(),
        )
        folder = None
        if cache_dir is not None:
            key = run_key(
                model=model_fingerprint(model),
                data=None if images is None else _tensor_hash(images),
                config=dataclasses.asdict(config),
                generator=generator,
                first_last_bits=first_last_bits,
                plan=None if plan is None else plan.to_json(),
                init=init,
                reconstruct=None if reconstruct_config is None else dataclasses.asdict(reconstruct_config),
                batch_size=batch_size,
                calibration_samples=calibration_samples,
                input_range=box,
                seed=seed,
                code=method_code_hash(_Run),
            )
            folder = Path(cache_dir) / f"finetune-{key}"
            _resume(folder, run)
        losses = _train(run, folder, checkpoint_every, progress)
        run.restore_best()
    if config.learn_steps:
        _swap_steps(student, learn=False)
    student.eval()
    if gen_module is not None and generator is not None:
        from zq_plugin.synth.stream import GeneratorStream

        student.zq_generator = GeneratorStream(  # type: ignore[assignment]
            gen_module,
            method=generator,
            batch_size=batch_size,
            seed=seed,
            input_range=box,
            lowpass=config.lowpass,
            model_fingerprint=model_fingerprint(model),
            options=dataclasses.asdict(config),
        )
    student.zq_finetune = {  # type: ignore[assignment]
        "generator": generator,
        "config": {**dataclasses.asdict(config)},
        "init": init,
        "plan": plan,
        "last_losses": losses,
        "held_out": [{"step": step, "kl": loss} for step, loss in run.history],
        "kept_step": run.best[1] if run.best[2] is not None else run.step,
        "frozen_weights": run.oscillations.frozen_count(),
        "oscillating_share": run.oscillations.oscillating_share(),
        "seconds": time.perf_counter() - started,
    }
    return student


# The game's synthesizers live with the game: synthesize(method="adadfq"/"gdfq") plays it here and
# samples the batch from the trained generator (registered when zq_plugin is imported).
def _play(model: nn.Module, config: AdaDFQConfig, ctx: BatchContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of ``synthesize(method="adadfq"/"gdfq")`` from the call's one trained generator.

    The first batch of a call plays the game (``config.steps`` iterations against a
    W``w_bits``A``a_bits`` student, first/last at 8 bits, seeded by the call's seed) and keeps the
    generator in ``ctx.shared``; every batch, the first included, is then sampled from it with
    the batch's own seeded latents and labels, so a call trains one generator however many
    batches it makes, and batch ``b`` is the same whichever batch came first.
    """
    from zq_plugin.synth.adadfq import generate
    from zq_plugin.synth.stream import GeneratorStream

    stream = ctx.shared.get("generator")
    if stream is None:
        student = finetune(
            model,
            generator=method,
            config=config,
            w_bits=config.w_bits,
            a_bits=config.a_bits,
            input_shape=ctx.input_shape,
            input_range=ctx.input_range,
            batch_size=ctx.batch_size,
            calibration_samples=max(ctx.batch_size, 64),
            seed=ctx.seed,
            progress=ctx.progress,
        )
        stream = ctx.shared["generator"] = cast(GeneratorStream, student.zq_generator)  # set with a generator
    net = stream.generator
    z = torch.randn(ctx.batch_size, net.latent_dim, generator=ctx.generator)
    labels = torch.randint(0, net.num_classes, (ctx.batch_size,), generator=ctx.generator)
    with torch.no_grad():
        images = generate(net, z, labels, input_range=stream.input_range, lowpass=stream.lowpass)
    return images, labels


@register("adadfq", AdaDFQConfig, needs_batchnorm=True)
def make_adadfq(model: nn.Module, config: AdaDFQConfig, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch ``([n, *input_shape], [n])`` from a generator trained by AdaDFQ's game."""
    return _play(model, config, ctx, "adadfq")


@register("gdfq", GDFQConfig, needs_batchnorm=True)
def make_gdfq(model: nn.Module, config: GDFQConfig, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch ``([n, *input_shape], [n])`` from a generator trained by GDFQ's game."""
    return _play(model, config, ctx, "gdfq")
