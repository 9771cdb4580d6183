"""One request, one model: the same quantized model on FX, PT2E and Brevitas, and describe() says so."""

import dataclasses

import pytest
import torch
from conftest import assert_unchanged, randomize_bn, snapshot
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError
from zq_plugin.mixed_precision import BitPlan
from zq_plugin.pipeline import Request, run
from zq_plugin.reconstruct import METHODS
from zq_plugin.report import describe

QUICK = dataclasses.replace(METHODS["genie-m"], iterations=8, batch_size=8)
BACKENDS = ["fx", "pt2e", "brevitas"]


class Residual(nn.Module):
    """A branch (one tensor read by two layers), a residual add, max-pool and flatten before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.shortcut = nn.Conv2d(6, 6, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(y)) + self.shortcut(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Residual().eval())


def _data() -> torch.Tensor:
    return torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _skip_missing(backend: str) -> None:
    if backend == "pt2e":
        pytest.importorskip("torchao")
    elif backend == "brevitas":
        pytest.importorskip("brevitas")


def _distinct_inputs(qmodel: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, int]:
    """``layer -> number of distinct values it reads``, seen by a hook on the layer's quantized input."""
    seen: dict[str, int] = {}
    handles = []
    report = describe(qmodel)
    backend = report.backend
    for name in names:
        if backend == "pt2e":
            continue  # aten calls carry no module: counted from the graph instead below
        module = qmodel.get_submodule(name)

        def hook(m, args, out, n=name):
            value = args[0]
            if backend == "brevitas":
                value = m.input_quant(value)
                value = getattr(value, "value", value)
            seen[n] = int(torch.unique(value).numel())

        if backend == "fx":  # the FakeQuantize in front of the layer
            fq_name = name.replace(".", "_") + "_input_quant"
            qmodel.get_submodule(fq_name).register_forward_hook(
                lambda m, a, o, n=name: seen.__setitem__(n, int(torch.unique(o).numel()))
            )
        else:
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        qmodel(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("stage", ["calibrate", "reconstruct"])
def test_the_same_request_gives_the_same_model_on_every_backend(stage):
    for backend in BACKENDS[1:]:
        _skip_missing(backend)
    net, x = _net(), _data()
    before = snapshot(net)
    kw = {"w_bits": 4, "a_bits": 3, "first_last_bits": 8, "stage": stage, "reconstruction_config": QUICK}
    models = {b: run(net, x, Request(backend=b, **kw), progress=False) for b in BACKENDS}
    assert_unchanged(net, before)
    test = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = {b: m(test) for b, m in models.items()}
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(logits[backend], logits["fx"], atol=1e-4, rtol=1e-4)
        report = describe(models[backend])
        assert {r.weight_step for r in report.layers} == {"carried"}, report.table()
        assert {r.input_step for r in report.layers} == {"carried"}, report.table()
    expected = {"stem.0": (8, 8), "conv1": (4, 3), "shortcut": (4, 3), "fc": (8, 8)}
    for backend, model in models.items():
        report = describe(model)
        assert {r.name: (r.w_bits, r.a_bits) for r in report.layers} == expected, (backend, report.table())
        assert report.build is not None and report.build.stage == stage and report.build.data.count == 48


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_plan_on_a_branch_is_applied_on_every_layer(backend):
    """Two layers read one tensor at different bits: each gets its own bits (FX used to give both the higher)."""
    _skip_missing(backend)
    net, x = _net(), _data()
    plan = BitPlan.uniform(net, w_bits=4, a_bits=4).replace_layer("conv1", a_bits=3).replace_layer("shortcut", a_bits=5)
    qmodel = run(net, x, Request(plan=plan, stage="calibrate", backend=backend), progress=False)
    report = describe(qmodel)
    assert {r.name: r.a_bits for r in report.layers} == {"stem.0": 8, "conv1": 3, "shortcut": 5, "fc": 8}
    if backend != "pt2e":
        distinct = _distinct_inputs(qmodel, x, ["conv1", "shortcut"])
        assert distinct["conv1"] <= 2**3 and 2**3 < distinct["shortcut"] <= 2**5


def test_uniform_a_bits_mean_a_layer_input_in_quantize_fx():
    """The first layer's input is the image at first_last_bits, the last layer's input at a_bits."""
    net, x = _net(), _data()
    sim = zq_plugin.quantize_fx(net, x, w_bits=4, a_bits=3)
    rows = {r.name: (r.w_bits, r.a_bits) for r in describe(sim).layers}
    assert rows == {"stem.0": (8, 8), "conv1": (4, 3), "shortcut": (4, 3), "fc": (8, 8)}
    folded = zq_plugin.quantize_fx(net, x, w_bits=4, a_bits=3, fold=True)
    assert {r.name: (r.w_bits, r.a_bits) for r in describe(folded).layers} == rows


class _FunctionalLast(nn.Module):
    """The last layer computed as ``F.linear(x, self.fc.weight, self.fc.bias)``: the smallest input of the fault."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.nn.functional.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("stage", ["calibrate", "reconstruct"])
def test_a_functional_last_layer_is_the_last_layer_on_fx_and_pt2e(stage):
    """First/last bits go to the layers the graph runs first and last, functional calls included,
    and PT2E names (and carries) the functional layer as the simulation does."""
    pytest.importorskip("torchao")
    net, x = _FunctionalLast().eval(), torch.randn(16, 1, 6, 6)
    rows = {}
    for backend in ("fx", "pt2e"):
        request = Request(w_bits=4, a_bits=4, stage=stage, backend=backend, reconstruction_config=QUICK)
        report = describe(run(net, x, request))
        rows[backend] = {r.name: (r.w_bits, r.a_bits) for r in report.layers}
        if backend == "pt2e":
            assert {r.weight_step for r in report.layers} == {"carried"}, report.table()
    assert rows["fx"] == rows["pt2e"] == {"conv1": (8, 8), "conv2": (4, 4), "fc": (8, 8)}


def test_request_names_its_mistakes():
    with pytest.raises(ConfigError, match="backend='onnx' is unknown"):
        Request(backend="onnx")
    with pytest.raises(ConfigError, match="observer='max' is unknown"):
        Request(observer="max")
    with pytest.raises(ConfigError, match="stage="):
        Request(stage="qat")
    with pytest.raises(ConfigError, match="weight_observer='histogram'"):
        Request(weight_observer="histogram")
    with pytest.raises(ConfigError, match="unknown reconstruction method 'brecq2'"):
        Request(reconstruction="brecq2")


def test_describe_refuses_a_float_model():
    with pytest.raises(ConfigError, match="holds no quantizer"):
        describe(_net())


def test_report_json_and_table():
    net, x = _net(), _data()
    sim = run(net, x, Request(w_bits=4, a_bits=4, stage="calibrate"), progress=False)
    report = describe(sim)
    data = report.to_dict()
    assert data["layers_by_bits"] == {"w_bits": {"8": 2, "4": 2}, "a_bits": {"8": 2, "4": 2}}
    assert data["build"]["data"]["source"] == "given" and len(data["build"]["data"]["fingerprint"]) == 16
    assert "conv1" in report.table() and report.to_json().startswith("{")


@pytest.mark.parametrize("backend", ["pt2e"])  # a Brevitas model of a Sequential keeps plain attributes
def test_the_old_attributes_still_read_with_a_deprecation_warning(backend):
    _skip_missing(backend)
    q = run(_net(), _data(), Request(backend=backend, reconstruction_config=QUICK), progress=False)
    with pytest.warns(DeprecationWarning, match="describe"):
        carried = q.zq_carried
    assert carried["weight_steps"] == carried["act_steps"] == 4
    with pytest.warns(DeprecationWarning, match="zq_build"):
        assert [r["unit"] for r in q.zq_reconstruction] == [r["unit"] for r in q.zq_build.stage_report]


def test_describe_says_a_functional_layer_keeps_its_calibrated_rounding():
    """Reconstruction learns the weights of module layers; F.linear(x, self.fc.weight) is reported as calibrated."""
    net, x = _FunctionalLast().eval(), torch.randn(16, 1, 6, 6)
    sim = run(net, x, Request(w_bits=4, a_bits=4, stage="reconstruct", reconstruction_config=QUICK))
    steps = {r.name: r.weight_step for r in describe(sim).layers}
    assert steps == {"conv1": "reconstructed", "conv2": "reconstructed", "fc": "calibrated"}


class _FunctionalMiddle(nn.Module):
    """A 1x1 layer in the middle computed as ``F.conv2d(x, self.mix.weight, self.mix.bias)`` (outside check)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mix, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(torch.nn.functional.conv2d(x, self.mix.weight, self.mix.bias))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_reaches_a_functional_layer_on_every_backend(backend):
    """The plan's bits of a functionally computed layer are applied on every backend (carried on
    PT2E and Brevitas), not the keyword defaults or 8 bits, and not left float."""
    _skip_missing(backend)
    net, x = _FunctionalMiddle().eval(), torch.randn(32, 1, 8, 8)
    plan = BitPlan.uniform(net, w_bits=3, a_bits=3)
    report = describe(run(net, x, Request(plan=plan, stage="calibrate", backend=backend)))
    rows = {r.name: (r.w_bits, r.a_bits) for r in report.layers}
    assert rows == {"c1": (8, 8), "mix": (3, 3), "fc": (8, 8)} and report.float_layers == ()
    if backend != "fx":
        assert {r.weight_step for r in report.layers} == {"carried"}
