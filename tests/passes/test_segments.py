"""Partial re-runs of a captured graph (passes/segments.py) reproduce the full run."""

import pytest
import torch
from torch import nn

from clq_compile.passes.segments import SegmentedGraph, fp_linear
from tests.helpers import dynamo_graph


class BatchedMask(nn.Module):
    """A linear whose output feeds a torch.vmap (as flex attention's block masks are built: Dynamo
    inlines the vmap as level increments, batch-dim adds and removes) and an autocast region."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        h = self.a(x)
        # `ones` does not depend on `a`, but its batched copy lives only inside the vmap level.
        ones = torch.ones_like(x)
        masked = torch.vmap(lambda row, one: torch.where(row > 0, row, one * 0.5))(h, ones)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.b(masked)
        return y.float() + masked


@pytest.fixture(scope="module")
def batched_mask():
    torch.manual_seed(0)
    model = BatchedMask()
    x = torch.randn(5, 8)
    with torch.no_grad():
        gm, example_inputs, analysis = dynamo_graph(model, {"x": x})
    return SegmentedGraph(gm, analysis), example_inputs


def test_the_graph_holds_vmap_and_autocast_state_calls(batched_mask):
    seg, _ = batched_mask
    names = {getattr(n.target, "__name__", "") for n in seg.nodes}
    assert {"_vmap_increment_nesting", "_vmap_decrement_nesting", "_enter_autocast", "_exit_autocast"} <= names


def test_rerunning_a_layers_descendants_reproduces_the_full_run(batched_mask):
    seg, args = batched_mask
    full = seg.run(seg.nodes, seg.start_env(args), fp_linear)
    env = {**seg.start_env(args), **full}
    for site in seg.analysis.sites:
        nodes = seg.descendants(site.node, len(seg.nodes))
        with torch.no_grad():
            again = seg.run(nodes, env, fp_linear)
        for node in nodes:
            # Values inside a vmap level are batched tensors of that (finished) level.
            inside = any(enter <= seg.index[node] <= exit_ for enter, exit_, whole in seg.regions if whole)
            if isinstance(full[node], torch.Tensor) and not inside:
                assert torch.equal(again[node], full[node]), (site.node, node.name)


def test_a_cone_takes_state_regions_whole(batched_mask):
    seg, args = batched_mask
    a, b = (s.node for s in seg.analysis.sites)
    cone = seg.cone(a, b)
    names = [getattr(n.target, "__name__", "") for n in cone]
    assert names.count("_vmap_increment_nesting") == names.count("_vmap_decrement_nesting") == 1
    assert names.count("_enter_autocast") == names.count("_exit_autocast") == 1
    full = seg.run(seg.nodes, seg.start_env(args), fp_linear)
    again = seg.run(cone, {**seg.start_env(args), **full}, fp_linear)
    assert torch.equal(again[seg.node(b)], full[seg.node(b)])
