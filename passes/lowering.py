"""Lowering: replace each quantized `F.linear` by one `clq::quant_linear` call.

Precondition: `analysis` was captured from `gm`; `layers` holds a QuantizedLinear for the module
path of every site in `quantize` (node names).
Postcondition: a new GraphModule (Dynamo's `gm` is left untouched, so it can still run the
full-precision graph) with the same placeholders and outputs, in which every selected linear is a
`torch.ops.clq.quant_linear` node named after its module path
("transformer_blocks_0_attn1_to_q") reading its packed weight and scales from attributes named
"<layer>_qweight", "<layer>_w_scale", ... The full-precision weight placeholders stay in the
signature, unused, so the graph is called exactly like the one Dynamo captured.

With `merge` (passes/merging.py), the layers of each merge group become one call on their shared
input, named after all of them ("transformer_blocks_0_attn1_to_q_to_k_to_v"), whose output each
member's users read as a slice of the last axis; the members' outputs are unchanged bit for bit.
The plan is kept in the new graph's `meta["clq_merges"]` for explain().

A layer quantized per timestep bucket becomes one `clq::quant_linear_bucketed` call holding every
bucket's tensors ("<layer>_b0_qweight", ...) and reading the bucket index that one
`clq::timestep_bucket` node computes from the graph's `timestep` input and the bucket edges
("clq_timestep_edges_0"); such layers are not merged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import torch
from torch import fx

from clq_compile.kernels.packing import PackedWeight

from .capture import GraphAnalysis
from .folding import check_folds
from .layer import LOWRANK_ARGS, TENSOR_ARGS, QuantizedLinear, TimestepBuckets
from .merging import Merge, MergePlan, merged_weight, plan_merges


def _attr_prefix(path: str) -> str:
    # A linear that is the compiled module itself has the empty path.
    return re.sub(r"\W", "_", path) or "linear"


def lower(gm: fx.GraphModule, analysis: GraphAnalysis, layers: dict[str, QuantizedLinear],
          quantize: set[str], kernels: str, merge: bool = True) -> fx.GraphModule:
    """The rewritten graph (see the module docstring).

    The members of a merge are replaced in `layers` by records holding row views of the merged
    tensors (so the merge costs no memory, and a later lowering finds the same tensors).
    Raises ValueError when a layer's folded transform is not connected the same way in `gm`.
    """
    sites = [s for s in analysis.sites if s.node in quantize]
    check_folds(gm, analysis, {s.path: layers[s.path].fold for s in sites if layers[s.path].fold is not None},
                quantize)
    plan = plan_merges(gm, analysis, layers, quantize) if merge else MergePlan((), {})
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    attributes = {n.target: getattr(gm, n.target) for n in gm.graph.nodes
                  if n.op in ("get_attr", "call_module")}
    copies = {old.name: new for old, new in env.items()}

    def constant(name: str, tensor: torch.Tensor, near: fx.Node) -> fx.Node:
        attributes[name] = tensor
        attr = graph.get_attr(name)
        attr.meta["stack_trace"] = near.meta.get("stack_trace")
        return attr

    def quant_linear(linear: fx.Node, layer: QuantizedLinear, prefix: str, bias: fx.Node | None) -> fx.Node:
        tensors = []
        for name in TENSOR_ARGS:
            tensor = layer.tensors()[name]
            if name == "bias":
                tensors.append(bias)
            else:
                tensors.append(None if tensor is None else constant(f"{prefix}_{name}", tensor, linear))
        return graph.create_node("call_function", torch.ops.clq.quant_linear.default,
                                 (linear.args[0], *tensors, *layer.scalars(kernels)), name=prefix)

    def with_lowrank(out: fx.Node, linear: fx.Node, layer: QuantizedLinear, prefix: str) -> fx.Node:
        """out + (x · downᵀ) · upᵀ for a layer with a low-rank branch (LowRank.apply), else out."""
        if layer.lowrank is None:
            return out
        x = linear.args[0]
        dtype = _dtype(linear)
        down, up = (constant(f"{prefix}_{name}", t if dtype is None else t.to(dtype), linear)
                    for name, t in zip(LOWRANK_ARGS, (layer.lowrank.down, layer.lowrank.up)))
        f = torch.nn.functional.linear
        branch = graph.call_function(f, (graph.call_function(f, (x, down)), up))
        return graph.call_function(torch.add, (out, branch))

    def graph_bias(linear: fx.Node) -> fx.Node | None:
        return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")

    def own_bias(linear: fx.Node, layer: QuantizedLinear, prefix: str) -> fx.Node | None:
        if layer.bias is not None:
            return constant(f"{prefix}_bias", layer.bias, linear)
        return graph_bias(linear)

    buckets: dict[tuple[float, ...], fx.Node] = {}

    def bucket_index(path: str, layer_buckets: TimestepBuckets) -> fx.Node:
        """The graph's bucket index node for the buckets' edges, made once, right after the graph's inputs."""
        edges = layer_buckets.edges
        if edges not in buckets:
            timestep = next((p for p in analysis.placeholders if p.kind == "input" and p.source == "timestep"), None)
            if timestep is None:
                raise ValueError(
                    f"layer {path} is quantized per timestep bucket, but this graph has no `timestep` input to "
                    f"choose the bucket from (a graph Dynamo traced after a graph break?); compile the model "
                    f"with fullgraph=True, or quantize with timestep_buckets=1")
            last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(last_input):
                attr = graph.get_attr(f"clq_timestep_edges_{len(buckets)}")
                attributes[attr.target] = layer_buckets.edges_tensor()
            with graph.inserting_after(attr):
                buckets[edges] = graph.create_node("call_function", torch.ops.clq.timestep_bucket.default,
                                                   (copies[timestep.name], attr), name=f"clq_timestep_bucket_{len(buckets)}")
        return buckets[edges]

    def quant_linear_bucketed(linear: fx.Node, layer: QuantizedLinear, prefix: str) -> fx.Node:
        qweight, w_scale, w_zero, own, mul, perm, rotation, *scalars = layer.bucketed_args(kernels)
        lists = [[None if t is None else constant(f"{prefix}_b{b}_{name}", t, linear) for b, t in enumerate(ts)]
                 for name, ts in zip(TENSOR_ARGS, (qweight, w_scale, w_zero, own, mul, perm, rotation))]
        index = bucket_index(prefix, layer.buckets)
        return graph.create_node("call_function", torch.ops.clq.quant_linear_bucketed.default,
                                 (linear.args[0], index, graph_bias(linear), *lists, *scalars), name=prefix)

    merged = {node for m in plan.merges for node in m.nodes}
    for site in analysis.sites:
        if site.node not in quantize or site.node in merged:
            continue
        linear = copies[site.node]
        prefix = _attr_prefix(site.path)
        layer = layers[site.path]
        with graph.inserting_before(linear):
            call = (quant_linear_bucketed(linear, layer, prefix) if layer.buckets is not None else
                    quant_linear(linear, layer, prefix, own_bias(linear, layer, prefix)))
            call.meta = dict(linear.meta)
            out = with_lowrank(call, linear, layer, prefix)
        out.meta = dict(linear.meta)
        linear.replace_all_uses_with(out)
        graph.erase_node(linear)
    for m in plan.merges:
        weight, views = merged_weight([layers[p] for p in m.paths])
        # The members' records, rebuilt to hold row views of the merged tensors (a later lowering
        # finds them holding those views already, and keeps them).
        layers.update({p: dataclasses.replace(layers[p], weight=v) for p, v in zip(m.paths, views)
                       if v is not layers[p].weight})
        _lower_merge(graph, m, [copies[n] for n in m.nodes], [layers[p] for p in m.paths], weight, quant_linear,
                     own_bias, constant, with_lowrank)

    graph.lint()
    lowered = fx.GraphModule(attributes, graph, class_name="ClqQuantizedGraph")
    lowered.meta["clq_merges"] = plan
    lowered.recompile()
    return lowered


