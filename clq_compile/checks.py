"""Checks on what the user hands the compiler, with errors and warnings that say what to do.

- A calibration call whose inputs hold NaN or Inf is refused when it is recorded, naming the
  call, the input and the first linear layer the bad values reach.
- A layer selected for quantization whose weight holds NaN or Inf is refused before any recipe
  runs, naming the layer and how many values are bad.
- A model Dynamo captured as several graphs (graph breaks) is quantized graph by graph; one
  warning lists the graphs and the layers each holds.
- Parameters on the `meta` device (shapes without values) are refused where values are first
  needed: a calibration call, or quantizing data-free at the first call.
- A calibration call with an empty input (a batch of 0) holds no data: it runs, as in eager
  mode, and is left out of the recordings with a warning.
- torch.compile's `mode=` is refused with what to do instead.
- Linear layers of the model that no compiled graph holds (Dynamo ran them eagerly after a graph
  break inside a loop, or the calls never used them) stay in full precision: one warning names
  them when calibration ends, and `explain` lists them.
- A model where no layer is selected for quantization (no linear layers, or `skip` covering
  them all) is told so, with the reasons, instead of being asked to calibrate.

The other half of the non-finite checks, layer inputs that become NaN or Inf inside the
full-precision model (float16 overflow), is in passes/observers.py, where the statistics are read.
"""

from __future__ import annotations

import warnings
from collections import Counter
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

from clq_compile.passes.observers import GraphCalibration, NonFiniteActivation, observe

if TYPE_CHECKING:
    from .state import CompiledGraph, ModelState


def _counts(t: torch.Tensor) -> str:
    return f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf of {t.numel()} values"


def _non_finite(value) -> bool:
    return (isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all()))


def _first_non_finite_layer(graph: CompiledGraph, args: tuple) -> str | None:
    """Module path of the first linear layer, in graph order, whose input holds NaN or Inf."""
    call = [args[i] for i in graph.analysis.input_indices]
    one_call = GraphCalibration(graph.gm, graph.analysis, graph.calibration.state, [call])
    try:
        observe([one_call], {s.path for s in graph.analysis.sites}, lambda *_: None)
    except NonFiniteActivation as found:
        return found.path
    return None


def _on_meta(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_meta]


def _load_real_weights(names: list[str]) -> str:
    listed = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    return (f"are on the 'meta' device ({listed}): they have shapes but no values, so there is "
            f"nothing to calibrate or quantize. Load the real weights first (model.to_empty(device=...) "
            f"then load_state_dict, or from_pretrained without device_map='meta'), then compile")


def check_recorded_call(graph: CompiledGraph, args: tuple) -> None:
    """Raise ValueError when a call about to be recorded for calibration has a NaN or Inf input,
    or when the graph's parameters are on the meta device (they hold no values).

    The message names the call (counting from 0, among the calls recorded for this graph in the
    current `calibrating()` block), each bad input by its argument name with its counts, and the
    first linear layer whose input is not finite.
    """
    meta = _on_meta({p.source: args[p.index] for p in graph.analysis.placeholders if p.kind != "input"})
    if meta:
        raise ValueError(f"the parameters of this model {_load_real_weights(meta)}.")
    bad = [p for p in graph.analysis.placeholders if p.kind == "input" and _non_finite(args[p.index])]
    if not bad:
        return
    inputs = "; ".join(f"{p.source!r} ({_counts(args[p.index])})" for p in bad)
    layer = _first_non_finite_layer(graph, args)
    reaches = (f"; the first linear layer whose input is not finite is {layer}" if layer
               else "; no linear layer's input is affected")
    graphs = graph.state.graphs
    which = f" of graph {graphs.index(graph) + 1} of {len(graphs)}" if len(graphs) > 1 else ""
    raise ValueError(
        f"calibration call {len(graph.calibration.calls)} (counting from 0){which} has non-finite "
        f"input {inputs}{reaches}. Calibrate on finite inputs; calibration is aborted and the model "
        f"stays in full precision.")


