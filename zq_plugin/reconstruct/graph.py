"""Graph plumbing for reconstruction: a unit as its own module, and the values at a node over a dataset.

A unit of :func:`~zq_plugin.reconstruct.blocks.find_blocks` starts at a cut point, so the only
value it reads from before is its input: :func:`block_module` copies its nodes into a new
``GraphModule`` with that input as the one placeholder, sharing the parent's submodules (so a
quantizer swapped in the unit is swapped in the model). :func:`node_values` runs the model and
keeps the value at one node for every batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import fx

from zq_plugin.errors import ModelError
from zq_plugin.reconstruct.blocks import Block


def block_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """The nodes of ``block`` as a ``GraphModule`` ``f(block_input) -> block_output``.

    Submodules are shared with ``gm`` (not copied); ``get_attr`` constants the unit reads are
    copied into the new graph.

    Raises:
        ModelError: the unit reads a value from before its input (not a unit of ``gm``).

    Example:
        >>> from zq_plugin.reconstruct.blocks import find_blocks
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> gm = torch.fx.symbolic_trace(net)
        >>> first = block_module(gm, find_blocks(gm)[0])
        >>> x = torch.randn(4, 2)
        >>> torch.equal(first(x), net[1](net[0](x)))
        True
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    inside = set(block.nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[block.input]: graph.placeholder("x")}

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":  # a constant read from the root module
            env[node] = graph.get_attr(str(node.target))
            return env[node]
        raise ModelError(
            f"unit {block.name!r} reads {node.name!r}, which lies before its input {block.input!r}; "
            "pass a unit found by find_blocks on this graph."
        )

    for name in block.nodes:
        node = nodes[name]
        if name not in inside:
            continue
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[nodes[block.output]])
    return fx.GraphModule(gm, graph)


class _Stop(Exception):
    pass


@torch.no_grad()
def node_values(gm: fx.GraphModule, node_name: str, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The value at ``node_name`` for each batch, computed up to that node only (then the run stops).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> gm = torch.fx.symbolic_trace(net)
        >>> [v.shape for v in node_values(gm, "_0", [torch.randn(4, 2), torch.randn(1, 2)])]
        [torch.Size([4, 3]), torch.Size([1, 3])]
    """
    target = next((n for n in gm.graph.nodes if n.name == node_name), None)
    if target is None:
        raise ModelError(f"the graph has no node {node_name!r}.")
    kept: list[torch.Tensor] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            value = super().run_node(n)
            if n is target:
                kept.append(value.detach() if isinstance(value, torch.Tensor) else value)
                raise _Stop
            return value

    for batch in batches:
        with contextlib.suppress(_Stop):  # the run ends at the node
            Recorder(gm).run(batch)
    return kept
