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


def equalize(model: nn.Module, *, iterations: int = 20, threshold: float = 1e-4) -> fx.GraphModule:
    """Cross-layer equalization of a float model, without data; returns a new model.

    Folds BatchNorm into the preceding layers, finds the pairs (:func:`find_pairs`), and scales
    them with DFQ's ``s_i = sqrt(r1_i / r2_i)`` (module docstring) until every scale of a sweep
    is within ``threshold`` of 1 or after ``iterations`` sweeps. ReLU6 modules between a pair
    become :class:`ChannelClippedReLU` with the accumulated scales, so the function is unchanged.

    Args:
        model: a float model that ``torch.fx.symbolic_trace`` can trace; not changed.
        iterations: the most sweeps over all pairs (DFQ iterates to convergence; a few suffice).
        threshold: stop when ``max |s_i - 1|`` of a sweep is below it.

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
    gm.zq_equalized_pairs = pairs  # type: ignore[assignment]
    logger.info("equalized %d layer pairs", len(pairs))
    gm.eval()
    return gm
