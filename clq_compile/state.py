"""State of a clq-compiled model: captured -> calibrating -> quantized.

What each step computes is clq_compile/pipeline.py (capture -> policy -> recipe -> lowering);
this module decides when each runs, and keeps what they made.

One `ModelState` exists per (user module, options). It owns the quantized layers keyed by module
path, so every graph Dynamo captures for that module — a recompile for a new batch size or
resolution, or the pieces around a graph break — reuses them instead of calibrating again. The
user's module is never modified: its parameters keep their values, and the quantized tensors live
in the rewritten graphs.

Dynamo gives a backend the module's parameters, not the module, so states are found through a
registry keyed by parameter identity: a graph finds its state through any of its parameters, and
`calibrating(qt)` / `explain(qt)` through the compiled module's parameters.
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from typing import Iterable

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from clq_compile.artifact import (Artifact, ArtifactError, fingerprint_differences, held, hold,
                                  ordered_decisions, parameter_entry, read_artifact, refuse_other_model)
from clq_compile.passes.capture import GraphAnalysis, LinearSite, module_names
from clq_compile.passes.layer import QuantizedLinear
from clq_compile.passes.observers import GraphCalibration, Offloaded
from clq_compile.passes.policy import Decision

from .checks import (check_recorded_call, not_compiled, skip_empty_call, warn_graph_breaks, warn_uncaptured,
                     warn_unmatched_skip)
from .options import Options
from .pipeline import decide_layers, lower_graph, quantize_layers

log = logging.getLogger("clq_compile")

CAPTURED, CALIBRATING, QUANTIZED = "captured", "calibrating", "quantized"


class CompiledGraph:
    """The callable the backend returns for one captured graph."""

    def __init__(self, state: ModelState, gm: fx.GraphModule, analysis: GraphAnalysis,
                 example_inputs: list):
        self.state = state
        self.gm = gm
        self.analysis = analysis
        self.decisions: dict[str, Decision] = state.decide_sites(analysis.sites)
        self.quantized_sites = frozenset(node for node, d in self.decisions.items() if d.quantize)
        self.calibration = GraphCalibration(gm, analysis, {
            p.index: example_inputs[p.index] for p in analysis.placeholders if p.kind != "input"})
        self.lowered: fx.GraphModule | None = None
        self.run = None
        self.watched: list[str] = []  # parameters whose quantized copies this graph runs
        # Whether the watched parameters' values were compared since the graph was lowered, or since
        # the last calibrating() block (see ModelState.refuse_changed_weights).
        self.contents_checked = False
        # Inductor compiles against example inputs; keep them only when it will be used.
        self.example_inputs = example_inputs if self._wants_inductor(example_inputs) else None

    def _wants_inductor(self, example_inputs: list) -> bool:
        mode = self.state.options.inductor
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        return mode == "always" or (mode == "auto" and on_cuda)

    def weight(self, path: str) -> torch.Tensor:
        site = next(s for s in self.analysis.sites if s.path == path)
        return self.calibration.state[site.weight_index]

    def __call__(self, *args):
        state = self.state
        if state.phase == CALIBRATING:
            if state.calibrates_here():
                self.record(args)
                return self.gm(*args)
            # Another thread: what this graph ran before the block (quantized, or full precision).
            return (self.gm if self.run is None else self.run)(*args)
        if not state.options.quantizes or not self.quantized_sites:
            return self.gm(*args)
        if state.phase == CAPTURED:
            state.quantize(calibrated=False)
        if self.run is None:
            self.lower()
        state.refuse_changed_weights(self.watched, contents=not self.contents_checked)
        self.contents_checked = True
        return self.run(*args)

    def record(self, args: tuple) -> None:
        """Keep this call's non-parameter inputs for calibration (detached copies, in CPU memory
        with option `offload`)."""
        check_recorded_call(self, args)
        if skip_empty_call(self, args):
            return
        call = []
        for i in self.analysis.input_indices:
            value = args[i]
            if isinstance(value, torch.Tensor):
                value = (Offloaded(value.detach().to("cpu", copy=True), value.device)
                         if self.state.options.offload else value.detach().clone())
            call.append(value)
        self.calibration.calls.append(call)

    def lower(self) -> None:
        """Rewrite the graph with the state's quantized layers, quantizing unseen layers data-free."""
        state = self.state
        missing = {self.analysis.site(n).path for n in self.quantized_sites} - set(state.layers)
        if missing:
            layers, _ = quantize_layers({p: self.weight(p) for p in missing}, state.roles(), state.options, None,
                                        note="data-free: not seen during calibration")
            state.layers.update(layers)
        self.lowered, self.run = lower_graph(self.gm, self.analysis, state.layers, self.quantized_sites,
                                             state.options, self.example_inputs)
        self.contents_checked = False
        self.watched = state.watch({f"{site.path}.{kind}": self.calibration.state[index]
                                    for site in map(self.analysis.site, self.quantized_sites)
                                    for kind, index in (("weight", site.weight_index), ("bias", site.bias_index))
                                    if index is not None})
        state.remember_decisions(self)  # the artifact needs them after Dynamo drops this graph
        # Data-free or loaded models meet the graphs after a break only now.
        warn_graph_breaks(state)