MERGE_NAMES_SPELLED = 4


def merge_name(paths: tuple[str, ...]) -> str:
    """"transformer_blocks.0.attn1.to_q", "...to_k" -> "transformer_blocks_0_attn1_to_q_to_k";
    past MERGE_NAMES_SPELLED members (cross-attention k/v of every block read one caption):
    "<first>_and_<n - 1>_more"."""
    if len(paths) > MERGE_NAMES_SPELLED:
        return f"{_attr_prefix(paths[0])}_and_{len(paths) - 1}_more"
    parts = [p.split(".") for p in paths]
    common = os.path.commonprefix(parts)
    return _attr_prefix(".".join([*common, *(".".join(p[len(common):]) for p in parts)]))


def _lower_merge(graph: fx.Graph, m: Merge, linears: list[fx.Node], members: list[QuantizedLinear],
                 weight: PackedWeight, quant_linear, own_bias, constant, with_lowrank) -> None:
    """One quant_linear for the members of `m` (their merged `weight`); each member's users read
    their slice of it, plus the member's own low-rank branch where it has one."""
    prefix = merge_name(m.paths)
    first = linears[0]
    widths = [layer.weight.qweight.shape[0] for layer in members]
    layer = dataclasses.replace(members[0], weight=weight, bias=None, lowrank=None)
    with graph.inserting_before(first):
        biases = [own_bias(linear, member, _attr_prefix(path))
                  for linear, member, path in zip(linears, members, m.paths)]
        if all(b is None for b in biases):
            bias = None
        else:
            # A member without a bias adds zeros: the same column values as adding nothing.
            biases = [b if b is not None else constant(f"{_attr_prefix(path)}_bias", torch.zeros(n), linear)
                      for b, n, linear, path in zip(biases, widths, linears, m.paths)]
            bias = graph.call_function(torch.cat, (biases,))
        call = quant_linear(first, layer, prefix, bias)
        call.meta = {k: v for k, v in first.meta.items() if k not in ("example_value", "val", "tensor_meta")}
        start = 0
        for linear, n, member, path in zip(linears, widths, members, m.paths):
            part = graph.call_function(torch.narrow, (call, -1, start, n))
            if _needs_dense(linear) and member.lowrank is None:
                part = graph.call_method("contiguous", (part,))
            part = with_lowrank(part, linear, member, _attr_prefix(path))
            part.meta = dict(linear.meta)
            start += n
            linear.replace_all_uses_with(part)
    for linear in linears:
        graph.erase_node(linear)


def _dtype(linear: fx.Node) -> torch.dtype | None:
    """The dtype of the linear's output as traced (None when the graph carries no example)."""
    value = linear.meta.get("example_value", linear.meta.get("val"))
    return getattr(value, "dtype", None)


def _needs_dense(linear: fx.Node) -> bool:
    """Whether some user of the linear's output may need it dense in memory, which a slice of the
    merged output is not: a `view` doing more than splitting the last axis (view cannot merge
    axes of a sliced tensor). Other operations take any strides."""
    before = linear.meta.get("example_value", linear.meta.get("val"))
    for user in linear.users:
        if not (user.op == "call_method" and user.target == "view" or user.target is torch.Tensor.view):
            continue
        after = user.meta.get("example_value", user.meta.get("val"))
        try:
            lead = tuple(before.shape[:-1])
            if not (tuple(after.shape[:len(lead)]) == lead
                    and math.prod(after.shape[len(lead):]) == before.shape[-1]):
                return True
        except Exception:  # noqa: BLE001  (no shapes, or symbolic ones: copy to be safe)
            return True
    return False
