"""Block-wise output reconstruction on calibration data, inside the clamping FX simulation.

The model is folded (BatchNorm into the convolutions, :func:`torch.fx.experimental.optimization.fuse`)
and put into the clamping simulation of :func:`zq_plugin.quantize_fx` (MSE observers, unfolded
weight fake-quantizers). A copy of it with every fake-quantizer off, taken before any unit
changes, is the float teacher (:func:`float_teacher`). Then, unit by unit
(:func:`~zq_plugin.reconstruct.blocks.find_blocks`, or every weight layer alone for AdaRound),
with the earlier units already reconstructed (:func:`reconstruct_unit`):

1. cache the teacher's input ``x`` and output ``y`` of the unit and the quantized model's input
   ``x_q`` (earlier units quantized), over all calibration images;
2. swap the unit's weight fake-quantizers for :class:`LearnedRoundingWeight` (initial steps from
   the calibrated observers) and its activation fake-quantizers for :class:`LSQActivation`;
3. minimize ``sum_c (unit(x_in) - y)^2 + round_weight * sum(1 - |2 h(V) - 1|^beta)`` (channels
   summed, images and positions averaged) over random mini-batches, ``x_in`` being QDrop's
   element-wise mix of ``x_q`` and ``x`` (probability ``drop_prob`` for the float value),
   ``beta`` annealed 20 -> 2 after a 20 % warm-up (BRECQ, QDrop, Genie-M; AdaRound per layer);
4. keep the state whose held-out error (hard rounding) was lowest, if it beats the calibrated
   quantizers, and write it back: each weight becomes its fake-quantized value ``s * int`` and
   its fake-quantizer's step ``s``, each activation fake-quantizer its learned step; the learned
   modules are swapped out again.

The result is again a ``prepare_qat_fx``-style ``GraphModule`` (fixed rounded weights, learned
steps), evaluated as it is (no calibration needed), converted by ``convert_fx`` at 8 bits,
or saved with :func:`~zq_plugin.backends.fx.export_sim`. The source model is never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from zq_plugin import _compat
from zq_plugin._utils import model_device_dtype, weight_layer_names
from zq_plugin.data import CalibrationData, atomic_torch_save, iter_batches, model_fingerprint
from zq_plugin.errors import ConfigError
from zq_plugin.plan import BitPlan
from zq_plugin.reconstruct.blocks import Block, find_blocks, find_layers
from zq_plugin.reconstruct.graph import block_module, node_values
from zq_plugin.reconstruct.quantizers import LearnedRoundingWeight, LSQActivation, beta_at, qdrop_mask
from zq_plugin.runs import method_code_hash, run_key

logger = logging.getLogger(__name__)


#: How the iterations are spread over the units (:attr:`ReconstructConfig.schedule`).
SCHEDULES = ("uniform", "error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconstructConfig:
    """How each unit is reconstructed.

    Attributes:
        units: ``"block"`` (units between cut points: BRECQ, QDrop, Genie-M) or ``"layer"``
            (every weight layer alone: AdaRound).
        iterations: optimizer steps per unit (the papers' codes: 20,000 for BRECQ/QDrop/Genie-M,
            10,000 for AdaRound; fewer are used here until measured).
        batch_size: images per step (the codes: 32).
        learn_weight_scale: learn each layer's weight steps with the rounding (Genie-M), else keep them.
        learn_act_scale: learn the activation steps inside the unit (LSQ), else keep the calibrated ones.
        drop_prob: QDrop's probability that an activation element keeps its float value (0.5 in
            QDrop and Genie-M; 0 disables it).
        round_weight: ``lambda`` of the rounding regularizer (Genie-M's code 1.0; AdaRound/BRECQ 0.01).
        warmup: the fraction of iterations before the regularizer starts (0.2 everywhere).
        lr_rounding, lr_weight_scale, lr_act_scale: Adam learning rates (Genie-M's code: 1e-3,
            1e-4, 4e-5). The weight step is learned as a factor of its initial value, so its rate
            is relative (the code's is absolute).
        holdout: the share of calibration images held out to check each unit (none of the papers
            does; see :func:`reconstruct_unit`); 0 checks on the training images.
        checks: how many times per unit the held-out error is measured (the best state is kept).
        schedule: ``"uniform"`` (every unit ``iterations`` steps, as the papers) or ``"error"``
            (the same total, spread by each unit's output error with its quantized input:
            :func:`iteration_schedule`).
    """

    units: str = "block"
    iterations: int = 500
    batch_size: int = 32
    learn_weight_scale: bool = True
    learn_act_scale: bool = True
    drop_prob: float = 0.5
    round_weight: float = 1.0
    warmup: float = 0.2
    lr_rounding: float = 1e-3
    lr_weight_scale: float = 1e-4
    lr_act_scale: float = 4e-5
    holdout: float = 0.125
    checks: int = 10
    schedule: str = "uniform"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.units not in ("block", "layer"):
            raise ConfigError(f"units must be 'block' or 'layer', got {self.units!r}.")
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("iterations and batch_size must be >= 1.")
        if not 0.0 <= self.drop_prob <= 1.0 or not 0.0 <= self.warmup < 1.0 or self.round_weight < 0:
            raise ConfigError("drop_prob must lie in [0, 1], warmup in [0, 1) and round_weight be >= 0.")
        if not 0.0 <= self.holdout < 1.0 or self.checks < 1:
            raise ConfigError(f"holdout must lie in [0, 1) and checks be >= 1, got {self.holdout}, {self.checks}.")


#: The methods by name; each paper's own code defaults are in :class:`ReconstructConfig`'s docstring.
METHODS: dict[str, ReconstructConfig] = {
    "adaround": ReconstructConfig(
        units="layer", learn_weight_scale=False, learn_act_scale=False, drop_prob=0.0, round_weight=0.01
    ),
    "brecq": ReconstructConfig(learn_weight_scale=False, learn_act_scale=True, drop_prob=0.0, round_weight=0.01),
    "qdrop": ReconstructConfig(learn_weight_scale=False, learn_act_scale=True, drop_prob=0.5, round_weight=0.01),
    "genie-m": ReconstructConfig(),
}


class _LearnedWeightFQ(nn.Module):
    """Stands in for a layer's ``weight_fake_quant``: returns the learned weight, whatever it is given."""

    def __init__(self, learned: LearnedRoundingWeight) -> None:
        super().__init__()
        self.learned = learned

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.learned()


def _is_fake_quant(module: nn.Module) -> bool:
    return isinstance(module, _compat.FakeQuantize)


def float_teacher(sim: fx.GraphModule) -> fx.GraphModule:
    """A copy of the simulation ``sim`` with every fake-quantizer off: the float model, node for node."""
    teacher = copy.deepcopy(sim).eval()
    for module in teacher.modules():
        if _is_fake_quant(module):
            cast(Any, module).disable_fake_quant()
    return teacher


def _unit_list(gm: fx.GraphModule, units: str) -> list[Block]:
    """The units to reconstruct: blocks between cut points, or every weight layer alone (AdaRound)."""
    return find_layers(gm) if units == "layer" else find_blocks(gm)


def _swap_in(
    unit: fx.GraphModule,
    block: Block,
    modules: dict[str, nn.Module],
    config: ReconstructConfig,
    seed: int,
    device: torch.device,
) -> tuple[list[tuple[nn.Module, Any, LearnedRoundingWeight]], list[tuple[nn.Module, str, Any, LSQActivation]]]:
    weights = []
    for name in block.layers:
        layer = modules[name]
        fq = getattr(layer, "weight_fake_quant", None)
        if fq is None or not _is_fake_quant(fq):
            continue
        if not fq.is_per_channel or int(fq.fake_quant_enabled[0]) == 0:
            continue  # per-tensor weights (ConvTranspose at int8) and float layers keep their quantizer
        learned = LearnedRoundingWeight(
            cast(torch.Tensor, layer.weight),
            fq.scale.detach(),
            int(fq.quant_min),
            int(fq.quant_max),
            ch_axis=int(fq.ch_axis),
            learn_scale=config.learn_weight_scale,
        )
        layer.weight_fake_quant = _LearnedWeightFQ(learned)
        weights.append((layer, fq, learned))
    acts = []
    generator = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, LSQActivation] = {}  # one learned step per quantizer, also where FX shares it (ReLU6, pooling)
    for node in unit.graph.nodes:
        if node.op != "call_module":
            continue
        parent_name, _, child = str(node.target).rpartition(".")
        module: Any = unit.get_submodule(str(node.target))
        if not _is_fake_quant(module) or module.is_per_channel or int(module.fake_quant_enabled[0]) == 0:
            continue
        lsq = made.get(id(module))
        if lsq is None:
            lsq = made[id(module)] = LSQActivation(
                module.scale.detach(), int(module.zero_point), int(module.quant_min), int(module.quant_max),
                drop_prob=config.drop_prob,
            )  # fmt: skip
            lsq.scale.requires_grad_(config.learn_act_scale)
            lsq.generator = generator
        parent = unit.get_submodule(parent_name) if parent_name else unit
        setattr(parent, child, lsq)
        acts.append((parent, child, module, lsq))
    return weights, acts


@torch.no_grad()
def _write_back(
    weights: list[tuple[nn.Module, Any, LearnedRoundingWeight]], acts: list[Any], *, keep: bool = True
) -> None:
    """Put the calibrated fake-quantizers back; with ``keep``, holding the learned rounding and steps."""
    for layer, fq, learned in weights:
        if keep:
            learned.hard = True
            cast(torch.Tensor, layer.weight).copy_(learned())
            fq.scale.copy_(learned.scale.detach().abs())
            fq.zero_point.zero_()
        layer.weight_fake_quant = fq
    for parent, child, fq, lsq in acts:
        if keep:
            fq.scale.copy_(lsq.scale.detach().abs().reshape(fq.scale.shape))
        setattr(parent, child, fq)


def _fused_adam(t: torch.Tensor) -> bool:
    """Adam's fused kernel (torch >= 2.4 on CPU and CUDA): one call per step instead of a dozen ops per tensor."""
    return t.device.type in ("cpu", "cuda") and t.dtype in (torch.float32, torch.float64)


def _split(n: int, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out image indices: a fixed permutation (one for every unit), the last ``holdout`` held out.

    Fewer than 32 images, or ``holdout == 0``: every image trains and is also the check set.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = round(n * holdout) if n >= 32 else 0
    if held == 0:
        return order, order
    return order[: n - held], order[n - held :]


def _learned(weights: list[Any], acts: list[Any]) -> list[torch.Tensor]:
    """Every tensor the unit learns: each layer's ``V`` and step factor, each activation step."""
    return [t for _, _, w in weights for t in (w.v, w.scale_factor)] + [a.scale for *_, a in acts]


def _snapshot(weights: list[Any], acts: list[Any]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _learned(weights, acts)]


@torch.no_grad()
def _restore(weights: list[Any], acts: list[Any], state: list[torch.Tensor]) -> None:
    for target, value in zip(_learned(weights, acts), state, strict=True):
        target.copy_(value)


def reconstruct_unit(
    gm: fx.GraphModule,
    block: Block,
    images: torch.Tensor,
    config: ReconstructConfig,
    *,
    teacher: fx.GraphModule,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Reconstruct one unit of the simulation ``gm`` in place and say how its output error changed.

    ``teacher`` is a copy of ``gm`` taken before any unit was reconstructed, with every
    fake-quantizer off (:func:`float_teacher`): reconstruction writes each unit's rounded
    weights into ``gm``, so ``gm`` itself with its quantizers off is no longer the float model
    after the first unit (a teacher drifting that way lost 27 points on mobilenetv2_s).

    The images (``[N, C, H, W]``) are split: ``config.holdout`` of them (the same for every unit) are held out and
    only check the unit, the rest train it. Every ``iterations / checks`` steps, and before the
    first, the unit's output error on the held-out images is measured as it would be used (hard
    rounding, every element quantized, quantized input); the unit keeps the state that measured
    best. A unit that no learned state improves keeps its calibrated quantizers (round-to-nearest
    weights): reconstruction never makes a unit's held-out error worse. With 256 images of 28x28,
    learning past a few hundred steps fits the training images and loses accuracy (measured:
    docs/reconstruction.md), which this check guards against for any data size.

    Returns:
        ``{"train_before", "train_after", "held_before", "held_after", "best_step", "seconds",
        "step_seconds"}``: mean squared output errors against the float teacher (``before``: the
        calibrated quantizers), the step of the kept state (0: none improved), the unit's wall
        time and the mean time of one optimization step (the checks and the caching excluded).
    """
    started = time.perf_counter()
    batches = list(images.split(64))
    x_fp = torch.cat(node_values(teacher, block.input, batches))
    y_fp = torch.cat(node_values(teacher, block.output, batches))
    x_q = torch.cat(node_values(gm, block.input, batches))
    unit = block_module(gm, block)
    modules = dict(gm.named_modules())
    train_idx, held_idx = _split(len(images), config.holdout)

    def error(idx: torch.Tensor) -> float:
        """Mean squared output error on the images ``idx``, as used: hard rounding, eval mode."""
        unit.eval()
        total = 0.0
        with torch.no_grad():
            for part in idx.split(64):
                total += float(((unit(x_q[part]) - y_fp[part]) ** 2).sum())
        return total / max(len(idx) * y_fp[0].numel(), 1)

    report = {"train_before": error(train_idx), "held_before": error(held_idx)}
    weights, acts = _swap_in(unit, block, modules, config, seed, x_q.device)
    best: tuple[float, int, list[torch.Tensor] | None] = (report["held_before"], 0, None)
    keep = False
    try:
        groups = [
            {"params": [w.v for _, _, w in weights], "lr": config.lr_rounding},
            {
                "params": [w.scale_factor for _, _, w in weights if w.scale_factor.requires_grad],
                "lr": config.lr_weight_scale,
            },
            {
                "params": list({id(a): a.scale for *_, a in acts if a.scale.requires_grad}.values()),
                "lr": config.lr_act_scale,
            },
        ]
        params = [g for g in groups if g["params"]]
        generator = torch.Generator().manual_seed(seed)  # mini-batches
        masks = torch.Generator(device=x_q.device).manual_seed(seed + 1)  # QDrop at the unit's input
        every = max(config.iterations // max(config.checks, 1), 1)
        step_time = 0.0
        if params:
            optimizer = torch.optim.Adam(params, fused=_fused_adam(x_q))
            bar = tqdm(
                range(1, config.iterations + 1), desc=block.name, leave=False, disable=None if progress else True
            )
            norm = y_fp[0].numel() / y_fp.shape[1] if y_fp.dim() > 1 else 1.0  # positions per image
            training = False
            for step in bar:
                step_started = time.perf_counter()
                if not training:
                    # only the learned quantizers train (QDrop): BatchNorm that no conv absorbed (after a
                    # concatenation, pre-activation nets) and dropout keep their eval behaviour and statistics
                    for *_, lsq in acts:
                        lsq.train()
                    training = True
                idx = train_idx[
                    torch.randint(0, len(train_idx), (min(config.batch_size, len(train_idx)),), generator=generator)
                ]
                x_in = x_q.index_select(0, idx)  # index_select: 5x faster than x_q[idx] on a CPU
                if config.drop_prob > 0:
                    keep_float = qdrop_mask(
                        x_in.shape, config.drop_prob, generator=masks, device=x_in.device, dtype=x_in.dtype
                    )
                    x_in = torch.lerp(x_in, x_fp.index_select(0, idx), keep_float)
                beta = beta_at(step - 1, config.iterations, warmup=config.warmup)
                if config.round_weight <= 0:
                    beta = None
                for _, _, w in weights:
                    w.beta = beta  # the forward makes the regularizer with the weight (one node)
                out = unit(x_in)
                # sum over channels, mean over images and positions: one fused kernel and its backward
                loss = nn.functional.mse_loss(out, y_fp.index_select(0, idx), reduction="sum") / (len(idx) * norm)
                if beta is not None:
                    loss = loss + config.round_weight * sum(w.regularizer(beta) for _, _, w in weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_time += time.perf_counter() - step_started
                if step % every == 0 or step == config.iterations:
                    for _, _, w in weights:
                        w.hard = True
                    held = error(held_idx)
                    training = False
                    for _, _, w in weights:
                        w.hard = False
                    if held < best[0]:
                        best = (held, step, _snapshot(weights, acts))
                    bar.set_postfix(loss=f"{loss.item():.4g}", held=f"{held:.4g}", best=f"{best[0]:.4g}")
        keep = best[2] is not None
        if best[2] is not None:
            _restore(weights, acts, best[2])
    finally:
        _write_back(weights, acts, keep=keep)  # no state better than the calibrated one: nothing changes
    report.update(train_after=error(train_idx), held_after=error(held_idx), best_step=float(best[1]))
    report["step_seconds"] = step_time / config.iterations if params else 0.0
    report["seconds"] = time.perf_counter() - started
    return report


def spread_iterations(errors: list[float], mean: int, *, power: float = 0.5, spread: float = 4.0) -> list[int]:
    """Iterations per unit: ``mean`` on average, more where a unit's error is larger.

    Unit ``i`` gets a share proportional to ``e_i ** power`` of the total ``mean * n``, clipped
    to ``[mean / spread, mean * spread]``; what clipping frees or takes is spread over the
    unclipped units in the same proportions, so the total stays ``mean * n`` (up to rounding,
    at most ``n`` steps). Units with no error (or all errors equal) get ``mean`` each.

    Args:
        errors: each unit's relative output error (>= 0), in unit order.
        mean: the mean iterations per unit (>= 1).
        power: how strongly the error counts (0: uniform; 1: proportional).
        spread: the largest ratio of a unit's iterations to ``mean`` either way (>= 1).

    Returns:
        One count (>= 1) per unit.

    Example:
        >>> spread_iterations([1.0, 4.0, 0.0], 100)
        [92, 183, 25]
    """
    n = len(errors)
    if n == 0:
        return []
    weights = [max(e, 0.0) ** power for e in errors]
    if not math.isfinite(sum(weights)) or sum(weights) <= 0:
        return [mean] * n
    low, high = mean / spread, mean * spread
    total = float(mean * n)
    fixed: dict[int, float] = {}
    for _ in range(n):  # each round fixes at least one more unit at a bound, or ends
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        mass = sum(weights[i] for i in free)
        share = {i: left * weights[i] / mass if mass > 0 else left / len(free) for i in free}
        clipped = {i: min(max(v, low), high) for i, v in share.items() if not low <= v <= high}
        if not clipped:
            fixed.update(share)
            break
        fixed.update(clipped)
        if len(fixed) == n:
            break
    return [max(1, round(fixed[i])) for i in range(n)]


def iteration_schedule(
    sim: fx.GraphModule, teacher: fx.GraphModule, units: list[Block], images: torch.Tensor, config: ReconstructConfig
) -> list[int]:
    """Each unit's iterations under ``config.schedule``, from the calibrated simulation ``sim``.

    ``"error"``: a unit's error is its relative output error as the unit meets it,
    ``||unit_q(x_q) - y||^2 / ||y||^2`` (``x_q``: the calibrated simulation's input of the unit,
    earlier units quantized; ``y``: the teacher's output; the first 64 images). It grows as the
    unit's bits fall, where its layers are fragile (depthwise, gated), and downstream, where the
    error of earlier units arrives and the unit's reconstruction is what can absorb it. The
    iterations follow :func:`spread_iterations` (``e ** 0.5``, between a quarter and four times
    ``config.iterations``): the total, and so the time, stay those of the uniform schedule.

    Measured (mobilenetv2_s, W3A3 budget, zero data, 500 on average): 89.26 and 89.19 top-1 for
    seeds 0 and 1 against 89.62, 89.35 and 89.14 uniform for seeds 0-2; the unit's error with the
    float input instead gave 88.64 and 88.88 (it starves the classifier, which absorbs the
    accumulated error). Hence ``"uniform"`` stays the default (docs/reconstruction.md).

    Returns:
        Iterations per unit, in unit order.
    """
    if config.schedule == "uniform":
        return [config.iterations] * len(units)
    sample = [images[:64]]
    errors = []
    with torch.no_grad():
        for block in units:
            x_q = node_values(sim, block.input, sample)[0]
            y = node_values(teacher, block.output, sample)[0]
            unit = block_module(sim, block).eval()
            errors.append(float(((unit(x_q) - y) ** 2).sum() / (y**2).sum().clamp_min(1e-12)))
    return spread_iterations(errors, config.iterations)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("unit-*.pt")) if folder.is_dir() else []


def _resume(folder: Path, sim: fx.GraphModule, units: list[Block]) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest readable checkpoint into ``sim``; returns how many units it holds and their report."""
    for path in reversed(_checkpoints(folder)):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            done, report = int(blob["done"]), list(blob["report"])
            if not 0 < done <= len(units) or [r["unit"] for r in report] != [b.name for b in units[:done]]:
                raise ValueError("its units are not this model's")
            sim.load_state_dict(blob["state"])
        except Exception as exc:  # a damaged checkpoint is recomputed, never trusted
            logger.warning("ignoring reconstruction checkpoint %s (%s)", path, exc)
            continue
        logger.info("resuming reconstruction after %d of %d units from %s", done, len(units), path)
        return done, report
    return 0, []


def _save_checkpoint(folder: Path, sim: fx.GraphModule, done: int, report: list[dict[str, Any]]) -> None:
    """Write the state after ``done`` units atomically, then drop the older checkpoints."""
    path = folder / f"unit-{done:05d}.pt"
    state = {k: v.detach().cpu() for k, v in sim.state_dict().items()}
    atomic_torch_save({"done": done, "report": report, "state": state}, path)
    for old in _checkpoints(folder):
        if old != path:
            old.unlink(missing_ok=True)


def _images(data: CalibrationData, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """All calibration images as one tensor ``[N, ...]`` on the model's device and dtype."""
    images = data if isinstance(data, torch.Tensor) else torch.cat(list(iter_batches(data, 64)))
    if images.dim() < 2 or len(images) == 0:
        raise ConfigError(f"reconstruction needs a batch of images [N, ...], got shape {tuple(images.shape)}.")
    return images.detach().to(device=device, dtype=dtype)


def reconstruct_fx(
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
    observer: str = "mse",
    weight_observer: str = "mse",
) -> fx.GraphModule:
    """Quantize ``model`` in the clamping FX simulation and reconstruct it unit by unit on ``data``.

    BatchNorm is folded into the weights (torch's ``fuse``), the simulation is calibrated with the
    MSE observers (:func:`zq_plugin.quantize_fx`, unfolded weight fake-quantizers), a float
    teacher is copied from it (:func:`float_teacher`), then every unit of
    :func:`~zq_plugin.reconstruct.find_blocks` is reconstructed in order
    (:func:`reconstruct_unit`).

    Args:
        model: a float model (any device and floating dtype; the images follow it); not changed.
        data: calibration images (any source: a SyntheticDataset, a tensor, a loader).
        w_bits: weight bits of all but the first/last layer, as :func:`zq_plugin.quantize_fx`.
        a_bits: input bits of all but the first/last layer, as :func:`zq_plugin.quantize_fx`.
        plan: a :class:`~zq_plugin.mixed_precision.BitPlan` (per-layer bits) instead of
            ``w_bits``/``a_bits``/``first_last_bits``; layers with per-tensor or non-uniform
            weights keep their calibrated weights (only per-channel uniform weights learn rounding).
        method: ``"adaround"``, ``"brecq"``, ``"qdrop"`` or ``"genie-m"`` (:data:`METHODS`).
        config: overrides the method's configuration.
        first_last_bits: bits of the first and last weight layer (``None``: like the others).
        seed: the mini-batch and QDrop streams; the same seed gives the same model.
        cache_dir: keep the state after every unit under ``cache_dir/<key>/`` (the key hashes
            the model, the images, the bits or plan, the configuration, the seed and this code);
            the same call resumes after the last finished unit, with the same result.
        progress: a tqdm bar per unit (loss, held-out error) on a terminal.
        observer: the statistic of the starting activation ranges (:func:`zq_plugin.observers.ao.observer_class`).
        weight_observer: the per-channel statistic of the starting weight steps.

    Returns:
        The clamping simulation (a ``prepare_qat_fx`` ``GraphModule`` in eval mode) with the
        rounded weights and the learned steps written in; ``.zq_reconstruction`` lists each unit's
        output errors before and after (:func:`reconstruct_unit`). It needs no calibration;
        ``convert_fx`` converts it at 8 bits and :func:`zq_plugin.backends.fx.export_sim` saves it.

    Raises:
        ConfigError: an unknown method, bad bits or options, data that are not images.
        ModelError: the model does not trace, or ``units="layer"`` on a model with residual units.

    Example:
        >>> import torch, zq_plugin
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
        >>> quick = dataclasses.replace(METHODS["genie-m"], iterations=20)
        >>> sim = zq_plugin.reconstruct_fx(net, torch.randn(32, 1, 8, 8), config=quick, progress=False)
        >>> [r["unit"] for r in sim.zq_reconstruction]
        ['0', '3', '5']
    """
    from torch.fx.experimental.optimization import fuse

    from zq_plugin.backends.fx import check_traceable, quantize_fx
    from zq_plugin.observers.ao import observer_class

    if config is None:
        if method not in METHODS:
            raise ConfigError(f"unknown reconstruction method {method!r}; choose one of {sorted(METHODS)}.")
        config = METHODS[method]
    check_traceable(model, "reconstruct_fx")
    device, dtype = model_device_dtype(model)
    images = _images(data, device, dtype)
    folded = fuse(copy.deepcopy(model).eval(), inplace=True)  # BN folded into the weights first
    if plan is not None:
        plan = plan.check(model).traced(folded)
    observers = {
        "act_observer": observer_class(observer),
        "weight_observer": observer_class(weight_observer, per_channel=True),
    }
    sim = quantize_fx(
        folded, images, w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits,
        plan=plan, fold=False, **observers,
    )  # fmt: skip
    del folded  # quantize_fx worked on its own copy: one model fewer in memory while reconstructing
    units = _unit_list(sim, config.units)
    names = set(weight_layer_names(model))
    teacher = float_teacher(sim)
    folder = None
    done, report = 0, cast(list[dict[str, Any]], [])
    if cache_dir is not None:
        key = run_key(
            model=model_fingerprint(model), images=_tensor_hash(images), w_bits=w_bits, a_bits=a_bits,
            plan=None if plan is None else plan.to_json(), first_last_bits=first_last_bits,
            config=dataclasses.asdict(config), seed=seed, code=method_code_hash(_resume),
            observers=(observer, weight_observer), meaning="layer-inputs",
        )  # fmt: skip
        folder = Path(cache_dir) / f"reconstruct-{key}"
    schedule = iteration_schedule(sim, teacher, units, images, config)  # before resuming: the calibrated sim
    if folder is not None:
        done, report = _resume(folder, sim, units)
    for i, block in enumerate(units[done:], start=done):
        unit_config = dataclasses.replace(config, iterations=schedule[i])
        errors = reconstruct_unit(sim, block, images, unit_config, teacher=teacher, seed=seed + i, progress=progress)
        report.append(
            {"unit": block.name, "layers": [_model_layer(n, names) for n in block.layers], "iterations": schedule[i]}
            | errors
        )
        logger.info(
            "reconstructed %s: held-out output MSE %.4g -> %.4g (step %d)",
            block.name, errors["held_before"], errors["held_after"], errors["best_step"],
        )  # fmt: skip
        if folder is not None:
            _save_checkpoint(folder, sim, i + 1, report)
    sim.eval()
    sim.zq_reconstruction = report  # type: ignore[assignment]
    return sim


def sim_layer(sim: nn.Module, name: str) -> nn.Module | None:
    """The simulation's weight layer for the model layer ``name`` (a ConvTranspose wrapper holds it at ``.conv``)."""
    from zq_plugin._utils import WEIGHT_LAYERS

    for candidate in (name, f"{name}.conv"):
        try:
            layer = sim.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(layer, WEIGHT_LAYERS):
            return layer
    return None


def _model_layer(name: str, names: set[str]) -> str:
    """The model's name of a simulation layer (a ConvTranspose's wrapper holds it at ``<layer>.conv``)."""
    parent = name.rpartition(".")[0]
    return parent if name not in names and parent in names else name


def _tensor_hash(t: torch.Tensor) -> str:
    import hashlib

    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