class ModelState:
    """Quantization state shared by every graph captured from one module with one set of options.

    artifact: the saved artifact the layers came from (options.load), else None
    fingerprint: {parameter path: shape, dtype, hash} of the model the layers were made from,
        once known (taken before weights are released, read from an artifact when loaded)
    verified: parameter paths already checked against the artifact's fingerprint
    released: parameter paths whose full-precision values were dropped (release_weights)
    withheld: {parameter path: (parameter, its values)} of released weights whose values are kept
        until every layer of the artifact has been checked against the model's policy (`release`)
    checked: paths of the artifact's layers that a captured graph's policy accepted (`decide_sites`)
    calibrating_thread: the thread that entered the last calibrating() block (threading.get_ident)
    watched: {parameter path: (weak reference, version counter, data pointer, content checksum, dtype)} of
        the parameters the quantized layers were made from, as they were then (see `watch`)
    root: the user's module (weakly held) that layer paths are relative to: the first module the
        state was found for — the compiled module, or the frame Dynamo traced first — so that a
        graph traced in a submodule's frame after a graph break still names model-absolute paths
    reports: what the recipe's search explored at the last quantization, by recipe name (adatsq's
        bit allocation; clq_compile.search_report)
    decisions: {layer path: decision} of every linear site of the graphs captured so far, kept
        when Dynamo drops a graph (site_decisions)
    replaced_by: the state a later load() of the same module and options made (`loaded_state`);
        graphs of this one then bind to that one at their next call (backend.BoundGraphs)
    """

    def __init__(self, options: Options, artifact: Artifact | None = None,
                 device: torch.device | None = None):
        self.options = options
        self.phase = CAPTURED
        # Weakly held: Dynamo's cache owns the graphs, and a graph holds the user's parameters,
        # so a strong list would keep the model alive through the registry's values (which are
        # states) for as long as the registry's weak keys (the parameters) live — forever.
        self._graphs: list[weakref.ref[CompiledGraph]] = []
        self.layers: dict[str, QuantizedLinear] = {}
        self.errors: dict[str, float] = {}
        self.reports: dict = {}
        self.decisions: dict[str, dict] = {}
        self.calibrations = 0
        self._warned_data_free = False
        self.artifact = artifact
        self.fingerprint: dict[str, dict] | None = None
        self.verified: set[str] = set()
        self.released: set[str] = set()
        self.withheld: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self.checked: set[str] = set()
        self.calibrating_thread: int | None = None
        self.root: weakref.ref[torch.nn.Module] | None = None
        self.watched: dict[str, tuple[weakref.ref[torch.Tensor], int, int, tuple[int, ...] | None, torch.dtype]] = {}
        self.replaced_by: ModelState | None = None
        if options.load is not None:
            # The manifest the options were parsed against (held), else read now and held.
            self.artifact = artifact or held(options.load) or hold(read_artifact(options.load))
            self.layers = self.artifact.layers(device)
            self.errors = dict(self.artifact.manifest["errors"])
            self.fingerprint = self.artifact.manifest["fingerprint"]
            self.phase = QUANTIZED

    def latest(self) -> ModelState:
        """This state, or the one that replaced it last (see `replaced_by`)."""
        state = self
        while state.replaced_by is not None:
            state = state.replaced_by
        return state

    @property
    def graphs(self) -> list[CompiledGraph]:
        """The live graphs captured for this state, in capture order."""
        return [g for g in (ref() for ref in self._graphs) if g is not None]

    def add_graph(self, graph: CompiledGraph) -> None:
        self._graphs = [ref for ref in self._graphs if ref() is not None] + [weakref.ref(graph)]

    def parameter_names(self) -> dict[int, str]:
        """{id(tensor): model-absolute path} of the root module's parameters and buffers ({} without one)."""
        root = self.root() if self.root is not None else None
        return module_names(root) if root is not None else {}

    def watch(self, params: dict[str, torch.Tensor]) -> list[str]:
        """Remember how `params` ({path: parameter} of quantized layers) are now, unless already
        remembered since the last quantization (or load); returns their paths.

        In-place writes (`p.mul_`, `p.copy_`, `load_state_dict`) bump a tensor's version counter
        and `p.data = ...` moves its data pointer: both are cheap to compare on every call. A
        write through `p.data` in place (`p.data.mul_(2)`) bumps neither; the content checksum
        sees it, compared where trust matters (`refuse_changed_weights(contents=True)`).
        """
        for path, p in params.items():
            if path not in self.watched:
                checksum = None if path in self.released or p.is_meta else content_checksum(p)
                self.watched[path] = (weakref.ref(p), p._version, p.data_ptr(), checksum, p.dtype)
        return list(params)

    def refuse_changed_weights(self, paths: Iterable[str] | None = None, contents: bool = True) -> None:
        """Raise RuntimeError when parameters a quantized layer was made from (all watched ones, or
        `paths`) changed since: the layer would run the old values while the rest reads the new.

        contents=False compares version counters and data pointers only (every call); True also
        the values' checksums (save, explain, and a graph's first call after it was lowered or
        after a calibrating() block): two reads of the weights.
        """
        changed, casts = [], set()
        for path in self.watched if paths is None else paths:
            if path not in self.watched or path in self.released:
                continue  # quantized again since (the graph lowers afresh), or dropped on purpose
            ref, version, pointer, checksum, dtype = self.watched[path]
            p = ref()
            if p is not None and ((p._version, p.data_ptr()) != (version, pointer) or (
                    contents and checksum is not None and content_checksum(p) != checksum)):
                changed.append(path)
                if p.dtype != dtype:
                    casts.add((dtype, p.dtype))
        if changed:
            listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            if self.artifact is not None:
                todo = (f"Load {self.options.load} into the unchanged model, or quantize the changed one "
                        f"afresh (torch.compile it without options['load'])")
            elif self.released:
                todo = ("release_weights() dropped the full-precision weights, so this model cannot be calibrated "
                        "again: torch.compile a freshly loaded model, or load() a saved artifact")
            else:
                todo = ("Calibrate again (with clq_compile.calibrating(qt)) to quantize from the new weights, "
                        "or torch.compile the changed model afresh")
            if casts:
                pairs = sorted((str(a).removeprefix("torch."), str(b).removeprefix("torch.")) for a, b in casts)
                what = ", ".join(f"{a} to {b}" for a, b in pairs)
                made = "/".join(dict.fromkeys(a for a, _ in pairs))
                raise RuntimeError(
                    f"the model was cast ({what}: model.to(dtype), .half(), .bfloat16()) after quantization, "
                    f"which made new tensors of {len(changed)} parameter(s) of quantized layers ({listed}); the "
                    f"quantized layers were made from the {made} weights. Cast the model before torch.compile, "
                    f"or else {todo[0].lower()}{todo[1:]}.")
            raise RuntimeError(
                f"{len(changed)} parameter(s) of quantized layers changed in place after quantization "
                f"({listed}); the quantized layers still hold the old values. {todo}.")

    def decide_sites(self, sites: Iterable[LinearSite]) -> dict[str, Decision]:
        """{node: decision} of a captured graph's linear sites (see `decide`).

        A loaded artifact is trusted layer by layer as graphs are captured: a layer the model's
        policy keeps refuses the artifact, and then every weight withheld by `release` is given
        back first, so a refused artifact leaves the user's model as it was.
        """
        sites = list(sites)
        try:
            decisions = decide_layers(sites, self.options, self.artifact, self.layers)
        except ArtifactError:
            for name, (weight, values) in self.withheld.items():
                weight.data = values
                self.released.discard(name)
            self.withheld.clear()
            raise
        self.checked.update(s.path for s in sites if s.path in self.layers)
        if self._trusted():
            self.withheld.clear()
        return decisions

    def _trusted(self) -> bool:
        """Whether every quantized layer is known to be one the model's policy quantizes: made by
        the policy, or loaded and accepted by a captured graph's policy."""
        return self.artifact is None or self.checked >= set(self.layers)

    def release(self, module: torch.nn.Module) -> int:
        """Drop the full-precision weights of the quantized layers of `module` (the root the layer
        paths are relative to); returns how many were dropped now.

        Each weight stays the same Parameter object (graphs and states find it by identity), with
        its shape, dtype and device; its values become one NaN, so running the original module
        shows it at once. A loaded layer not yet accepted by a captured graph's policy keeps its
        values aside (`withheld`) until it is: until the first call, for one graph.
        """
        released = 0
        for layer_path in sorted(self.layers):
            name = f"{layer_path}.weight"
            if name in self.released:
                continue
            weight = module.get_submodule(layer_path).weight
            values = weight.data
            weight.data = torch.full((1,), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)
            self.released.add(name)
            if not self._trusted():
                self.withheld[name] = (weight, values)
            released += 1
        return released

    def site_decisions(self) -> dict[str, dict]:
        """{layer path: role, out_features, in_features, quantize, reason} of every linear layer
        the state knows: those of its captured graphs (also of graphs Dynamo has since dropped,
        e.g. by torch._dynamo.reset(): kept in `decisions`), and the artifact's when loaded."""
        # Graph order first; a loaded layer keeps the decision it was saved with.
        for graph in self.graphs:
            self.remember_decisions(graph)
        known = dict(self.decisions)
        for path, d in (ordered_decisions(self.artifact.manifest) if self.artifact is not None else {}).items():
            known.setdefault(path, d)
        return known

    def remember_decisions(self, graph: CompiledGraph) -> None:
        """Keep the decision of every linear site of `graph` in `decisions` (first seen wins)."""
        saved = self.artifact.manifest["decisions"] if self.artifact is not None else {}
        for site in graph.analysis.sites:
            decision = graph.decisions[site.node]
            self.decisions.setdefault(site.path, saved.get(site.path) or {
                "role": site.role, "out_features": site.out_features, "in_features": site.in_features,
                "quantize": decision.quantize, "reason": decision.reason})

    def check_parameters(self, params: dict[str, torch.Tensor], path: str, complete: bool = False) -> None:
        """Refuse parameters that differ from the artifact's model (loaded states only).

        params: {path: parameter} of one graph, or of the whole model with complete=True (then
        parameters of the artifact's model missing here are refused too). Values are hashed once.
        """
        if self.artifact is None:
            return
        found = {name: parameter_entry(p, with_hash=name not in self.released and name not in self.verified)
                 for name, p in params.items() if complete or name not in self.verified}
        refuse_other_model(path, fingerprint_differences(self.fingerprint, found, complete=complete))
        self.verified.update(found)

    def begin_calibration(self) -> None:
        if self.artifact is not None:
            raise RuntimeError(
                f"this model was loaded from {self.options.load} and is already quantized: there is "
                f"nothing to calibrate. To quantize again, compile it without options['load'].")
        if self.released:
            raise RuntimeError(
                "release_weights() dropped this model's full-precision weights, so it cannot be "
                "calibrated again; calibrate a freshly loaded copy of the model instead.")
        self._claim_calibration()
        for g in self.graphs:
            g.calibration.calls.clear()
            g.contents_checked = False  # a block that ends without quantizing keeps the old layers

    def _claim_calibration(self) -> None:
        """Enter the calibrating phase for the current thread, refusing a second session."""
        with _SESSIONS:
            if self.phase == CALIBRATING:
                where = ("in this thread: nested blocks are not supported. The outer block is still "
                         "recording; run the calibration calls there"
                         if self.calibrating_thread == threading.get_ident() else
                         "in another thread: calibration belongs to the thread that entered "
                         "calibrating(); wait for that block to end")
                raise RuntimeError(f"calibrating() is already active for this model {where}.")
            self.phase, self.calibrating_thread = CALIBRATING, threading.get_ident()

    def calibrates_here(self) -> bool:
        """Whether a call from the current thread is a calibration call: the state is calibrating
        and this thread entered calibrating(). Other threads keep running the previous state."""
        return self.phase == CALIBRATING and self.calibrating_thread == threading.get_ident()

    def abort_calibration(self) -> None:
        for g in self.graphs:
            g.calibration.calls.clear()
        self.phase = QUANTIZED if self.layers else CAPTURED

    def finish_calibration(self) -> None:
        """Run the recipe on what was recorded; the graphs run quantized from their next call."""
        calls = sum(len(g.calibration.calls) for g in self.graphs)
        if calls == 0:
            self.abort_calibration()
            reason = not_compiled(self)
            if reason is not None:
                raise RuntimeError(f"calibrating() recorded no calls: {reason} The model stays as it was.")
            raise RuntimeError(
                "calibrating() recorded no calls: run the compiled model on calibration inputs "
                "inside the `with clq_compile.calibrating(qt):` block. The model stays as it was.")
        try:
            self.quantize(calibrated=True)
        finally:
            for g in self.graphs:
                g.calibration.calls.clear()

    def quantize(self, calibrated: bool) -> None:
        """Quantize every selected layer of every graph with the recipe, then lower the graphs."""
        weights: dict[str, torch.Tensor] = {}
        for g in self.graphs:
            for node in g.quantized_sites:
                path = g.analysis.site(node).path
                weights.setdefault(path, g.weight(path))
        calibration = [g.calibration for g in self.graphs if g.calibration.calls] if calibrated else None
        reports: dict = {}
        layers, errors = quantize_layers(weights, self.roles(), self.options, calibration, reports=reports)
        if not calibrated and not self._warned_data_free:
            self._warned_data_free = True
            warnings.warn(
                "clq: quantizing without calibration data (weights round-to-nearest, activations "
                "dynamic). Run a few inputs inside `with clq_compile.calibrating(qt):` first for "
                "better quality.", stacklevel=3)
        self.layers, self.errors, self.watched, self.reports = layers, errors, {}, reports
        if self.artifact is None:
            self.fingerprint = None  # taken again from the weights quantized now, when saved
        if calibration:
            self.calibrations += 1
        self.phase = QUANTIZED
        for g in self.graphs:
            g.lower()
        log.info("quantized %d layers with recipe %r%s", len(self.layers), self.options.recipe,
                 " on calibration data" if calibrated else " data-free")
        warn_graph_breaks(self)
        warn_unmatched_skip(self)
        if calibrated:  # data-free, the first call quantizes before later graphs are captured
            warn_uncaptured(self)

    def roles(self) -> dict[str, str]:
        """{module path: role} of the linear sites of every captured graph."""
        return {site.path: site.role for g in self.graphs for site in g.analysis.sites}


