"""Models this project did not write, for the conformance matrix: torchvision architectures and user patterns.

torchvision is a test dependency (``pip install --no-deps torchvision==0.28.*``, matched to the
pinned torch). PyPI's wheel is a CUDA build whose compiled ops do not load beside the CPU torch,
but its classification models are pure Python: :func:`import_torchvision` defines the two
operator schemas its import registers fake kernels for (``nms``, ``qnms``), in the test set-up
only, so ``torchvision.models`` imports. Where the compiled ops do load (PyPI's torch, as in
``.venv-next``), they are loaded first and nothing is defined: torchvision's stable-ABI library
aborts the process when its namespace already exists. The library itself never imports torchvision.

Every builder returns a float32 model in eval mode whose BatchNorm running statistics were
warmed on noise (random weights otherwise), small enough for 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _torchvision_ops() -> bool:
    """Whether torchvision's operators are registered, after loading its compiled libraries where they load."""
    spec = importlib.util.find_spec("torchvision")
    folders = spec.submodule_search_locations if spec is not None else None
    for lib in sorted(Path(next(iter(folders))).glob("_C*.so")) if folders else ():
        with contextlib.suppress(OSError):  # a CUDA build beside a CPU torch: undefined symbols
            torch.ops.load_library(str(lib))
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def import_torchvision() -> Any:
    """``torchvision.models``, or skip the test when torchvision is not installed."""
    if not _torchvision_ops():
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.lib = lib  # type: ignore[attr-defined]  # keep the library alive
    try:
        import torchvision.models as models
    except ImportError:
        pytest.skip("torchvision is not installed (pip install --no-deps 'torchvision==0.28.*')")
    return models


def warm_bn(model: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0, batches: int = 3) -> nn.Module:
    """Fill BatchNorm running statistics from noise batches (momentum None: a cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *input_shape, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# name -> (builder kwargs, input shape); small inputs that every architecture still accepts
TORCHVISION: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "resnet18": ({}, (3, 32, 32)),
    "resnet50": ({}, (3, 32, 32)),
    "mobilenet_v2": ({}, (3, 32, 32)),
    "mobilenet_v3_small": ({}, (3, 32, 32)),
    "efficientnet_b0": ({}, (3, 32, 32)),
    "shufflenet_v2_x0_5": ({}, (3, 32, 32)),
    "regnet_y_400mf": ({}, (3, 32, 32)),
    "densenet121": ({}, (3, 32, 32)),
    "squeezenet1_1": ({}, (3, 32, 32)),
    "googlenet": ({"aux_logits": False, "init_weights": True}, (3, 32, 32)),
    "mnasnet0_5": ({}, (3, 32, 32)),
    "convnext_tiny": ({}, (3, 32, 32)),
}
FAST_TORCHVISION = ("resnet18",)  # the default test run's share of the matrix (all rows: -m conformance, CI)


def torchvision_model(name: str, num_classes: int = 10) -> tuple[nn.Module, tuple[int, ...]]:
    """A randomly initialised torchvision classifier with warmed BN statistics, and its input shape."""
    models = import_torchvision()
    kwargs, shape = TORCHVISION[name]
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=num_classes, **kwargs)
    return warm_bn(model, shape), shape


# --- small constructed models: one per pattern users have -------------------------------------------------


class InplaceResidual(nn.Module):
    """torchvision's BasicBlock idiom: ReLU(inplace=True) after BN, ``out += identity``, F.relu(inplace=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        out = F.relu(out, inplace=True)
        return self.fc(torch.flatten(self.pool(out), 1))


class Functional(nn.Module):
    """Activations, pooling and the classifier as functional calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv1(x)))
        x = F.hardswish(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(F.max_pool2d(x, 2), 1).flatten(1)
        return F.linear(x, self.fc.weight, self.fc.bias)


class TwoHeads(nn.Module):
    """Returns ``(logits, aux)`` (or a dict with ``as_dict``)."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc, self.aux = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1)
        if self.as_dict:
            return {"logits": self.fc(h), "aux": self.aux(h)}
        return self.fc(h), self.aux(h)


def conv_transpose_net() -> nn.Module:
    """The issue's smallest ConvTranspose model, with a classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


def bn1d_head() -> nn.Module:
    """Conv features, then Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def no_bn() -> nn.Module:
    """Conv-ReLU without any BatchNorm (BN methods must refuse it by name)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


def graph_module() -> nn.Module:
    """A user's own ``torch.fx.symbolic_trace`` output: its submodules sit in plain ``nn.Module`` containers."""
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
    )
    return torch.fx.symbolic_trace(net)


PATTERNS: dict[str, Callable[[], nn.Module]] = {
    "inplace_residual": InplaceResidual,
    "functional": Functional,
    "tuple_output": TwoHeads,
    "dict_output": lambda: TwoHeads(as_dict=True),
    "conv_transpose": conv_transpose_net,
    "bn1d_head": bn1d_head,
    "no_bn": no_bn,
    "graph_module": graph_module,
}
PATTERN_SHAPE = (1, 8, 8)