def skip_empty_call(graph: CompiledGraph, args: tuple) -> bool:
    """Whether a call about to be recorded is empty (an input with no elements, e.g. a batch of 0);
    warns, naming the call and the input, when it is. Such a call holds no calibration data."""
    empty = [p for p in graph.analysis.placeholders
             if p.kind == "input" and isinstance(args[p.index], torch.Tensor) and args[p.index].numel() == 0]
    if not empty:
        return False
    shapes = ", ".join(f"{p.source!r} has shape {list(args[p.index].shape)}" for p in empty)
    warnings.warn(
        f"clq: calibration call {len(graph.calibration.calls)} (counting from 0) is empty: input {shapes}. "
        f"It holds no data and is not recorded; calibrate on calls with at least one sample.", stacklevel=4)
    return True


def check_weights(weights: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming every layer in `weights` ({module path: weight}) with NaN or Inf,
    or on the meta device (no values)."""
    meta = sorted(_on_meta(weights))
    if meta:
        raise ValueError(
            f"the weights of {len(meta)} layer(s) selected for quantization {_load_real_weights(meta)}.")
    bad = {path: w for path, w in weights.items() if not bool(torch.isfinite(w).all())}
    if not bad:
        return
    listed = "; ".join(f"{path}: {_counts(w)}" for path, w in bad.items())
    raise ValueError(
        f"non-finite weights in {len(bad)} layer(s) selected for quantization ({listed}). Fix the "
        f"checkpoint, or keep these layers in full precision with options={{'skip': {sorted(bad)!r}}}.")


def refuse_mode(mode: str | None) -> None:
    """Raise ValueError for torch.compile(..., backend="clq", mode=...) (torch drops "default").

    torch.compile cannot combine `mode=` with `options=`, so a mode would leave every clq setting at
    its default; and the modes name Inductor's settings, which clq already applies where it hands
    the graph to Inductor (options["inductor"]).
    """
    if mode is not None:
        raise ValueError(
            f"backend 'clq' takes no mode= (got {mode!r}): its settings go in options={{...}}, and "
            f"torch.compile cannot combine mode= with options=. Remove mode=; the parts of the graph "
            f"that clq does not quantize run on Inductor on CUDA already (options['inductor']).")


def nothing_selected(state: ModelState, module: torch.nn.Module) -> str | None:
    """Why no linear layer of `module` is selected for quantization under `state`; None when some
    layer is, or when `module` has nn.Linear layers but no graph has been captured yet."""
    decisions = state.site_decisions()
    if any(d["quantize"] for d in decisions.values()):
        return None
    if decisions:
        reasons = Counter(d["reason"] for d in decisions.values())
        kept = "; ".join(f"{n} kept: {reason}" for reason, n in reasons.most_common())
        return f"none of this model's {len(decisions)} linear layers is selected for quantization ({kept})"
    if any(isinstance(m, torch.nn.Linear) for m in module.modules()):
        return None
    return ("this model has no linear layers (nn.Linear or F.linear with a parameter weight), so clq "
            "has nothing to quantize")


# States whose graph breaks were already reported.
_WARNED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def warn_graph_breaks(state: ModelState) -> None:
    """Warn once per state when its layers come from several graphs (Dynamo graph breaks).

    Graphs holding the same layers (recompiles for a new batch size or resolution) count once.
    """
    pieces: list[list[str]] = []
    for graph in state.graphs:
        paths = [s.path for s in graph.analysis.sites]
        if paths not in pieces:
            pieces.append(paths)
    if len(pieces) < 2 or state in _WARNED:
        return
    _WARNED[state] = True
    listed = "; ".join(f"graph {i + 1}: {len(p)} linear layers, {p[0]} .. {p[-1]}"
                       for i, p in enumerate(pieces))
    warnings.warn(
        f"clq: the model was captured as {len(pieces)} graphs (Dynamo graph breaks) and each is "
        f"quantized on its own ({listed}). Layers in different graphs are calibrated separately; "
        f"torch._dynamo.explain(model)(*inputs) shows where the graph breaks.", stacklevel=3)


def uncaptured_linears(state: ModelState) -> dict[str, torch.nn.Linear]:
    """{path: module} of the model's linear layers that none of `state`'s graphs holds, once one
    graph is captured (empty before, or when the model is gone)."""
    root = state.root() if state.root is not None else None
    if root is None or not state.graphs:
        return {}
    captured = state.roles()
    return {path: m for path, m in root.named_modules() if isinstance(m, torch.nn.Linear) and path not in captured}


# States already warned about their uncaptured layers.
_UNCAPTURED_WARNED: WeakIdKeyDictionary = WeakIdKeyDictionary()
UNCAPTURED_SHOWN = 3


def warn_uncaptured(state: ModelState) -> None:
    """Warn once per state when some linear layers ran outside every compiled graph."""
    paths = list(uncaptured_linears(state))
    if not paths or state in _UNCAPTURED_WARNED:
        return
    _UNCAPTURED_WARNED[state] = True
    more = f" and {len(paths) - UNCAPTURED_SHOWN} more" if len(paths) > UNCAPTURED_SHOWN else ""
    warnings.warn(
        f"clq: {len(paths)} linear layers are in no compiled graph and stay in full precision "
        f"({', '.join(paths[:UNCAPTURED_SHOWN])}{more}): Dynamo ran them eagerly (a graph break inside a "
        f"loop runs the rest of that frame uncompiled), or the calls never used them. explain(qt) lists "
        f"them; torch._dynamo.explain(model)(*inputs) shows where the graph breaks.", stacklevel=3)


# States whose skip patterns were already checked.
_SKIP_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def warn_unmatched_skip(state: ModelState) -> None:
    """Warn once per state for each `skip` pattern that matches none of its linear layers: a
    pattern without wildcards ('attn2' for '*.attn2.*') keeps nothing, silently otherwise."""
    if not state.options.skip or state in _SKIP_CHECKED:
        return
    _SKIP_CHECKED[state] = True
    paths = set(state.roles())
    unmatched = [p for p in state.options.skip if not any(fnmatchcase(path, p) for path in paths)]
    if unmatched:
        example = next(iter(sorted(paths)), "transformer_blocks.0.attn2.to_q")
        warnings.warn(
            f"clq: skip pattern{'s' if len(unmatched) > 1 else ''} {', '.join(repr(p) for p in unmatched)} "
            f"matched none of the {len(paths)} linear layers captured so far, so they keep nothing in 16 bit. "
            f"Patterns are matched against whole module paths (fnmatch, e.g. {example!r}): "
            f"write '*.attn2.*' rather than 'attn2'.", stacklevel=3)


def not_compiled(state: ModelState) -> str | None:
    """Why no graph of the state's model has reached the backend, when Dynamo holds its limit of
    compiled versions of the model's forward (it then runs the model eagerly, in full precision);
    else None (graphs were captured, or nothing says why not)."""
    module = state.root() if state.root is not None else None
    if state.graphs or module is None:
        return None
    try:
        # recompile_limit since torch 2.7; cache_size_limit before.
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        versions = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(type(module).forward.__code__))
    except Exception:  # noqa: BLE001  (Dynamo internals moved: claim nothing)
        return None
    if versions < limit:
        return None
    return (f"Dynamo holds {versions} compiled versions of {type(module).__name__}.forward, its limit "
            f"(torch._dynamo.config.recompile_limit = {limit}; a model of this class compiled with other options, "
            f"or called with other shapes, adds one), so it runs this model eagerly, in full precision, without "
            f"the clq backend. Raise the limit, or call torch._dynamo.reset() before compiling more models.")