_AS_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def content_checksum(t: torch.Tensor) -> tuple[int, int, int]:
    """Three sums of the bit patterns b of `t`'s values (integers of its element size), laid out as
    a matrix [rows, columns] (its first dimension by the rest): Σ b, Σ_i i·(row sum)_i and
    Σ_j j·(column sum)_j (i, j from 1), in int64 arithmetic (mod 2^64).

    Integer sums are exact in any order, so an unchanged tensor always gives the same checksum.
    Changing one value changes Σ b; swapping two rows (columns) of different sums changes a
    moment. A change escapes all three only if its bit differences sum to zero and balance both
    moments: a guard against mistakes (a scaling, a copy from another tensor, added noise), not
    against a forger. Reads `t` twice, on its device; the three numbers come back in one transfer.
    """
    bits = t.detach().view(_AS_INTEGERS[t.element_size()])
    matrix = bits.reshape(bits.shape[0] if bits.dim() and bits.numel() else 1, -1)
    rows, cols = matrix.sum(dim=1, dtype=torch.int64), matrix.sum(dim=0, dtype=torch.int64)
    moments = [(v * torch.arange(1, v.numel() + 1, device=v.device)).sum() for v in (rows, cols)]
    return tuple(torch.stack([rows.sum(), *moments]).tolist())


