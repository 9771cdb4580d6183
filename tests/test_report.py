"""describe(): the ops a built model computes in float (issue 30, item 3), on every backend."""

import importlib.util

import pytest
import torch
from torch import nn

import zq_plugin
from zq_plugin.report import FloatOp, Report, describe

BACKENDS = ["fx", "pt2e", "brevitas"]
#: What the squeeze-excite net below computes in float: the stem's Hardswish, the SE block's
#: pooling, ReLU, gate and product, the residual sum and the head's pooling.
SE_KINDS = {"hardswish", "adaptive_avg_pool2d", "relu", "hardsigmoid", "mul", "add"}
NEVER = {"conv2d", "linear", "flatten", "view", "reshape", "size", "getitem"}


class SqueezeExcite(nn.Module):
    """MobileNetV3-style: Hardswish, an SE gate multiplied with the feature map, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        s = self.gate(self.expand(self.relu(self.reduce(self.squeeze(y)))))
        y = y + self.conv(y * s)
        return self.head(torch.flatten(self.pool(y), 1))


def _installed(backend: str) -> bool:
    package = {"pt2e": "torchao", "brevitas": "brevitas"}.get(backend)
    return package is None or importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    torch.manual_seed(0)
    net, x = SqueezeExcite().eval(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    found = {}
    for backend in filter(_installed, BACKENDS):
        q = zq_plugin.quantize(net, data=x, stage="calibrate", backend=backend, progress=False)
        found[backend] = describe(q)
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gate_its_product_hardswish_and_the_sum_are_float_ops(reports, backend):
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    report = reports[backend]
    kinds = {op.kind: op for op in report.float_ops}
    assert set(kinds) == SE_KINDS, report.table()
    assert not set(kinds) & NEVER
    assert kinds["adaptive_avg_pool2d"].count == 2 and kinds["mul"].count == kinds["add"].count == 1
    assert all(op.count == len(op.nodes) for op in report.float_ops)
    if backend != "pt2e":  # aten nodes carry their op's name; the module-based graphs their module's
        assert kinds["hardsigmoid"].nodes == ("gate",) and kinds["hardswish"].nodes == ("act",)
    weight_layers = {row.name for row in report.layers}
    assert weight_layers == {"stem", "reduce", "expand", "conv", "head"}
    assert not weight_layers & {n for op in report.float_ops for n in op.nodes if op.kind != "relu"}


def test_every_backend_sees_the_same_float_ops(reports):
    if len(reports) < 2:
        pytest.skip("one backend installed")
    seen = {b: {(op.kind, op.count) for op in r.float_ops} for b, r in reports.items()}
    assert all(kinds == seen["fx"] for kinds in seen.values()), seen


def test_float_ops_in_json_and_table():
    report = Report(
        backend="fx",
        layers=(),
        float_layers=(),
        build=None,
        float_ops=(
            FloatOp(kind="hardsigmoid", nodes=("se.gate", "se2.gate"), count=2),
            FloatOp(kind="mul", nodes=("mul", "mul_1"), count=2),
        ),
    )
    data = report.to_dict()
    assert data["float_ops"] == {"hardsigmoid": 2, "mul": 2}
    assert data["float_op_nodes"] == {"hardsigmoid": ["se.gate", "se2.gate"], "mul": ["mul", "mul_1"]}
    assert report.table().splitlines()[-1] == "float ops: hardsigmoid ×2, mul ×2"
    old = Report(backend="fx", layers=(), float_layers=(), build=None)  # built as before the field
    assert old.float_ops == () and "float ops" not in old.table() and old.to_dict()["float_ops"] == {}


def test_a_brevitas_model_without_a_graph_is_read_from_its_modules():
    """No graph: leaf modules only (functional calls in forward are not seen); no quantizer, no flatten."""
    qnn = pytest.importorskip("brevitas.nn")
    from zq_plugin.backends.brevitas.layers import float_ops_layers

    model = nn.Sequential(
        qnn.QuantConv2d(1, 4, 3), nn.SiLU(), nn.MaxPool2d(2), nn.Dropout(), nn.Flatten(), qnn.QuantLinear(36, 2)
    )
    assert float_ops_layers(model) == {"silu": ["1"], "max_pool2d": ["2"]}
