"""The `clq` torch.compile backend: `torch.compile(model, backend="clq", options={...})`.

Dynamo calls `clq_backend(gm, example_inputs, options=...)` once per captured graph (again after
a recompile). The backend validates the options, captures the graph's linear layers and returns a
`CompiledGraph`, which runs the graph in full precision while calibrating and the rewritten,
quantized graph afterwards.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from torch import fx

from clq_compile.passes.capture import capture

from .checks import refuse_mode
from .options import Options, parse_options
from .state import CompiledGraph, state_for_graph, state_for_module

log = logging.getLogger("clq_compile")


def clq_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None,
                mode: str | None = None):
    """Dynamo backend entry point (registered as "clq" through the torch_dynamo_backends entry point).

    mode: torch.compile's `mode=`, which it passes to a backend when set; refused (see refuse_mode).
    """
    refuse_mode(mode)
    opts = parse_options(options)
    analysis = capture(gm, example_inputs)
    if not analysis.sites:
        warnings.warn(
            "clq: this graph has no linear layers with parameter weights; it runs unquantized.",
            stacklevel=2)
        return gm.forward
    params = {p.path: example_inputs[p.index] for p in analysis.placeholders if p.kind == "parameter"}
    module = traced_module(gm)
    state = state_for_module(module, opts) if module is not None else state_for_graph(list(params.values()), opts)
    if opts.load is not None:
        whole = module is not None
        state.check_parameters(dict(module.named_parameters()) if whole else params, opts.load, complete=whole)
    graph = CompiledGraph(state, gm, analysis, example_inputs)
    state.graphs.append(graph)
    log.debug("captured graph %d of this model: %d linear layers", len(state.graphs),
              len(analysis.sites))
    return graph


def traced_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The module whose parameters `gm` lifted, or None when it cannot be found.

    Dynamo hands a backend the parameters, not the module. Knowing the module lets the graphs on
    both sides of a graph break share one state from their first call (otherwise they meet only
    when calibrating() or explain() looks the module up). The module is the traced frame's local
    that the parameters' sources start from; reading it uses Dynamo internals, so any surprise
    falls back to graph-by-graph states.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        local = next(m.group(1) for node in gm.graph.nodes if node.op == "placeholder"
                     for grapharg in [node.meta.get("grapharg")]
                     if grapharg is not None and grapharg.source is not None
                     for m in [re.match(r"L\['([^']*)'\]\S*_parameters", grapharg.source.name)] if m)
        value = InstructionTranslator.current_tx().output.root_tx.f_locals.get(local)
    except Exception:  # noqa: BLE001  (internals moved, or no parameter sources: use the fallback)
        return None
    return value if isinstance(value, torch.nn.Module) else None


def compiled_options(qt: Any) -> Options:
    """The options `qt` was compiled with, if `qt` is a module compiled with backend="clq".

    Raises TypeError for anything else, saying what to pass.
    """
    if not isinstance(qt, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            f"expected the module returned by torch.compile(model, backend='clq', ...); got "
            f"{type(qt).__name__}. Pass the compiled module, not the original one.")
    wrapper = qt.dynamo_ctx.callback
    seen = 0
    while wrapper is not None and seen < 16:
        if getattr(wrapper, "compiler_fn", None) is clq_backend or wrapper is clq_backend:
            return parse_options(getattr(wrapper, "kwargs", {}).get("options"))
        wrapper = getattr(wrapper, "_torchdynamo_orig_backend", None)
        seen += 1
    raise TypeError("this module was compiled with a backend other than 'clq'; compile it with "
                    "torch.compile(model, backend='clq', options={...})")