# Makes checking for a running calibration and starting one a single step across threads.
_SESSIONS = threading.Lock()

# parameter -> {options: state}
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _states_of(params: Iterable[torch.Tensor], options: Options) -> list[ModelState]:
    found: list[ModelState] = []
    for p in params:
        state = _REGISTRY.get(p, {}).get(options)
        if state is not None and all(state is not s for s in found):
            found.append(state)
    return found


def _register(state: ModelState, params: Iterable[torch.Tensor]) -> None:
    for p in params:
        _REGISTRY.setdefault(p, {})[state.options] = state


def _device(params: list[torch.Tensor]) -> torch.device | None:
    return params[0].device if params else None


def registered_state(params: Iterable[torch.Tensor], options: Options) -> ModelState | None:
    """The state these parameters were registered to under `options` (the latest, where load()
    replaced one), or None."""
    found = _states_of(params, options)
    return found[0].latest() if found else None


def state_for_graph(params: list[torch.Tensor], options: Options) -> ModelState:
    """The state a newly captured graph with these parameters belongs to (created if new)."""
    found = _states_of(params, options)
    state = found[0] if found else ModelState(options, device=_device(params))
    _register(state, params)
    return state


def loaded_state(module: torch.nn.Module, options: Options, artifact: Artifact) -> ModelState:
    """A new state of `module` for `artifact` (read for options.load), replacing any earlier state
    of `module` under `options`: loading again — the file saved anew, or fixed after a refusal —
    runs what was read now. Dynamo may reuse the graphs it compiled for the earlier state (an equal
    backend): they bind to the new state at their next call."""
    params = list(module.parameters())
    state = ModelState(options, artifact, _device(params))
    state.root = weakref.ref(module)
    for earlier in _states_of(params, options):
        earlier.replaced_by = state
    _register(state, params)
    return state


def state_for_module(module: torch.nn.Module, options: Options) -> ModelState:
    """The one state of `module` under `options`, merging the states of separately captured graphs."""
    params = list(module.parameters())
    found = _states_of(params, options)
    state = found[0] if found else ModelState(options, device=_device(params))
    for other in found[1:]:
        for g in other.graphs:
            g.state = state
            state.add_graph(g)
        state.layers.update(other.layers)
        state.errors.update(other.errors)
        if other.phase == QUANTIZED:
            state.phase = QUANTIZED
    if state.root is None or state.root() is None:
        state.root = weakref.ref(module)
    _register(state, params)
    return state
