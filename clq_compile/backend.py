"""The `clq` torch.compile backend: `torch.compile(model, backend="clq", options={...})`.

Dynamo calls `clq_backend(gm, example_inputs, options=...)` once per captured graph (again after
a recompile). The backend validates the options, captures the graph's linear layers and returns a
`CompiledGraph`, which runs the graph in full precision while calibrating and the rewritten,
quantized graph afterwards.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from clq_compile.passes.capture import GraphAnalysis, rebind
from clq_compile.passes.structure import GraphContext

from .checks import refuse_mode
from .options import Options, parse_options
from .pipeline import capture_graph
from .state import CompiledGraph, ModelState, registered_state, state_for_graph, state_for_module

log = logging.getLogger("clq_compile")


def clq_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None,
                mode: str | None = None):
    """Dynamo backend entry point (registered as "clq" through the torch_dynamo_backends entry point).

    mode: torch.compile's `mode=`, which it passes to a backend when set; refused (see refuse_mode).
    """
    refuse_mode(mode)
    opts = parse_options(options)
    root, call_inputs, batch = compiled_call()
    frame_module = traced_module(gm)
    module = root or frame_module
    state = (state_for_module(module, opts) if module is not None else
             state_for_graph([t for t in example_inputs if isinstance(t, torch.nn.Parameter)], opts))
    reason = getattr(gm, "compile_subgraph_reason", None)
    returns = (frame_module is not None and frame_module is (state.root() if state.root else None)
               and reason is not None and not reason.graph_break)
    analysis = capture_graph(gm, example_inputs, state.parameter_names(), GraphContext(call_inputs, returns, batch))
    if not analysis.sites:
        warnings.warn(
            "clq: this graph has no linear layers with parameter weights; it runs unquantized.",
            stacklevel=2)
        return gm.forward
    if opts.load is not None and module is not None and state.root is not None and state.root() is module:
        state.check_parameters(dict(module.named_parameters()), opts.load, complete=True)
    return BoundGraphs(new_graph(state, gm, analysis, example_inputs))


def new_graph(state: ModelState, gm: fx.GraphModule, analysis: GraphAnalysis, tensors: list) -> CompiledGraph:
    """A CompiledGraph of `state` for `gm` bound to `tensors`, its parameters checked against a
    loaded artifact (only those of this graph: a graph may hold part of the model)."""
    if state.options.load is not None:
        state.check_parameters({p.path: tensors[p.index] for p in analysis.placeholders
                                if p.kind == "parameter"}, state.options.load)
    graph = CompiledGraph(state, gm, analysis, tensors)
    state.add_graph(graph)
    log.debug("captured graph %d of this model: %d linear layers", len(state.graphs),
              len(analysis.sites))
    return graph


class BoundGraphs:
    """The callable the backend returns: one CompiledGraph per set of parameters `gm` is called with.

    Dynamo lifts parameters to graph inputs and guards on their shapes, not their identity, so a
    graph traced in a block's frame (after a graph break inside the block) serves every block of
    the same shape, and a graph traced for one model serves every other model of the same class
    and shapes compiled with the same options. Each set of parameters is its own set of layers,
    with its own paths and quantized weights, in the state of the model it belongs to; the first
    call with a new set binds it (`rebind`). A graph whose state a later load() replaced binds
    again, to the new state, at its next call.
    """

    def __init__(self, graph: CompiledGraph):
        self.indices = [p.index for p in graph.analysis.placeholders if p.kind != "input"]
        self.first = graph
        self.bound = {self._key(graph.calibration.state): graph}

    def _key(self, tensors) -> tuple[int, ...]:
        return tuple(id(tensors[i]) for i in self.indices)

    def __call__(self, *args):
        graph = self.bound.get(self._key(args))
        if graph is None or graph.state.replaced_by is not None:
            first = self.first
            state = self._state_of(args)
            graph = new_graph(state, first.gm,
                              rebind(first.gm, first.analysis, list(args), state.parameter_names()),
                              list(args))
            self.bound[self._key(args)] = graph
        return graph(*args)

    def _state_of(self, args) -> ModelState:
        """The state of the model whose parameters `args` holds: the one they are registered to
        (the first graph's model, another block of it, a model calibrating() or explain() has
        looked up), else that of the compiled module being called, else the first graph's."""
        options = self.first.state.options
        state = registered_state([args[i] for i in self.indices], options)
        if state is not None:
            return state
        root, _, _ = compiled_call()
        return state_for_module(root, options) if root is not None else self.first.state.latest()


def compiled_call() -> tuple[torch.nn.Module | None, frozenset[int], int | None]:
    """The user's module behind the `torch.compile` call being traced, the ids of the tensors it
    was called with and the call's batch size (their smallest leading dimension); (None, empty,
    None) when not found.

    After a graph break inside a submodule Dynamo traces that submodule's frame on its own, so the
    traced frame's `self` is not the model. The compiled module (`OptimizedModule`) is still on
    the Python stack below the frame being traced: its `_orig_mod` is the model the paths are
    relative to, and its call's arguments tell the model's inputs from intermediate values.
    """
    frame = sys._getframe(1)
    while frame is not None:
        value = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(value, torch._dynamo.eval_frame.OptimizedModule):
            leaves = [t for t in pytree.tree_leaves((frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {})))
                      if isinstance(t, torch.Tensor)]
            batch = min((t.shape[0] for t in leaves if t.dim() >= 1), default=None)
            return value._orig_mod, frozenset(id(t) for t in leaves), batch
        frame = frame.f_back
    return None, frozenset(), None


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
        if isinstance(qt, torch.nn.Module) and getattr(qt, "_compiled_call_impl", None) is not None:
            raise TypeError(
                f"this {type(qt).__name__} was compiled in place (model.compile(backend='clq')), which leaves no "
                f"module to calibrate, explain or save: compile it with qt = torch.compile(model, backend='clq', "
                f"options=...) and pass qt")
        if callable(qt) and not isinstance(qt, torch.nn.Module):
            raise TypeError(
                f"expected the module returned by torch.compile(model, backend='clq', ...); got "
                f"{type(qt).__name__} (torch.compile(model.forward) gives a function, which calibrating, explain "
                f"and save cannot work with: compile the module itself, qt = torch.compile(model, backend='clq'))")
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
