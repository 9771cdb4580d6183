"""Data-free preprocessing before quantization: cross-layer equalization (DFQ, Nagel et al., ICCV 2019).

Per-channel weight ranges of a layer feeding another can differ by orders of magnitude (the
depthwise convolutions of MobileNets most of all), so a per-tensor grid, or the next layer's
per-tensor input grid, wastes its levels on a few channels. For a pair ``W1 -> f -> W2`` with
``f`` positively homogeneous (``f(x / s) = f(x) / s`` for ``s > 0``: ReLU, identity), scaling
output channel ``i`` of ``W1`` (and its bias) by ``1 / s_i`` and input channel ``i`` of ``W2``
by ``s_i`` leaves the model's function unchanged. DFQ picks

    s_i = sqrt(r1_i / r2_i),   r1_i = max |W1[i, ...]|,   r2_i = max |W2[:, i, ...]|

so that both ranges become ``sqrt(r1_i * r2_i)``, and repeats over all pairs until the scales
stop changing.

What this module does beyond the paper, and why it is written here rather than taken from a
library: torch.ao's ``_equalize.cross_layer_equalization`` equalizes only ungrouped Conv/Linear
pairs (a depthwise layer as the second of a pair fails its channel check) and needs the pairs by
hand; Brevitas's graph equalization works on its own traced graphs and quant layers. Here:

- **Pairs are found from the graph**: a Conv/Linear whose output reaches exactly one
  Conv/Linear through nothing but ReLU / ReLU6 / Identity / Dropout (eval) modules or their
  functional forms. Grouped layers take part when they are depthwise (input channel ``i`` feeds
  only output channel ``i``); other grouped layers and ConvTranspose are left alone.
- **BatchNorm is folded first** (``torch.fx.experimental.optimization.fuse``, the well-kept
  implementation), so the equalized ranges are the ones a quantizer sees.
- **ReLU6 stays exact**: ``relu6(x / s) != relu6(x) / s``. DFQ replaces ReLU6 by ReLU, which
  changes the model. Here a ReLU6 between a pair becomes :class:`ChannelClippedReLU`,
  ``min(relu(x), 6 / s_i)`` per channel: the same function after the scaling, and it traces
  into plain ``relu`` and ``minimum`` ops for every backend.

The float model's outputs stay equal to float rounding (tested on the zoo and on torchvision
architectures); the source model is never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from zq_plugin.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

_PAIR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PASS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = (F.relu, torch.relu)


class ChannelClippedReLU(nn.Module):
    """``min(relu(x), upper)`` per channel: a ReLU6 after its channels were scaled.

    Args:
        upper: the per-channel clip, shaped to broadcast against the activation: ``[C]`` after a
            Linear, ``[C, 1, 1]`` after a Conv2d (6 / s for a ReLU6 whose input was scaled by 1 / s).

    Example:
        >>> m = ChannelClippedReLU(torch.tensor([6.0, 3.0]))
        >>> m(torch.tensor([[-1.0, 5.0]])).tolist()
        [[0.0, 3.0]]
    """

    upper: torch.Tensor

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, C, ...]`` clipped per channel (traceable: plain ``relu`` and ``minimum``)."""
        return torch.minimum(torch.relu(x), self.upper.to(x.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pair:
    """Two layers equalized together, and the ReLU6 modules between them (by qualified name)."""

    first: str
    second: str
    relu6: tuple[str, ...] = ()


def _depthwise(layer: nn.Module) -> bool:
    conv = isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    return conv and layer.groups == layer.in_channels == layer.out_channels


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight)


def _bias(layer: nn.Module) -> torch.Tensor | None:
    return cast("torch.Tensor | None", layer.bias)


def _usable(layer: nn.Module) -> bool:
    if not isinstance(layer, _PAIR_LAYERS):
        return False
    return isinstance(layer, nn.Linear) or layer.groups == 1 or _depthwise(layer)


def find_pairs(gm: fx.GraphModule) -> list[Pair]:
    """The layer pairs of ``gm`` that :func:`equalize` scales (see the module docstring), in graph order."""
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    pairs: list[Pair] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _usable(modules[str(node.target)]):
            continue
        relu6: list[str] = []
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "call_module":
                module = modules[str(user.target)]
                if isinstance(module, _PASS_MODULES) or (isinstance(module, nn.ReLU6) and calls[str(user.target)] == 1):
                    if isinstance(module, nn.ReLU6):  # replaced later: only when no other call shares it
                        relu6.append(str(user.target))
                    current = user
                    continue
                if _usable(module):
                    first, second = modules[str(node.target)], module
                    out_channels = _weight(first).shape[0]
                    in_channels = _weight(second).shape[0 if _depthwise(second) else 1]
                    if out_channels == in_channels:
                        pairs.append(Pair(first=str(node.target), second=str(user.target), relu6=tuple(relu6)))
            elif user.op == "call_function" and user.target in _PASS_FUNCTIONS:
                current = user
                continue
            break
    return pairs


def _ranges(pair: Pair, modules: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r1, r2)``: per-channel max |w| of the first layer's outputs and the second's inputs."""
    w1 = _weight(modules[pair.first]).detach()
    w2 = _weight(modules[pair.second]).detach()
    if not _depthwise(modules[pair.second]):
        w2 = w2.transpose(0, 1)  # input channels first
    return w1.abs().flatten(1).amax(1), w2.abs().flatten(1).amax(1)


@torch.no_grad()
def _scale_pair(pair: Pair, modules: dict[str, nn.Module], scale: torch.Tensor) -> None:
    first, second = modules[pair.first], modules[pair.second]
    w1, b1, w2 = _weight(first), _bias(first), _weight(second)
    w1.div_(scale.reshape([-1] + [1] * (w1.dim() - 1)))
    if b1 is not None:
        b1.div_(scale)
    if _depthwise(second):
        w2.mul_(scale.reshape([-1] + [1] * (w2.dim() - 1)))
    else:
        w2.mul_(scale.reshape([1, -1] + [1] * (w2.dim() - 2)))


def equalize(
    model: nn.Module,
    *,
    iterations: int = 20,
    threshold: float = 1e-4,
    absorb_bias: bool = False,
    sigmas: float = 3.0,
) -> fx.GraphModule:
    """Cross-layer equalization of a float model, without data; returns a new model.

    Folds BatchNorm into the preceding layers, finds the pairs (:func:`find_pairs`), and scales
    them with DFQ's ``s_i = sqrt(r1_i / r2_i)`` (module docstring) until every scale of a sweep
    is within ``threshold`` of 1 or after ``iterations`` sweeps. ReLU6 modules between a pair
    become :class:`ChannelClippedReLU` with the accumulated scales, so the function is unchanged.

    Args:
        model: a float model that ``torch.fx.symbolic_trace`` can trace; not changed.
        iterations: the most sweeps over all pairs (DFQ iterates to convergence; a few suffice).
        threshold: stop when ``max |s_i - 1|`` of a sweep is below it.
        absorb_bias: then absorb high biases into the next layer (:func:`absorb_high_bias`,
            on the equalized scales), as DFQ does after equalization.
        sigmas: the absorption's margin (:func:`absorb_high_bias`).

    Returns:
        A ``torch.fx.GraphModule`` in eval mode with the model's outputs (to float rounding);
        ``.zq_equalized_pairs`` lists the pairs. Pass it to :func:`zq_plugin.quantize_fx`, a plan
        or Brevitas as any float model.

    Raises:
        ModelError: the model cannot be traced.
        ConfigError: ``iterations < 1`` or ``threshold <= 0``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1)).eval()
        >>> eq = equalize(net)
        >>> x = torch.randn(2, 1, 6, 6)
        >>> torch.allclose(eq(x), net(x), atol=1e-5)
        True
    """
    if iterations < 1 or threshold <= 0:
        raise ConfigError(f"equalize needs iterations >= 1 and threshold > 0, got {iterations} and {threshold}.")
    from torch.fx.experimental.optimization import fuse

    source = copy.deepcopy(model).eval()
    try:
        gm = cast(fx.GraphModule, fuse(source, inplace=True))  # Conv+BN folded (eval statistics)
    except Exception as exc:  # torch.fx's refusal names the untraceable construct
        raise ModelError(
            f"equalize traces the model with torch.fx, which failed ({type(exc).__name__}: {exc}); "
            "make the model traceable (docs/compatibility.md) or quantize it without equalization."
        ) from exc
    modules = dict(gm.named_modules())
    pairs = find_pairs(gm)
    total = {p: torch.ones(len(_weight(modules[p.first])), dtype=_weight(modules[p.first]).dtype) for p in pairs}
    for sweep in range(iterations):
        worst = 0.0
        for pair in pairs:
            r1, r2 = _ranges(pair, modules)
            ok = (r1 > 0) & (r2 > 0)
            scale = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            _scale_pair(pair, modules, scale)
            total[pair] = total[pair] * scale
            worst = max(worst, float((scale - 1).abs().max()) if scale.numel() else 0.0)
        logger.debug("equalize sweep %d: max |s - 1| = %.3g", sweep, worst)
        if worst < threshold:
            break
    for pair in pairs:  # ReLU6 between a pair: clip each channel where the scaled input reaches 6
        for name in pair.relu6:
            parent_name, _, child = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            spatial = _weight(modules[pair.first]).dim() - 2  # activation dims after the channel
            setattr(parent, child, ChannelClippedReLU((6.0 / total[pair]).reshape([-1] + [1] * spatial)))
    gm.recompile()
    if absorb_bias:
        gm = _absorb(gm, pairs, input_statistics(model), sigmas, {p.first: total[p] for p in pairs})
    gm.zq_equalized_pairs = pairs  # type: ignore[assignment]
    logger.info("equalized %d layer pairs", len(pairs))
    gm.eval()
    return gm


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics without data: high-bias absorption and analytic bias correction (DFQ §4)
# ---------------------------------------------------------------------------------------------

_MEAN_KEEPING_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d)
_MEAN_KEEPING_FUNCTIONS = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool2d", "flatten"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputStatistics:
    """What a layer's input is, per input channel, by its BatchNorm's own assumption (no data).

    The BatchNorm feeding a layer outputs, per channel, ``z ~ N(beta, gamma^2)`` (its bias and
    |weight|); between them lies ``activation`` (``"relu"``, ``"relu6"`` or ``"none"``) and
    possibly mean-keeping average pooling / flatten.

    Attributes:
        bn: the BatchNorm's qualified name.
        activation: the activation between the BatchNorm and the layer.
        beta: ``[C]`` the pre-activation mean per channel.
        gamma: ``[C]`` the pre-activation standard deviation per channel.
    """

    bn: str
    activation: str
    beta: torch.Tensor
    gamma: torch.Tensor

    def mean(self) -> torch.Tensor:
        """``[C]`` ``E[act(z)]`` for ``z ~ N(beta, gamma^2)`` (DFQ eq. 13; clipped normal for ReLU6).

        ReLU: ``beta * Phi(beta / gamma) + gamma * phi(beta / gamma)``. ReLU6, with
        ``a = -beta / gamma`` and ``b = (6 - beta) / gamma``:
        ``beta (Phi(b) - Phi(a)) + gamma (phi(a) - phi(b)) + 6 (1 - Phi(b))``.
        """
        beta, gamma = self.beta.double(), self.gamma.double().clamp_min(1e-12)
        normal = torch.distributions.Normal(torch.zeros_like(beta), torch.ones_like(beta))

        def pdf(t: torch.Tensor) -> torch.Tensor:
            return torch.exp(normal.log_prob(t))

        if self.activation == "none":
            out = beta
        elif self.activation == "relu":
            out = beta * normal.cdf(beta / gamma) + gamma * pdf(beta / gamma)
        else:
            a, b = -beta / gamma, (6.0 - beta) / gamma
            out = beta * (normal.cdf(b) - normal.cdf(a)) + gamma * (pdf(a) - pdf(b)) + 6.0 * (1 - normal.cdf(b))
        return out.to(self.beta.dtype)


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"relu"``/``"relu6"`` for an activation node, ``None`` for anything else."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.ReLU6):
            return "relu6"
        return None
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        if name in ("relu", "relu_"):
            return "relu"
        if name == "relu6" or (name == "hardtanh" and node.args[1:3] == (0.0, 6.0)):
            return "relu6"
    return None


def input_statistics(model: nn.Module) -> dict[str, InputStatistics]:
    """``layer -> InputStatistics`` for every Conv/Linear whose input comes from a BatchNorm (no data).

    The path from the layer back to the BatchNorm may hold at most one ReLU/ReLU6 and any
    mean-keeping op (average pooling, flatten of a pooled map, dropout, identity); any other
    op (an addition, a concatenation, max pooling) ends the search and the layer is left out.
    Flatten of an un-pooled map repeats each channel's statistics over its positions when the
    layer's input width says so (``in_features = C * k``).

    Raises:
        ModelError: the model does not trace with ``torch.fx``.
    """
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as exc:
        raise ModelError(
            f"input_statistics traces the model with torch.fx, which failed ({type(exc).__name__}: {exc})."
        ) from exc
    modules = dict(gm.named_modules())
    found: dict[str, InputStatistics] = {}
    for node in gm.graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, (*_PAIR_LAYERS, nn.ConvTranspose2d)) or not node.args:
            continue
        arg, activation = node.args[0], "none"
        while isinstance(arg, fx.Node):
            act = _activation_of(arg, modules)
            module = modules.get(str(arg.target)) if arg.op == "call_module" else None
            name = getattr(arg.target, "__name__", str(arg.target)) if arg.op != "call_module" else ""
            if act is not None and activation == "none":
                activation = act
            elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) and module.affine:
                bn = cast(nn.modules.batchnorm._BatchNorm, module)
                beta, gamma = bn.bias.detach().clone(), bn.weight.detach().abs().clone()
                width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
                if width % len(beta) == 0:
                    repeat = width // len(beta)
                    found[str(node.target)] = InputStatistics(
                        bn=str(arg.target), activation=activation,
                        beta=beta.repeat_interleave(repeat), gamma=gamma.repeat_interleave(repeat),
                    )  # fmt: skip
                break
            elif not (isinstance(module, (*_MEAN_KEEPING_MODULES, nn.Dropout, nn.Identity, nn.Flatten))
                      or name in _MEAN_KEEPING_FUNCTIONS):  # fmt: skip
                break
            arg = arg.args[0] if arg.args else None
    return found


@torch.no_grad()
def _expected_output_shift(layer: nn.Module, delta_w: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor:
    """``[C_out]`` ``E[delta_w * x]`` of a Conv/Linear whose input channels have means ``mean_in`` ``[C_in]``."""
    if isinstance(layer, nn.Linear):
        return delta_w @ mean_in.to(delta_w.dtype)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight [C_in, C_out/groups, k...]
        groups = layer.groups
        w = delta_w.flatten(2).sum(2).reshape(groups, -1, delta_w.shape[1])  # [g, C_in/g, C_out/g]
        m = mean_in.to(delta_w.dtype).reshape(groups, -1, 1)
        return (w * m).sum(1).reshape(-1)
    groups = int(cast(int, layer.groups))
    w = delta_w.flatten(2).sum(2)  # [C_out, C_in/g]
    m = mean_in.to(delta_w.dtype).reshape(groups, -1)  # [g, C_in/g]
    per_group = w.shape[0] // groups
    return (w * m.repeat_interleave(per_group, 0)).sum(1)


def absorb_high_bias(model: nn.Module, *, sigmas: float = 3.0) -> fx.GraphModule:
    """High-bias absorption (DFQ §4.2): move ``c = max(0, beta - sigmas * gamma)`` of a layer's output into the next.

    For a pair ``W1 -> BN -> act -> W2`` (act ReLU, ReLU6 or none, no other consumer), the
    pre-activation of channel ``i`` is ``N(beta_i, gamma_i^2)``: below ``c_i`` it almost never
    lies (``sigmas = 3``: 0.13 %), and there ``act(z) = act(z - c) + c`` (ReLU6: with its clip
    lowered to ``6 - c``, which a :class:`ChannelClippedReLU` holds). So ``b1 -= c`` and
    ``b2 += W2 c`` keep the function, up to the rare values below ``c`` and the zero padding of
    ``W2`` at the borders, and shrink the activation range that the quantizer must cover
    (the range starts at 0 and ends near ``beta + 3 gamma - c``).

    Args:
        model: a float model with BatchNorm (untouched; BN statistics are read from it).
        sigmas: how many standard deviations below the mean stay unabsorbed.

    Returns:
        A BN-folded copy (:func:`torch.fx.experimental.optimization.fuse`) with the biases moved;
        ``.zq_absorbed`` maps each first layer to the total bias absorbed (sum of ``c``).

    Raises:
        ModelError: the model does not trace.
        ConfigError: ``sigmas < 0``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
        >>> with torch.no_grad():
        ...     _ = net[1].bias.fill_(5.0)
        >>> out = absorb_high_bias(net)
        >>> x = torch.randn(2, 1, 6, 6)
        >>> bool(torch.allclose(out(x), net(x), atol=1e-4)), round(float(out.zq_absorbed["0"]), 2)
        (True, 8.0)
    """
    if sigmas < 0:
        raise ConfigError(f"sigmas must be >= 0, got {sigmas}.")
    from torch.fx.experimental.optimization import fuse

    stats = input_statistics(model)
    try:
        gm = cast(fx.GraphModule, fuse(copy.deepcopy(model).eval(), inplace=True))
    except Exception as exc:
        raise ModelError(f"absorb_high_bias traces the model with torch.fx, which failed ({exc}).") from exc
    return _absorb(gm, find_pairs(gm), stats, sigmas, {})


def _absorb(
    gm: fx.GraphModule,
    pairs: list[Pair],
    stats: dict[str, InputStatistics],
    sigmas: float,
    scales: dict[str, torch.Tensor],
) -> fx.GraphModule:
    """Absorb in the folded ``gm``; ``scales``: first layer -> the equalization scale its outputs were divided by."""
    modules = dict(gm.named_modules())
    absorbed: dict[str, float] = {}
    for pair in pairs:
        info = stats.get(pair.second)
        first, second = modules[pair.first], modules[pair.second]
        if info is None or _bias(first) is None:
            continue
        scale = scales.get(pair.first, torch.ones_like(info.beta))
        beta, gamma = info.beta / scale, info.gamma / scale
        c = (beta - sigmas * gamma).clamp_min(0)
        if info.activation == "relu6":  # keep a part of the clip range: ReLU6 must stay reachable
            upper = 6.0 / scale
            c = torch.minimum(c, upper * 0.5)
        if not bool((c > 0).any()):
            continue
        with torch.no_grad():
            cast(torch.Tensor, _bias(first)).sub_(c.to(_weight(first).dtype))
            shift = _expected_output_shift(second, _weight(second), c)
            if _bias(second) is None:
                second.bias = nn.Parameter(torch.zeros_like(shift))
            cast(torch.Tensor, _bias(second)).add_(shift)
        for name in pair.relu6:  # min(relu(z), u) -> min(relu(z - c), u - c) + c, the + c went into W2
            parent_name, _, child = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            current = getattr(parent, child)
            spatial = _weight(first).dim() - 2
            upper = current.upper.reshape(-1) if isinstance(current, ChannelClippedReLU) else 6.0 / scale
            setattr(parent, child, ChannelClippedReLU((upper - c).reshape([-1] + [1] * spatial)))
        absorbed[pair.first] = float(c.sum())
    gm.recompile()
    gm.zq_absorbed = absorbed  # type: ignore[assignment]
    return gm


def _quantized_weight(layer: nn.Module) -> torch.Tensor | None:
    """The weight as ``layer`` quantizes it: an FX ``weight_fake_quant`` or a Brevitas ``quant_weight()``."""
    fq = getattr(layer, "weight_fake_quant", None)
    if fq is not None and hasattr(layer, "weight") and not hasattr(layer, "bn"):
        if int(getattr(fq, "fake_quant_enabled", torch.ones(1))[0]) == 0:
            return None
        return cast(torch.Tensor, fq(layer.weight))
    quant_weight = getattr(layer, "quant_weight", None)
    if callable(quant_weight) and getattr(layer.weight_quant, "is_quant_enabled", False):
        return cast(torch.Tensor, quant_weight().value)
    return None


@torch.no_grad()
def correct_bias(qmodel: nn.Module, model: nn.Module) -> dict[str, float]:
    """Analytic bias correction (DFQ §4.3) of a quantized model, in place, from the float model's BatchNorm.

    Quantizing a layer's weights ``W`` to ``Q(W) = W + eps`` shifts its output by
    ``eps E[x]`` on average; with ``E[x]`` known from the BatchNorm that feeds the layer
    (:func:`input_statistics`, ``E[act(z)]`` for ``z ~ N(beta, gamma^2)``), the bias takes
    ``b -= eps E[x]`` and the expected output is the float one again. No data is used.
    Layers whose input has no BatchNorm behind it (the first layer, a layer after an addition
    or concatenation) are left alone; so is a model whose layers do not expose their
    quantizer (a folded FX simulation: build it with ``quantize_fx(..., fold=False)``).

    Args:
        qmodel: the quantized model whose biases change: a clamping FX simulation made with
            ``fold=False`` from a BN-folded model (``torch.fx.experimental.optimization.fuse``),
            as :func:`zq_plugin.reconstruct_fx` builds, or a Brevitas model
            (:func:`zq_plugin.backends.brevitas.to_brevitas`; its weights are folded already).
        model: the float model with its BatchNorm (not changed); the layer names must match.

    Returns:
        ``layer -> max |correction|`` for every corrected layer (empty: nothing to correct).

    Raises:
        ModelError: the float model does not trace.

    Example:
        >>> import zq_plugin
        >>> from torch.fx.experimental.optimization import fuse
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
        >>> sim = zq_plugin.quantize_fx(fuse(net), torch.randn(8, 1, 6, 6), w_bits=3, first_last_bits=None,
        ...                             fold=False)
        >>> sorted(correct_bias(sim, net))
        ['3']
    """
    stats = input_statistics(model)
    modules = dict(qmodel.named_modules())
    changed: dict[str, float] = {}
    for name, info in stats.items():
        layer = modules.get(name)
        if layer is None or isinstance(layer, nn.modules.conv._ConvTransposeNd):
            continue
        quantized = _quantized_weight(layer)
        if quantized is None:
            continue
        weight = cast(torch.Tensor, layer.weight)
        shift = _expected_output_shift(layer, (quantized - weight).detach(), info.mean().to(weight.device))
        if getattr(layer, "bias", None) is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        cast(torch.Tensor, layer.bias).sub_(shift.to(cast(torch.Tensor, layer.bias).dtype))
        changed[name] = float(shift.abs().max())
    return changed
