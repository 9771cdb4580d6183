"""Per-layer sensitivity to quantization, measured on (synthetic) data: ZeroQ's Omega (methods.md §2.4).

For layer ``i`` and bit width ``k``::

    Omega_i(k) = (1/N) sum_j KL( softmax M(x_j) || softmax M_i,k(x_j) )

where ``M_i,k`` is the float model with **only** layer ``i``'s weights quantized to ``k`` bits
(activations float). Weights are quantized the way the FX backend quantizes them: symmetric,
narrow range, per output channel or per tensor, or on Retro-Synthesis's clustered grid
(:mod:`zq_plugin.mixed_precision.nonuniform`), and **after folding** a following BatchNorm
(``w * gamma / sqrt(var + eps)``, as ``prepare_qat_fx`` does), so per-tensor and non-uniform
errors are those of the deployed weights. Optionally the same for each layer's input
activation (per-tensor affine over the data's range, the other layers float).

Cost: ``L * |bits|`` forward passes over the data (a few hundred images are enough); the
model is deep-copied, never changed.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> sens = measure_sensitivity(net, torch.randn(32, 1, 8, 8), bits=(2, 8), progress=False)
    >>> sens.layers, sens.bits, all(s[0] > s[1] >= 0 for s in sens.weight)
    (('0', '3'), (2, 8), True)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from zq_plugin._utils import OutputFn, input_placement, place, select_output, weight_layers
from zq_plugin.data import CalibrationData, collect_batches
from zq_plugin.errors import ConfigError
from zq_plugin.hooks import capture_inputs
from zq_plugin.nonuniform import clustered_quantize
from zq_plugin.plan import Granularity, Grid
from zq_plugin.qparams import check_bits, compute_qparams, fake_quantize, quant_range

logger = logging.getLogger(__name__)


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    granularity: Granularity = "per_channel",
    grid: Grid = "uniform",
    ch_axis: int = 0,
) -> torch.Tensor:
    """Quantize-dequantize a weight: symmetric narrow MinMax, or the clustered grid.

    Uniform: ``scale = max|w| / (2^(b-1) - 1)`` per output channel (or per tensor), the grid of
    torch's ``PerChannelMinMaxObserver`` with ``per_channel_symmetric`` and a narrow range.
    ``ch_axis`` is the output-channel axis: 0 for Conv/Linear ``[C_out, ...]``, 1 for
    ConvTranspose ``[C_in, C_out / groups, ...]``.
    """
    per_channel = granularity == "per_channel"
    if grid == "nonuniform":
        return clustered_quantize(w, bits, per_channel=per_channel, ch_axis=ch_axis)
    qmin, qmax = quant_range(bits, signed=True, narrow=True)
    moved = w.detach().movedim(ch_axis, 0)
    flat = moved.reshape(moved.shape[0], -1) if per_channel else moved.reshape(1, -1)
    scale, zp = compute_qparams(flat.amin(1), flat.amax(1), qmin, qmax, symmetric=True)
    return fake_quantize(w.detach(), scale, zp, qmin, qmax, axis=ch_axis if per_channel else None)


def bn_fold_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``gamma / sqrt(running_var + eps)`` ``[C_out]`` for each Conv whose only consumer is a BatchNorm.

    Found on an FX trace of ``model`` (the pattern ``prepare_qat_fx`` folds); empty when the model
    does not trace.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # untraceable models keep unfolded weights
        logger.info("no BN folding for sensitivity: %s does not trace (%s)", type(model).__name__, e)
        return {}
    factors = {}
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        producer = node.args[0]
        if not isinstance(producer, torch.fx.Node) or producer.op != "call_module" or len(producer.users) != 1:
            continue
        conv = modules.get(str(producer.target))
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)  # torch.ao's QAT does not fold these
        if isinstance(conv, nn.modules.conv._ConvNd) and not transposed and conv.out_channels == bn.num_features:
            factor = torch.rsqrt(bn.running_var.detach() + bn.eps)
            factor = factor * bn.weight.detach() if bn.weight is not None else factor
            factors[str(producer.target)] = torch.where(factor == 0, torch.ones_like(factor), factor)
    return factors


@dataclass(frozen=True)
class Sensitivity:
    """Sensitivities of every Conv/Linear layer at every candidate bit width.

    Attributes:
        layers: layer names (module order).
        params: weight count of each layer.
        bits: candidate bit widths.
        weight: ``[L][K]`` Omega_i(k) for the weights.
        granularity: weight granularity used.
        grid: weight grid used.
        activation: ``[L][K]`` the same for each layer's input, or None when not measured.
        samples: number of images measured on.
    """

    layers: tuple[str, ...]
    params: tuple[int, ...]
    bits: tuple[int, ...]
    weight: tuple[tuple[float, ...], ...]
    granularity: Granularity = "per_channel"
    grid: Grid = "uniform"
    activation: tuple[tuple[float, ...], ...] | None = None
    samples: int = 0

    def of(self, layer: str, bits: int) -> float:
        """Omega of ``layer``'s weights at ``bits``."""
        return self.weight[self.layers.index(layer)][self.bits.index(bits)]

    def table(self) -> str:
        """A Markdown table: one row per layer, one column per bit width."""
        head = "| layer | params | " + " | ".join(f"W{k}" for k in self.bits) + " |"
        rows = [head, "|---|---|" + "---|" * len(self.bits)]
        for name, p, row in zip(self.layers, self.params, self.weight, strict=True):
            rows.append(f"| {name} | {p:,} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "layers": list(self.layers),
            "params": list(self.params),
            "bits": list(self.bits),
            "weight": [list(r) for r in self.weight],
            "granularity": self.granularity,
            "grid": self.grid,
            "activation": None if self.activation is None else [list(r) for r in self.activation],
            "samples": self.samples,
        }


