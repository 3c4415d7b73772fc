"""The pipeline, top to bottom: capture -> policy -> recipe -> lowering.

One function per stage; the front end (backend.py, state.py) decides *when* each runs, this module
says *what* runs, in order. Data flows one way:

    torch.compile(model, backend="clq")  Dynamo hands over an FX graph and its example inputs
    1. capture_graph   -> GraphAnalysis       linear sites: module path, role, block, dataflow
    2. decide_layers   -> {node: Decision}    which sites are quantized, in which format, and why
       calibrating(qt) -> GraphCalibration    the recorded calls (full precision; optional)
    3. quantize_layers -> {path: QuantizedLinear}, {path: relative error}
                                              the recipe's frozen records, and each one's error
    4. lower_graph     -> the callable        clq::quant_linear nodes; Inductor where it applies

Layers are keyed by module path, not graph node, so every graph Dynamo captures for one model (a
recompile, the pieces around a graph break) shares stage 3's records. Stage 2 runs again for every
graph; stage 3 runs once per calibration (or data-free at the first quantized call); stage 4 once
per graph after each stage 3. A loaded artifact replaces stage 3: its records are checked at
stage 2 against what the policy would decide for the same site.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
from torch import fx

from clq_compile.passes.capture import GraphAnalysis, LinearSite, capture
from clq_compile.passes.layer import QuantizedLinear
from clq_compile.passes.lowering import lower
from clq_compile.passes.mean_correction import correct_means
from clq_compile.passes.observers import GraphCalibration, layer_errors
from clq_compile.passes.policy import Decision, decide
from clq_compile.passes.recipes import run_recipe
from clq_compile.passes.structure import GraphContext
from clq_compile.passes.timesteps import per_bucket
from clq_compile.passes.weight_quantization import rtn

from .artifact import Artifact, loaded_decision
from .checks import check_weights
from .options import Options


def capture_graph(gm: fx.GraphModule, example_inputs: list, names: dict[int, str],
                  context: GraphContext) -> GraphAnalysis:
    """1. Capture: every `F.linear` of `gm` with a parameter weight, as a site with its
    model-absolute path (`names`: {id(tensor): path} of the user's module), its role from the
    graph's structure (`context`: the user's inputs, whether the graph returns the model's output),
    its block, and its place in the linear-to-linear dataflow (passes/capture.py)."""
    return capture(gm, example_inputs, names, context)


def decide_layers(sites: Iterable[LinearSite], options: Options,
                  artifact: Artifact | None = None,
                  loaded: dict[str, QuantizedLinear] | None = None) -> dict[str, Decision]:
    """2. Policy: {node: decision} of `sites` under `options` (passes/policy.py).

    With a loaded `artifact`, a site whose layer it holds (`loaded`, by path) keeps the artifact's
    layer only where the policy quantizes that site in the same formats (else ArtifactError); a
    site it does not hold stays in 16 bit with the artifact's recorded reason.
    """
    policy = options.policy()
    decisions = {}
    for site in sites:
        if artifact is None:
            decisions[site.node] = decide(site, policy)
        elif site.path in loaded:
            decisions[site.node] = loaded_decision(site.path, decide(site, policy), options.load,
                                                   loaded[site.path], policy.layer_quantizers(site.role))
        else:
            saved = artifact.manifest["decisions"].get(site.path)
            decisions[site.node] = Decision(False, saved["reason"] if saved else "not in the artifact: kept in 16 bit")
    return decisions


def quantize_layers(weights: dict[str, torch.Tensor], roles: dict[str, str], options: Options,
                    calibration: list[GraphCalibration] | None, note: str | None = None,
                    reports: dict | None = None) -> tuple[dict[str, QuantizedLinear], dict[str, float]]:
    """3. Recipe: one frozen QuantizedLinear per path of `weights` ({module path: weight}), and
    each layer's relative output error on the recorded calls ({} without calibration).

    roles: {module path: role} from stage 1. The layers in `options.bits` go to the recipe
    (passes/recipes.py) with the methods' configs built from `options` in one place; those the
    policy puts in `conditioning_bits` round to nearest, weight-only; with `timestep_buckets`
    B > 1 the recipe runs once per timestep bucket of the recorded rows, and each layer keeps one
    record per bucket (passes/timesteps.py); with the mean correction
    (option `mean_correction`; by default after recipe d2quant, whose DAC it is), each layer's
    bias then takes its output mean deviation (passes/mean_correction.py). `note` is added to
    every record (why it was quantized where it was); `reports` receives what the recipe's
    search explored (by recipe name; adatsq). Raises ValueError for NaN / Inf or meta weights.
    """
    check_weights(weights)
    policy = options.policy()
    by_recipe = {p: w for p, w in weights.items() if policy.layer_mode(roles.get(p)) == policy.bits}
    layers = {}
    if by_recipe or not weights:
        def recipe(chosen, configs):
            return run_recipe(options.recipe, chosen, configs, calibration, execution)

        execution = dataclasses.replace(options.execution(), reports=reports)

        # adatsq cuts the timestep buckets itself (passes/adatsq.py).
        buckets = 1 if options.recipe == "adatsq" else options.buckets
        layers, bucket_note = per_bucket(recipe, by_recipe, options.method_configs(), calibration, buckets)
        note = "; ".join(filter(None, [note, bucket_note]))
    for path, weight in weights.items():
        if path not in by_recipe:
            layers[path] = dataclasses.replace(rtn(weight, policy.layer_quantizer(roles[path])),
                                               method="rtn (conditioning_bits)")
    if options.corrects_means:
        if calibration:
            layers = correct_means(calibration, layers, options.kernels)
        else:
            note = "; ".join(filter(None, [note, "mean correction skipped: no calibration data"]))
    if note:
        layers = {p: dataclasses.replace(layer, notes=[*layer.notes, note]) for p, layer in layers.items()}
    errors = layer_errors(calibration, layers, options.kernels) if calibration else {}
    return layers, errors


def lower_graph(gm: fx.GraphModule, analysis: GraphAnalysis, layers: dict[str, QuantizedLinear],
                quantized: frozenset[str], options: Options, example_inputs: list | None,
                ) -> tuple[fx.GraphModule, Callable]:
    """4. Lowering: (the rewritten graph, what runs it). Every quantized site (`quantized`: node
    names) becomes one `clq::quant_linear` call on its layer's packed weight, and layers reading
    one input with one transform are merged (passes/lowering.py); the graph then runs as it is, or
    compiled by Inductor when `example_inputs` are given (options.inductor: on CUDA by default)."""
    lowered = lower(gm, analysis, layers, quantized, options.kernels)
    if example_inputs is None:
        return lowered, lowered
    from torch._inductor.compile_fx import compile_fx

    # Quantized graphs are inference-only: compile the forward alone, without a backward.
    with torch.no_grad():
        return lowered, compile_fx(lowered, example_inputs)
