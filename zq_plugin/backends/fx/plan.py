"""The FX backend's reading of a BitPlan: a torch.ao ``QConfigMapping``, input bits moved to each producer's output.

A plan says "layer ``i`` reads ``a_i``-bit inputs"; in FX a node's activation qconfig sets its
**output** observer, and the model input is quantized with its first consumer's activation
config (integration-notes §1.3). So the bits of a layer's input must be set on whatever owns
the observer in front of it: the producing conv, an ``add`` inside a residual block (whose
qconfig comes from the enclosing module's name), a pooling chain that shares the producer's
observer, or the first layer itself for the image.

Who owns which observer is not guessed from op tables: :func:`activation_owners` runs
``prepare_fx`` once on a copy with a probe mapping, in which every module name gets its own
activation observer marked with a distinct ``eps``, and reads, for each planned layer, the
mark of the observer on its input. The emitted mapping then sets only those names, with
``set_module_name`` and ``set_global``, so torch.ao's own precedence applies:

* each planned layer's name carries its weight bits, granularity and grid, and as activation
  bits the highest input bits requested by the layers its observers feed (``default_bits``
  when none: the logits);
* a non-weight owner (a residual block's ``add``) gets the requested activation bits under its
  module's name (the model's own ops: the global qconfig);
* an observer feeding several layers that ask for different bits (a branch), and the first
  layer's config, which quantizes both the image and the layer's output, get the highest
  requested bits, with a warning naming the layers.

Example:
    >>> import torch
    >>> from zq_plugin.plan import BitPlan
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)).eval()
    >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=6, first_last_bits=None)
    >>> activation_owners(plan, net, (torch.randn(1, 1, 8, 8),))  # "0" quantizes the image and writes "2"'s input
    {'0': 6}
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin.backends.fx.qconfig import qconfig
from zq_plugin.calibration import check_traceable
from zq_plugin.plan import BitPlan

logger = logging.getLogger(__name__)

GLOBAL = ""  # the key of the global qconfig
INPUT = "<input>"  # the key of the model input's observer, when kept apart from the first layer's output


def own_input(layer: str) -> str:
    """The key of an input observer that ``layer``'s own qconfig creates (kept apart from its output's bits).

    FX inserts such an observer where the producer's output carries none it can share, e.g.
    after an ``nn.Flatten`` module: then one qconfig sets both the layer's input and its output.
    """
    return f"{INPUT}{layer}"


_MARK = 2.0**-30  # eps step of the probe marks (float32-exact for ids up to 2^23)


def _probe_mapping(keys: Sequence[str]) -> Any:
    """Global + every module name, each with a MinMax activation observer marked ``eps = (id + 1) * _MARK``."""

    def marked(i: int) -> Any:
        act = _compat.MinMaxObserver.with_args(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255, eps=(i + 1) * _MARK
        )
        # per-tensor weights: torch.ao refuses per-channel ones on ConvTranspose; the probe reads activations only
        weight = _compat.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        return _compat.QConfig(activation=act, weight=weight)

    mapping = _compat.QConfigMapping().set_global(marked(0))
    for i, key in enumerate(keys[1:], start=1):
        mapping.set_module_name(key, marked(i))
    return mapping


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _observer_before(arg: Any, prepared: nn.Module, *, fake_quant: bool = False) -> Any:
    """The activation observer node whose output reaches ``arg``, walking back through ops that share it.

    Ops such as max-pool, ReLU6, flatten or reshape reuse their input's observer (no node of
    their own), so the walk follows each node's first tensor input until an observer call (a
    probe's marked observer; a FakeQuantize with ``fake_quant``).
    """
    seen = 0
    while isinstance(arg, torch.fx.Node) and seen < 1000:
        module = prepared.get_submodule(str(arg.target)) if arg.op == "call_module" else None
        if fake_quant and isinstance(module, _compat.FakeQuantizeBase):
            return arg
        if not fake_quant and isinstance(module, _compat.ObserverBase) and hasattr(module, "eps"):
            return arg
        inputs = [a for a in arg.args if isinstance(a, torch.fx.Node)]
        if arg.op == "placeholder" or not inputs:
            return None
        arg, seen = inputs[0], seen + 1
    return None


def input_observer_owners(
    model: nn.Module, example_inputs: Any, layers: Sequence[str], *, separate_input: bool = False
) -> dict[str, str]:
    """``layer -> key``: the module name (``""`` for global) whose qconfig sets the observer on each layer's input.

    With ``separate_input``, a layer reading the model input gets :data:`INPUT` instead of the
    first layer's name, and a layer whose input observer comes from its own qconfig gets
    :func:`own_input` of its name (the caller sets those observers itself:
    :func:`set_input_bits`). Layers whose input carries no observer (e.g. a float producer)
    are left out.
    """
    keys = [GLOBAL, *(name for name, _ in model.named_modules() if name)]
    prepared = _compat.prepare_fx(copy.deepcopy(model).eval(), _probe_mapping(keys), _as_tuple(example_inputs))
    wanted = set(layers)
    owners: dict[str, str] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or str(node.target) not in wanted or not node.args:
            continue
        found = _observer_before(node.args[0], prepared)
        if found is None:
            logger.warning("layer %s: no activation observer on its input; its input bits cannot be set", node.target)
            continue
        observer: Any = prepared.get_submodule(str(found.target))
        reads_input = isinstance(found.args[0], torch.fx.Node) and found.args[0].op == "placeholder"
        key = keys[round(float(observer.eps) / _MARK) - 1]
        if separate_input and reads_input:
            key = INPUT
        elif separate_input and key == str(node.target):
            key = own_input(key)
        owners[str(node.target)] = key
    return owners


def activation_owners(
    plan: BitPlan, model: nn.Module, example_inputs: Any, *, separate_input: bool = False
) -> dict[str, int]:
    """``key -> activation bits``: where each planned input bit width must be set, after the producer rule.

    Keys are module names (``""``: the global qconfig; :data:`INPUT`: the model input, with
    ``separate_input``). Conflicts (several layers reading one observer, or one name owning
    several observers read at different bits) take the highest bits, with a warning naming the layers.
    """
    plan.check(model)
    owners = input_observer_owners(model, example_inputs, list(plan.layers), separate_input=separate_input)
    requests: dict[str, dict[str, int]] = {}
    for layer, key in owners.items():
        requests.setdefault(key, {})[layer] = plan.layers[layer].a_bits
    bits: dict[str, int] = {}
    for key, asked in requests.items():
        bits[key] = max(asked.values())
        if len(set(asked.values())) > 1:
            where = f"module {key!r}" if key else "the global qconfig"
            message = (
                f"layers {sorted(asked)} read activations quantized by one qconfig ({where}) but ask for "
                f"{dict(sorted(asked.items()))} input bits; FX cannot give one observer two bit widths, so all "
                f"get {bits[key]} bits."
            )
            warnings.warn(message, stacklevel=3)
    return bits


def to_qconfig_mapping(
    plan: BitPlan,
    model: nn.Module,
    example_inputs: Any,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    tensor_weight_observer: Any = None,
    fake_quant: bool = True,
    default_bits: int = 8,
    separate_input: bool = False,
) -> Any:
    """A torch.ao ``QConfigMapping`` for ``plan``, ready for ``prepare_fx`` / ``prepare_qat_fx``.

    Args:
        plan: the per-layer plan (input bits per layer).
        model: the float model the mapping is for (traced once on a copy; not changed).
        example_inputs: an input batch (or a tuple of inputs) for the probe trace.
        act_observer: activation observer class (default ``MinMaxObserver``).
        weight_observer: per-channel weight observer class (default ``PerChannelMinMaxObserver``).
        tensor_weight_observer: per-tensor weight observer class (default ``MinMaxObserver``).
        fake_quant: FakeQuantize qconfigs (``prepare_qat_fx``, the clamping simulation) or bare
            observers (``prepare_fx``; uniform grids only).
        default_bits: bits of everything the plan does not set (global qconfig, the logits).
        separate_input: leave the bits of input observers that a layer's own config creates (the
            model input's, with the first layer; one after an ``nn.Flatten``) out of that config,
            which then carries its output readers' bits only; the caller sets those observers with
            :func:`set_input_bits` after ``prepare`` (as :func:`zq_plugin.quantize_fx` with ``plan=`` does).

    Raises:
        ConfigError: layers the model does not have, bits outside 2-8, a non-uniform grid with
            ``fake_quant=False``.
        ModelError: the model does not trace (names torch's reason and the line).
    """
    check_traceable(model, "to_qconfig_mapping")
    plan.check(model)
    owners = {
        key: bits
        for key, bits in activation_owners(plan, model, example_inputs, separate_input=separate_input).items()
        if not key.startswith(INPUT)
    }
    kw = {"act_observer": act_observer, "fake_quant": fake_quant}

    def layer_qconfig(w_bits: int, a_bits: int, granularity: str = "per_channel", grid: str = "uniform") -> Any:
        return qconfig(  # raises ConfigError for a non-uniform grid without fake quantization
            w_bits,
            a_bits,
            weight_observer=weight_observer,
            tensor_weight_observer=tensor_weight_observer,
            granularity=granularity,
            grid=grid,
            **kw,
        )

    mapping = _compat.QConfigMapping().set_global(layer_qconfig(default_bits, owners.get(GLOBAL, default_bits)))
    for key, a_bits in owners.items():
        if key != GLOBAL and key not in plan.layers:
            mapping.set_module_name(key, layer_qconfig(default_bits, a_bits))
    for name, b in plan.layers.items():
        mapping.set_module_name(name, layer_qconfig(b.w_bits, owners.get(name, default_bits), b.granularity, b.grid))
    return mapping


def set_input_bits(
    prepared: torch.fx.GraphModule, bits: int | dict[str, int], *, act_observer: Any = None
) -> list[str]:
    """Give input observers their own bits (after ``prepare_qat_fx``); return the replaced FakeQuantize names.

    FX quantizes the model input with its first layer's activation config, which also quantizes
    that layer's output; likewise a layer whose input has no observer to share (after an
    ``nn.Flatten`` module) gets an input observer from its own config. :func:`to_qconfig_mapping`
    with ``separate_input=True`` sets each such config to its output's bits, and this sets the
    inputs': ``bits`` maps :data:`INPUT` (the model input) and :func:`own_input` keys (as
    :func:`activation_owners` returns them) to bit widths; a plain ``int`` is the model input's.
    So every plan layer reads exactly its ``a_bits``, as in the PT2E and Brevitas backends.
    Call it before calibration. In place.

    Example:
        >>> import torch
        >>> from zq_plugin import _compat
        >>> from zq_plugin.plan import BitPlan
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 3)).eval()
        >>> plan, x = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None), torch.randn(2, 1, 8, 8)
        >>> bits = activation_owners(plan, net, x, separate_input=True)
        >>> bits
        {'<input>': 4, '<input>2': 4}
        >>> prepared = _compat.prepare_qat_fx(net, to_qconfig_mapping(plan, net, x, separate_input=True), (x,))
        >>> set_input_bits(prepared, bits)
        ['activation_post_process_0', 'activation_post_process_2']
    """
    wanted = {INPUT: bits} if isinstance(bits, int) else {k: b for k, b in bits.items() if k.startswith(INPUT)}
    targets: dict[str, int] = {}  # FakeQuantize name -> bits
    for node in prepared.graph.nodes:
        if node.op == "placeholder" and INPUT in wanted:
            readers = [u for u in node.users if u.op == "call_module"]
            targets.update({str(u.target): wanted[INPUT] for u in readers})
        elif node.op == "call_module" and own_input(str(node.target)) in wanted and node.args:
            found = _observer_before(node.args[0], prepared, fake_quant=True)
            if found is not None:
                bits_here = wanted[own_input(str(node.target))]
                targets[str(found.target)] = max(bits_here, targets.get(str(found.target), bits_here))
    replaced = []
    for name, b in targets.items():
        old = prepared.get_submodule(name)
        if not isinstance(old, _compat.FakeQuantizeBase):
            continue
        new = qconfig(8, b, act_observer=act_observer, fake_quant=True).activation()
        device = next((t.device for t in old.buffers()), None)
        prepared.add_submodule(name, new.to(device) if device is not None else new)
        replaced.append(name)
    return replaced