def _check_candidates(bits: Sequence[int]) -> tuple[int, ...]:
    if not bits:
        raise ConfigError("bits=() is empty: give the candidate bit widths, e.g. bits=(2, 4, 8).")
    return tuple(sorted({check_bits(b, "candidate bits") for b in bits}))


def _log_probs(model: nn.Module, x: torch.Tensor, output_fn: OutputFn | None) -> torch.Tensor:
    """``log_softmax`` of the model's logits (:func:`zq_plugin._utils.select_output`) ``[N, classes]``."""
    return F.log_softmax(select_output(model(x), output_fn).flatten(1).float(), dim=1)


def _kl(
    model: Callable[[int, torch.Tensor], Any],
    batches: list[torch.Tensor],
    refs: list[torch.Tensor],
    output_fn: OutputFn | None = None,
) -> float:
    """Mean over samples of ``KL(p_ref || p_model)``, summed over classes; clipped at 0.

    ``model(i, x)`` is the perturbed model's output on batch ``i`` (:meth:`_Suffix.runner`).
    """
    total = 0.0
    count = 0
    for i, (x, ref) in enumerate(zip(batches, refs, strict=True)):
        logq = F.log_softmax(select_output(model(i, x), output_fn).flatten(1).float(), dim=1)  # [N, classes]
        total += float(F.kl_div(logq, ref, log_target=True, reduction="sum"))
        count += x.shape[0]
    return max(total / count, 0.0)


#: at most this many bytes of float node values are kept for :class:`_Suffix` (else whole forwards)
SUFFIX_CACHE_BYTES = 2 * 1024**3