def pattern_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A small constructed model of one user pattern, BN warmed, and its input shape."""
    torch.manual_seed(0)
    return warm_bn(PATTERNS[name](), PATTERN_SHAPE), PATTERN_SHAPE


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What no entry point may change: state, modes, requires_grad, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """Fail when ``model`` differs from its :func:`snapshot`."""
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
    assert before["training"] == after["training"], "module modes changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["hooks"] == after["hooks"], "hooks left behind"


class _CLIArch:
    """``--arch conformance:TV_<name>`` for the CLI: a class whose no-argument construction gives the model."""

    name = ""

    def __new__(cls) -> nn.Module:  # type: ignore[misc]
        return build(cls.name)[0]


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Any matrix model by name (torchvision or pattern)."""
    return torchvision_model(name) if name in TORCHVISION else pattern_model(name)


def __getattr__(attr: str) -> Any:
    if attr.startswith("TV_") and attr[3:] in {*TORCHVISION, *PATTERNS}:
        return type(attr, (_CLIArch,), {"name": attr[3:]})
    raise AttributeError(attr)


def pt2e_specs(ns: Any, act: Any, wt: Any, a_bits: int, w_bits: int) -> tuple[Any, Any]:
    """torchao QuantizationSpecs: per-tensor affine uint8 activations, per-channel symmetric narrow int8 weights."""
    act_spec = ns.QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=2**a_bits - 1,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=act,
    )
    wt_spec = ns.QuantizationSpec(
        dtype=torch.int8,
        quant_min=-(2 ** (w_bits - 1)) + 1,
        quant_max=2 ** (w_bits - 1) - 1,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=wt,
    )
    return act_spec, wt_spec


def pt2e_prepare(model: nn.Module, calib: torch.Tensor, act: Any, wt: Any, a_bits: int = 8, w_bits: int = 8) -> Any:
    """torch.export (dynamic batch) -> prepare_pt2e with a conv/linear-input quantizer using our observers.

    The quantizer annotates the input and weight of every conv/linear (PT2E's meaning of
    activation bits: a layer's input), as integration-notes §2 describes. torchao's own
    X86InductorQuantizer is not used here: on torchvision's ResNets it fails inside torchao
    ("Input partition has more than one output node", the conv+BN+add fusion), whatever the observers.
    """
    import copy

    from zq_plugin import _compat

    ns = _compat.torchao_pt2e()
    act_spec, wt_spec = pt2e_specs(ns, act, wt, a_bits, w_bits)
    targets = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}

    class ConvLinearInputs(ns.Quantizer):  # type: ignore[misc,name-defined]
        def annotate(self, gm: Any) -> Any:
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target in targets:
                    node.meta["quantization_annotation"] = ns.QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act_spec, node.args[1]: wt_spec}, _annotated=True
                    )
            return gm

        def validate(self, gm: Any) -> None:
            pass

    exported = torch.export.export(
        copy.deepcopy(model), (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},)
    ).module()
    return ns.prepare_pt2e(exported, ConvLinearInputs()), ns


def input_value_counts(qmodel: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``layer -> number of distinct values in the input it computes with``, seen while the model runs.

    What :func:`zq_plugin.describe` says is checked against this: on FX and PT2E the value a weight
    call reads (its argument 0, run by a ``torch.fx.Interpreter``), on Brevitas the output of the
    layer's input quantizer (a forward hook). The most distinct values over the layer's calls.
    """
    import zq_plugin

    backend = zq_plugin.describe(qmodel).backend
    seen: dict[str, int] = {}

    def note(name: str, value: Any) -> None:
        value = getattr(value, "value", value)  # a Brevitas QuantTensor
        if isinstance(value, torch.Tensor):
            seen[name] = max(seen.get(name, 0), int(torch.unique(value.detach()).numel()))

    if backend in ("fx", "pt2e"):
        if backend == "fx":
            from zq_plugin.backends.fx_sim import weight_nodes

            layer_of = {node: name for name, node in weight_nodes(qmodel)}
        else:
            from zq_plugin.backends.pt2e import TARGETS, _weight_owner

            layer_of = {
                n: n.meta.get("zq_layer") or _weight_owner(n)
                for n in qmodel.graph.nodes
                if n.op == "call_function" and n.target in TARGETS and len(n.args) >= 2
            }

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                if n in layer_of and isinstance(n.args[0], torch.fx.Node):
                    note(layer_of[n], self.env[n.args[0]])
                return super().run_node(n)

        with torch.no_grad():
            Recorder(qmodel).run(x)
        return seen
    from zq_plugin.backends.brevitas import _quant_layers

    handles = [
        layer.register_forward_pre_hook(lambda m, args, n=name: note(n, m.input_quant(args[0])))
        for name, layer in _quant_layers(qmodel)
        if layer.input_quant.is_quant_enabled
    ]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def module_layer_names(model: nn.Module) -> list[str]:
    """The weight layers ``model`` calls as modules, in execution order (reconstruction's units hold
    these; a layer computed by ``F.linear(x, self.fc.weight)`` keeps its calibrated rounding)."""
    from zq_plugin._utils import weight_layers

    layers = weight_layers(model)
    graph = torch.fx.symbolic_trace(model).graph
    names = [str(n.target) for n in graph.nodes if n.op == "call_module" and str(n.target) in layers]
    return list(dict.fromkeys(names))
