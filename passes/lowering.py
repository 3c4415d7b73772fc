"""Lowering: replace each quantized `F.linear` by one `clq::quant_linear` call.

Precondition: `analysis` was captured from `gm`; `layers` holds a QuantizedLinear for the module
path of every site in `quantize` (node names).
Postcondition: a new GraphModule (Dynamo's `gm` is left untouched, so it can still run the
full-precision graph) with the same placeholders and outputs, in which every selected linear is a
`torch.ops.clq.quant_linear` node named after its module path
("transformer_blocks_0_attn1_to_q") reading its packed weight and scales from attributes named
"<layer>_qweight", "<layer>_w_scale", ... The full-precision weight placeholders stay in the
signature, unused, so the graph is called exactly like the one Dynamo captured.
"""

from __future__ import annotations

import re

import torch
from torch import fx

from .capture import GraphAnalysis
from .folding import check_folds
from .layer import TENSOR_ARGS, QuantizedLinear


def _attr_prefix(path: str) -> str:
    # A linear that is the compiled module itself has the empty path.
    return re.sub(r"\W", "_", path) or "linear"


def lower(gm: fx.GraphModule, analysis: GraphAnalysis, layers: dict[str, QuantizedLinear],
          quantize: set[str], kernels: str) -> fx.GraphModule:
    """The rewritten graph (see the module docstring).

    Raises ValueError when a layer's folded transform is not connected the same way in `gm`.
    """
    sites = [s for s in analysis.sites if s.node in quantize]
    check_folds(gm, analysis, {s.path: layers[s.path].details["fold"] for s in sites
                               if layers[s.path].details.get("fold")}, quantize)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    attributes = {n.target: getattr(gm, n.target) for n in gm.graph.nodes
                  if n.op in ("get_attr", "call_module")}

    copies = {old.name: new for old, new in env.items()}
    for site in analysis.sites:
        if site.node not in quantize:
            continue
        linear = copies[site.node]
        layer = layers[site.path]
        prefix = _attr_prefix(site.path)
        x = linear.args[0]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        with graph.inserting_before(linear):
            tensors = []
            for name in TENSOR_ARGS:
                tensor = layer.tensors()[name]
                if tensor is None:
                    tensors.append(bias if name == "bias" else None)
                    continue
                attributes[f"{prefix}_{name}"] = tensor
                attr = graph.get_attr(f"{prefix}_{name}")
                attr.meta["stack_trace"] = linear.meta.get("stack_trace")
                tensors.append(attr)
            call = graph.create_node("call_function", torch.ops.clq.quant_linear.default,
                                     (x, *tensors, *layer.scalars(kernels)), name=prefix)
        call.meta = dict(linear.meta)
        linear.replace_all_uses_with(call)
        graph.erase_node(linear)

    graph.lint()
    lowered = fx.GraphModule(attributes, graph, class_name="ClqQuantizedGraph")
    lowered.recompile()
    return lowered