def _clone(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


class _Suffix(torch.fx.Interpreter):
    """Reruns only the graph nodes a change at one layer reaches, the others read from a float cache.

    Perturbing layer ``i`` (its weight, or its input through a pre-hook) leaves every node that
    does not depend on it unchanged, so each of the ``L * |bits|`` measurements runs the part of
    the graph from layer ``i`` on: about half the model's work on average, the same numbers
    (the same ops on the same values). Values are cloned into the cache and again where a
    recomputed node reads a cached one, so in-place ops (``ReLU(inplace=True)``, ``+=``) change
    neither. ``model`` itself, not the graph, runs when it does not trace with torch.fx or its
    node values would exceed :data:`SUFFIX_CACHE_BYTES`.
    """

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        self.model = model
        self.cache: list[dict[torch.fx.Node, Any]] | None = None
        self._dirty: set[torch.fx.Node] = set()
        self._frontier: set[torch.fx.Node] = set()
        self._batch = 0
        try:
            gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
        except Exception:  # any trace failure: whole forwards, as before
            logger.debug("sensitivity: %s does not trace; each measurement runs the whole model", type(model).__name__)
            return
        super().__init__(gm, garbage_collect_values=False)
        self.names = {id(m): n for n, m in gm.named_modules()}
        caches: list[dict[torch.fx.Node, Any]] = []
        size = 0
        for x in batches:
            values: dict[torch.fx.Node, Any] = {}
            self._record = values
            self.run(x)
            caches.append(values)
            size += sum(v.numel() * v.element_size() for v in tree_leaves(values) if isinstance(v, torch.Tensor))
            if size > SUFFIX_CACHE_BYTES:
                logger.debug("sensitivity: node values exceed %d bytes; whole forwards", SUFFIX_CACHE_BYTES)
                return
        self.cache = caches

    def run_node(self, n: torch.fx.Node) -> Any:
        if self.cache is None:  # the recording run
            value = super().run_node(n)
            self._record[n] = _clone(value)
            return value
        if n not in self._dirty:
            kept = self.cache[self._batch][n]
            return _clone(kept) if n in self._frontier else kept
        return super().run_node(n)

    def runner(self, layer: str, extra: nn.Module | None = None) -> Callable[[int, torch.Tensor], Any]:
        """``(i, x) -> output``, recomputing what ``layer``'s weight or ``extra``'s input reaches.

        ``extra`` is the module whose input a pre-hook perturbs; the whole model runs where no
        node of the graph is found for either.
        """
        if self.cache is None:
            return lambda _i, x: self.model(x)
        targets = {layer} | ({self.names[id(extra)]} if extra is not None and id(extra) in self.names else set())
        sources = [
            n for n in self.graph.nodes
            if (n.op == "call_module" and n.target in targets)
            or (n.op == "get_attr" and str(n.target).startswith(f"{layer}."))
        ]  # fmt: skip
        if not sources:
            return lambda _i, x: self.model(x)
        dirty: set[torch.fx.Node] = set()
        stack = list(sources)
        while stack:
            node = stack.pop()
            if node not in dirty:
                dirty.add(node)
                stack.extend(node.users)
        frontier = {a for n in dirty for a in n.all_input_nodes if a not in dirty}

        def run(i: int, x: torch.Tensor) -> Any:
            self._dirty, self._frontier, self._batch = dirty, frontier, i
            return self.run(x)

        return run


def measure_sensitivity(
    model: nn.Module,
    data: CalibrationData,
    *,
    bits: Sequence[int] = (2, 4, 8),
    granularity: Granularity = "per_channel",
    grid: Grid = "uniform",
    activations: bool = False,
    act_range: str = "minmax",
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    progress: bool = True,
    output_fn: OutputFn | None = None,
) -> Sensitivity:
    """Omega_i(k) for every Conv/Linear layer ``i`` and candidate ``k`` (see the module docstring).

    Args:
        model: the float model (not changed: a deep copy is measured).
        data: synthetic or real images (any source :func:`zq_plugin.data.iter_batches` takes).
        bits: candidate bit widths, each 2 to 8.
        granularity: ``"per_channel"`` or ``"per_tensor"`` weights.
        grid: ``"uniform"`` or ``"nonuniform"`` weights.
        activations: also measure each layer's input at each bit width.
        act_range: the input's per-tensor affine range at each bit width: ``"minmax"`` (the
            data's extremes) or ``"mse"`` (the range minimising the quantization MSE over the
            data's histogram, as the MSE observers pick it: the recipe's ranges, so that a
            low-bit input is not judged by the range no backend uses).
        layers: restrict to these layers (default: all Conv/Linear).
        batch_size: batch size for tensor/dataset data.
        max_batches: use at most this many batches.
        progress: show a tqdm bar on a terminal.
        output_fn: picks the logits from the model's output (default: the first tensor of a
            tuple/list, a dict's ``"logits"``/``"out"`` entry; :func:`zq_plugin._utils.select_output`).

    Returns:
        A :class:`Sensitivity`.

    Raises:
        ConfigError: empty data, bad bit widths, unknown layers.
    """
    candidates = _check_candidates(bits)
    if act_range not in ("minmax", "mse"):
        raise ConfigError(f"act_range={act_range!r}: use 'minmax' or 'mse'.")
    if granularity not in ("per_channel", "per_tensor") or grid not in ("uniform", "nonuniform"):
        raise ConfigError(
            f"granularity={granularity!r}, grid={grid!r}: use 'per_channel'/'per_tensor' and 'uniform'/'nonuniform'."
        )
    work = copy.deepcopy(model).eval()
    device, dtype = input_placement(work)
    batches = [place(x, device, dtype) for x in collect_batches(data, batch_size, max_batches)]
    all_layers = weight_layers(work)
    if layers is not None:
        unknown = [n for n in layers if n not in all_layers]
        if unknown:
            raise ConfigError(f"unknown layers {unknown}; the model's Conv/Linear layers are {list(all_layers)}.")
        all_layers = {n: all_layers[n] for n in layers}
    if not all_layers:
        raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to measure.")
    fold = bn_fold_factors(work)
    weight_rows: list[tuple[float, ...]] = []
    act_rows: list[tuple[float, ...]] = []
    total = len(all_layers) * len(candidates) * (2 if activations else 1)
    bar = tqdm(total=total, desc="sensitivity", disable=None if progress else True, leave=False)
    with torch.no_grad():
        refs = [_log_probs(work, x, output_fn) for x in batches]  # [N, classes] each
        probes: dict[str, nn.Module] = dict(all_layers)
        if activations:
            work, probes = _with_input_probes(work, all_layers, batches[0])
        ranges = _input_ranges(work, probes, batches, candidates, act_range) if activations else {}
        suffix = _Suffix(work, batches)
        for name, module in all_layers.items():
            w0 = module.weight.detach().clone()  # type: ignore[operator]
            shape = [-1] + [1] * (w0.dim() - 1)
            rerun = suffix.runner(name)  # the nodes this layer reaches, once for every width
            factor = fold[name].reshape(shape) if name in fold else None
            row = []
            for k in candidates:
                folded = w0 * factor if factor is not None else w0
                axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
                wq = quantize_weight(folded, k, granularity, grid, ch_axis=axis)
                module.weight.copy_(wq / factor if factor is not None else wq)  # type: ignore[operator]
                row.append(_kl(rerun, batches, refs, output_fn))
                bar.update()
            module.weight.copy_(w0)  # type: ignore[operator]
            weight_rows.append(tuple(row))
            if activations:
                rerun_input = suffix.runner(name, probes[name])
                act_rows.append(
                    tuple(
                        _input_kl(
                            rerun_input,
                            probes[name],
                            ranges[name][k],
                            k,
                            batches,
                            refs,
                            bar,
                            output_fn,
                        )
                        for k in candidates
                    )
                )
    bar.close()
    return Sensitivity(
        layers=tuple(all_layers),
        params=tuple(int(m.weight.numel()) for m in all_layers.values()),  # type: ignore[operator]
        bits=candidates,
        weight=tuple(weight_rows),
        granularity=granularity,
        grid=grid,
        activation=tuple(act_rows) if activations else None,
        samples=sum(x.shape[0] for x in batches),
    )


class _InputProbe(nn.Identity):
    """Stands in front of a functional conv/linear's input, so hooks see what the layer reads."""


def _with_input_probes(
    work: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``work`` and ``name -> the module whose input is the layer's``, adding probes where needed.

    A layer called as a module is its own probe. A layer whose weight a functional call reads
    (``F.linear(x, self.fc.weight)``) is never called, so no hook sees its input: ``work`` is
    then traced (sharing its modules and weights) and an :class:`_InputProbe` is put in front of
    each such call's input.
    """
    seen: set[str] = set()
    with capture_inputs(dict(layers)) as feats:
        work(example)
        seen = set(feats)
    missing = [n for n in layers if n not in seen]
    if not missing:
        return work, dict(layers)
    from zq_plugin._utils import functional_weight

    gm = torch.fx.symbolic_trace(work)
    probes: dict[str, nn.Module] = {n: m for n, m in layers.items() if n in seen}
    for node in list(gm.graph.nodes):
        target = functional_weight(node)
        owner = None if target is None else target.rpartition(".")[0]
        if owner not in missing or owner in probes:
            continue
        probe_name = f"zq_probe_{len(probes)}"
        gm.add_submodule(probe_name, _InputProbe())
        with gm.graph.inserting_before(node):
            probed = gm.graph.call_module(probe_name, (node.args[0],))
        node.args = (probed, *node.args[1:])
        probes[owner] = gm.get_submodule(probe_name)
    gm.recompile()
    unprobed = [n for n in missing if n not in probes]
    if unprobed:
        raise ConfigError(
            f"the inputs of {unprobed} were not seen while the model ran (a layer neither called nor read by a "
            "functional conv/linear): measure weights only (activations=False) or pass layers=... without them."
        )
    return gm, probes


def _input_ranges(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[torch.Tensor],
    candidates: tuple[int, ...],
    act_range: str,
) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """``layer -> bits -> (lo, hi)``: each layer's input range over all batches, per candidate width.

    ``"minmax"``: the extremes (the same at every width); ``"mse"``: the per-tensor range of least
    quantization MSE on the inputs' histogram at each width (:func:`zq_plugin.observers.stats.lp_range`).
    """
    from zq_plugin.observers.histogram import merge, observe
    from zq_plugin.observers.stats import lp_range

    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hists: dict[str, Any] = {}
    with capture_inputs(dict(layers)) as feats:
        for x in batches:
            model(x)
            for name, f in feats.items():
                f = f.detach().float()
                lo, hi = f.amin(), f.amax()
                if name in extremes:
                    lo, hi = torch.minimum(lo, extremes[name][0]), torch.maximum(hi, extremes[name][1])
                extremes[name] = (lo, hi)
                if act_range == "mse":
                    hist = observe(None, f)
                    hists[name] = hist if name not in hists else merge(hists[name], hist)
    ranges: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, (lo, hi) in extremes.items():
        if act_range == "minmax":
            ranges[name] = dict.fromkeys(candidates, (lo, hi))
            continue
        ranges[name] = {}
        for k in candidates:
            qmin, qmax = quant_range(k, signed=False)
            mse_lo, mse_hi = lp_range(hists[name], qmin, qmax, symmetric=False)
            ranges[name][k] = (mse_lo.reshape(()), mse_hi.reshape(()))
    return ranges


def _input_kl(
    model: Callable[[int, torch.Tensor], Any],
    module: nn.Module,
    rng: tuple[torch.Tensor, torch.Tensor],
    bits: int,
    batches: list[torch.Tensor],
    refs: list[torch.Tensor],
    bar: Any,
    output_fn: OutputFn | None = None,
) -> float:
    """KL with only ``module``'s input fake-quantized (per-tensor affine over ``rng``) at ``bits``."""
    qmin, qmax = quant_range(bits, signed=False)
    scale, zp = compute_qparams(rng[0].reshape(1), rng[1].reshape(1), qmin, qmax)

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (fake_quantize(args[0], scale, zp, qmin, qmax), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        return _kl(model, batches, refs, output_fn)
    finally:
        handle.remove()
        bar.update()


@dataclass(frozen=True)
class HybridChoice:
    """Retro-Synthesis's hybrid granularity decision for each layer.

    Attributes:
        granularity: ``layer -> "per_tensor" | "per_channel"``.
        per_tensor: ``layer -> Omega`` with per-tensor weights at the layer's bits.
        per_channel: ``layer -> Omega`` with per-channel weights.
        threshold: the tolerance used.
    """

    granularity: dict[str, Granularity]
    per_tensor: dict[str, float]
    per_channel: dict[str, float]
    threshold: float

    @property
    def per_tensor_share(self) -> float:
        """Share of layers that take per-tensor weights."""
        return sum(g == "per_tensor" for g in self.granularity.values()) / max(len(self.granularity), 1)
