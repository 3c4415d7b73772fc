"""Cross-block calibration (CBC) of CLQ, driving orthogonal smoothing (OBS) and CLPS block by block.

The graph is cut into segments at transformer-block boundaries (passes/segments.py). Every
recorded call is carried through the segments in order. At segment s:

1. the segment (and the next one, CLPS's window) runs in full precision from the call's current
   state, recording the statistics of the segment's layers;
2. each layer gets its OBS transform G = S·H from those statistics, and CLPS picks its clipping
   bounds against its downstream target layer;
3. the calls advance through segment s with its layers now *quantized*, so segment s+1 is
   calibrated on the inputs it will really see at inference, accumulated error included.

Without CBC (the `clq-no-cbc` ablation) the calls advance in full precision instead: the usual
calibration, where every layer sees the full-precision model's activations. The reference outputs
CLPS compares against are the full-precision layers applied to the same inputs ("fp-layer",
default) or the full-precision model's own activations ("fp-model", option `cbc_reference`).
Peak memory: one window of activations for the calls used by the search, plus the live
activations at the current boundary for every call.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize

from .cross_layer_search import clip_candidates, pick_target, search_clip
from .layer import QuantizedLinear
from .observers import GraphCalibration, RelativeError, check_finite_input
from .orthogonal_smoothing import Smoothing, orthogonal_smoothing
from .rotation import rotate_hessian, rotate_weight
from .segments import SegmentedGraph, fp_linear
from .statistics import LayerStats

if TYPE_CHECKING:
    from clq_compile.options import Options


@dataclass(frozen=True)
class Components:
    """Which parts of CLQ run (the ablation recipes switch one off) and the weight quantizer."""

    cbc: bool = True
    obs: bool = True
    clps: bool = True
    gptq: bool = False


def _smoothed_weight(weight: torch.Tensor, smoothing: Smoothing | None) -> torch.Tensor:
    """W·G: weight rows transformed like activation rows, so x·Wᵀ = (x·G)·(W·G)ᵀ."""
    w = weight.detach().float()
    if smoothing is None:
        return w
    return rotate_weight(w, act_perm=smoothing.act_perm, act_rotation=smoothing.act_rotation).float()


def _smoothed_hessian(hessian: torch.Tensor, smoothing: Smoothing | None) -> torch.Tensor:
    """Gᵀ·H·G: the Hessian of the transformed input x·G."""
    if smoothing is None:
        return hessian
    return rotate_hessian(hessian, smoothing.act_perm, smoothing.act_rotation)


class _LayerQuantizer:
    """Builds the QuantizedLinear of one layer for a given clip, under its smoothing."""

    def __init__(self, weight: torch.Tensor, stats: LayerStats | None, options: Options,
                 parts: Components, smoothing: Smoothing | None):
        self.options, self.parts, self.smoothing = options, parts, smoothing
        self.weight = _smoothed_weight(weight, smoothing)
        self.stats = stats

    def __call__(self, clip: tuple[float, float], final: bool = False) -> QuantizedLinear:
        o = self.options
        if final and self.parts.gptq:
            from .gptq import gptq

            q = gptq(self.weight, _smoothed_hessian(self.stats.hessian, self.smoothing), o.w_bits,
                     o.weight_symmetric, o.weight_group, act_order=o.gptq_act_order, clip=clip)
        else:
            q = quantize(self.weight, o.w_bits, o.weight_symmetric, o.weight_group, clip)
        s = self.smoothing
        return QuantizedLinear(pack_weight(q), o.a_bits, o.act_group,
                               act_perm=None if s is None else s.act_perm,
                               act_rotation=None if s is None else s.act_rotation)


def _relative_errors(outputs: list[dict], references: list[dict], nodes) -> dict:
    """||Y - Ŷ|| / ||Y|| at each node over all search calls."""
    meter = RelativeError()
    for out, reference in zip(outputs, references):
        for n in nodes:
            meter.add(n, reference[n], out[n])
    return meter.result()


def _describe(parts: Components, smoothing: Smoothing | None, clip, target) -> tuple[str, list[str]]:
    method = "clq" if parts.cbc else "clq (no cbc)"
    notes = []
    if smoothing is not None:
        method += f" {smoothing.note}"
        notes.append("rotation: weight side folded offline, activation side online")
    if parts.clps:
        method += f" clip {clip[0]:.2f}/{clip[1]:.2f}"
        notes.append(f"CLPS target {target}" if target else "CLPS: no downstream layer in the window")
    if parts.gptq:
        method += " +gptq"
    return method, notes


class _GraphQuantizer:
    """CBC over one captured graph and its recorded calls."""

    def __init__(self, cal: GraphCalibration, options: Options, parts: Components):
        self.seg = SegmentedGraph(cal.gm, cal.analysis)
        self.options, self.parts = options, parts
        self.envs = [self.seg.start_env(args) for args in cal.arguments()]
        fp_model = parts.cbc and options.cbc_reference == "fp-model"
        self.fp_envs = [dict(e) for e in self.envs] if fp_model else None
        self.search_calls = min(len(self.envs), options.search_calls)

    def run(self, weights: dict[str, torch.Tensor], layers: dict[str, QuantizedLinear], bar) -> None:
        seg = self.seg
        kernels = self.options.kernels

        def quantized(site, x, w, b):
            layer = layers.get(site.path)
            return layer.forward(x, b, kernels) if layer is not None else fp_linear(site, x, w, b)

        for s in range(len(seg)):
            todo = [x for x in seg.segment_sites(s) if x.path in weights and x.path not in layers]
            if todo:
                self._quantize_segment(s, todo, weights, layers, bar)
            self.envs = [seg.advance(s, e, quantized if self.parts.cbc else fp_linear) for e in self.envs]
            if self.fp_envs is not None:
                self.fp_envs = [seg.advance(s, e, fp_linear) for e in self.fp_envs]

    def _quantize_segment(self, s, todo, weights, layers, bar) -> None:
        seg, options, parts = self.seg, self.options, self.parts
        lo = seg.bounds[s][0]
        hi = seg.bounds[min(s + options.clps_window, len(seg) - 1)][1]
        window = seg.nodes[lo:hi]
        stats = {x.node: LayerStats(x.in_features, hessian=parts.gptq) for x in todo}

        def observe(site, x, w, b, call):
            if site.node in stats:
                check_finite_input(site, x, call)
                stats[site.node].add(x)
            return fp_linear(site, x, w, b)

        runs, references = [], []
        for c, env in enumerate(self.envs):
            local = seg.run(window, env, partial(observe, call=c))
            if c < self.search_calls:
                runs.append(ChainMap(local, env))
                references.append(local if self.fp_envs is None
                                  else seg.run(window, self.fp_envs[c], fp_linear))
        window_sites = [seg.sites[n.name] for n in window if n.name in seg.sites]
        for site in todo:
            layers[site.path] = self._quantize_site(site, weights[site.path], stats[site.node],
                                                    runs, references, window_sites, hi)
            bar.update()

    def _quantize_site(self, site, weight, stats, runs, references, window_sites, hi) -> QuantizedLinear:
        seg, options, parts = self.seg, self.options, self.parts
        smoothing = (orthogonal_smoothing(site.in_features, stats.absmax, options.hadamard_block)
                     if parts.obs else None)
        make = _LayerQuantizer(weight, stats, options, parts, smoothing)
        clip, target, objective_values = (1.0, 1.0), None, {}
        later = [x.node for x in window_sites if seg.index[seg.node(x.node)] > seg.index[seg.node(site.node)]]
        if parts.clps and later:
            def rerun(nodes, layer):
                def linear(s_, x, w, b):
                    return layer.forward(x, b, options.kernels) if s_.node == site.node else fp_linear(s_, x, w, b)
                return [seg.run(nodes, env, linear) for env in runs]

            downstream = seg.descendants(site.node, hi)
            reached = [n for n in later if seg.node(n) in set(downstream)]
            if reached:
                outs = rerun(downstream, make((1.0, 1.0)))
                target_node = pick_target(_relative_errors(outs, references, [seg.node(n) for n in reached]))
                target = seg.sites[target_node.name].path
                cone = seg.cone(site.node, target_node.name)

                def objective(c):
                    return _relative_errors(rerun(cone, make(c)), references, [target_node])[target_node]

                clip, objective_values = search_clip(
                    objective, clip_candidates(options.clps_grid, options.weight_symmetric))
        layer = make(clip, final=True)
        layer.method, layer.notes = _describe(parts, smoothing, clip, target)
        layer.details = {"clip": clip, "target": target, "objective": objective_values,
                         "smoothing": None if smoothing is None else smoothing.note}
        return layer


def clq_quantize(weights: dict[str, torch.Tensor], options: Options,
                 calibrations: list[GraphCalibration] | None, parts: Components) -> dict[str, QuantizedLinear]:
    """Quantize `weights` ({module path: weight}) with CLQ's components `parts` switched on.

    Data-free (no calibration): every layer gets the block Hadamard alone (no channel swap, no
    search) and round-to-nearest weights.
    """
    layers: dict[str, QuantizedLinear] = {}
    with tqdm(total=len(weights), desc="clq", leave=False, disable=len(weights) < 8) as bar:
        for cal in calibrations or []:
            _GraphQuantizer(cal, options, parts).run(weights, layers, bar)
        for path in [p for p in weights if p not in layers]:
            smoothing = (orthogonal_smoothing(weights[path].shape[1], None, options.hadamard_block)
                         if parts.obs else None)
            layer = _LayerQuantizer(weights[path], None, options, Components(gptq=False), smoothing)((1.0, 1.0))
            layer.method = "data-free: " + (f"block Hadamard {smoothing.note} + rtn" if smoothing else "rtn")
            layers[path] = layer
            bar.update()
    return layers
