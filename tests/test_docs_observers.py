"""The code in docs/observers.md runs as written (on a tiny model and noise data)."""

import pathlib
import re

import pytest
import torch

import zq_plugin
from zq_plugin import _compat

DOC = pathlib.Path(__file__).parent.parent / "docs" / "observers.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_docs_have_the_examples():
    assert len(blocks()) == 3


def test_docs_examples_run(tiny_bn_net):
    data = zq_plugin.synthesize(
        tiny_bn_net, "noise", num_samples=32, input_shape=(1, 12, 12), input_range=None, progress=False
    )
    ns = {"model": tiny_bn_net, "data": data, "zq_plugin": zq_plugin}
    qconfig_block, sim_block, pt2e_block = blocks()
    exec(qconfig_block, ns)
    assert ns["mapping"].global_qconfig is ns["mse"]
    exec(sim_block, ns)
    assert torch.isfinite(ns["sim"](data.images)).all()
    if not _compat.has_torchao():
        pytest.skip("torchao is not installed")
    exec(pt2e_block, ns)
    targets = {str(n.target) for n in ns["quantized"].graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets)
