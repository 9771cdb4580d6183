"""Reconstruction units found from the graph (cut points), on models this project did not write."""

import itertools

import pytest
import torch
from conformance import pattern_model, torchvision_model

import zq_plugin
from zq_plugin import zoo
from zq_plugin._utils import weight_layers
from zq_plugin.reconstruct.blocks import cut_points, find_blocks


def _layers(blocks):
    return [name for b in blocks for name in b.layers]


def test_torchvision_resnet18_units_are_its_basic_blocks():
    model, _ = torchvision_model("resnet18")
    blocks = find_blocks(torch.fx.symbolic_trace(model.eval()))
    assert [b.name for b in blocks] == ["conv1", *[f"layer{i}.{j}" for i in range(1, 5) for j in range(2)], "fc"]
    assert [len(b.layers) for b in blocks] == [1, 2, 2, 3, 2, 3, 2, 3, 2, 1]  # downsample convs inside
    assert _layers(blocks) == list(weight_layers(model))  # every weight layer once, in order
    for before, after in itertools.pairwise(blocks):
        assert after.input == before.output  # units chain through their cut points


def test_mobilenet_v2_inverted_residuals_are_one_unit_with_or_without_a_skip():
    model, _ = torchvision_model("mobilenet_v2")
    gm = torch.fx.symbolic_trace(model.eval())
    blocks = find_blocks(gm)
    names = [b.name for b in blocks]
    assert names[:4] == ["features.0.0", "features.1.conv", "features.2.conv", "features.3.conv"]
    assert [len(b.layers) for b in blocks[2:18]] == [3] * 16  # features.2 has no skip, features.3 has one
    assert _layers(blocks) == list(weight_layers(model))
    split = [b.name for b in find_blocks(gm, max_module_layers=1)]  # every cut point ends a unit
    assert "features.3.conv" in split and "features.2.conv.1.0" in split


def test_a_chain_with_a_gate_inside_is_one_unit_and_residual_blocks_stay_apart():
    model, _ = torchvision_model("mobilenet_v3_small")
    blocks = find_blocks(torch.fx.symbolic_trace(model.eval()))
    sizes = {b.name: len(b.layers) for b in blocks}
    assert sizes["features.1.block"] == 4  # depthwise, two squeeze-excite layers, project: no skip
    assert sizes["features.4.block"] == 5  # expand, depthwise, squeeze-excite, project
    assert _layers(blocks) == list(weight_layers(model))
    resnet, _ = torchvision_model("resnet18")
    assert "layer1" not in [b.name for b in find_blocks(torch.fx.symbolic_trace(resnet.eval()))]  # no stage units


@pytest.mark.parametrize("name", ["resnet_s", "mobilenetv2_s", "plain_cnn"])
def test_units_of_the_clamping_simulation_hold_the_fused_layers(name):
    model = zoo.load(name)
    sim = zq_plugin.quantize_fx(model, torch.randn(8, 1, 28, 28), w_bits=4, a_bits=4)
    float_blocks = find_blocks(torch.fx.symbolic_trace(model))
    sim_blocks = find_blocks(sim)
    assert [len(b.layers) for b in sim_blocks] == [len(b.layers) for b in float_blocks]
    modules = dict(sim.named_modules())
    assert all(isinstance(modules[n], torch.nn.Conv2d | torch.nn.Linear) for n in _layers(sim_blocks))


def test_plain_chain_gives_one_unit_per_layer_and_tuple_outputs_keep_their_tail():
    chain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 3), torch.nn.Flatten())
    blocks = find_blocks(torch.fx.symbolic_trace(chain))
    assert [b.layers for b in blocks] == [("0",), ("2",)]
    assert blocks[0].nodes == ("_0", "_1") and blocks[1].output == "_3"  # activations and flatten join
    model, _ = pattern_model("tuple_output")
    blocks = find_blocks(torch.fx.symbolic_trace(model))
    assert _layers(blocks) == list(weight_layers(model))


def test_cut_points_of_a_residual_graph():
    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = torch.relu(x)
            return y + self.a(y)

    graph = torch.fx.symbolic_trace(Res()).graph
    assert [n.name for n in cut_points(graph)] == ["x", "relu", "add"]  # not inside the residual
    assert find_blocks(torch.fx.symbolic_trace(torch.nn.ReLU())) == []


@pytest.mark.parametrize("source", ["resnet18", "mobilenet_v2", "resnet_s_sim"])
def test_units_run_alone_and_chained_give_the_model(source):
    from zq_plugin.reconstruct.graph import block_module, node_values

    if source == "resnet_s_sim":
        gm = zq_plugin.quantize_fx(zoo.load("resnet_s"), torch.randn(8, 1, 28, 28), w_bits=4, a_bits=4)
        x = torch.randn(3, 1, 28, 28)
    else:
        model, shape = torchvision_model(source)
        gm = torch.fx.symbolic_trace(model.eval())
        x = torch.randn(3, *shape)
    blocks = find_blocks(gm)
    with torch.no_grad():
        out = x
        for block in blocks:
            out = block_module(gm, block)(out)
            middle = node_values(gm, block.output, [x])[0]
            torch.testing.assert_close(out, middle, atol=1e-5, rtol=1e-5)  # the unit alone = the model there
        torch.testing.assert_close(out, gm(x), atol=1e-5, rtol=1e-5)


def test_a_value_read_by_indexing_is_no_cut_point():
    """ShuffleNet's ``x.chunk(2, dim=1)``: the tuple is the only live value, but a unit's input is one tensor."""

    class Shuffle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, dim=1)
            return torch.cat([left, self.b(right)], 1)

    gm = torch.fx.symbolic_trace(Shuffle())
    assert "chunk" not in [n.name for n in cut_points(gm.graph)]
    assert [b.layers for b in find_blocks(gm)] == [("a",), ("b",)]  # the second from a's output to the cat
