"""Cross-block calibration (CBC) of CLQ, driving orthogonal smoothing (OBS) and CLPS block by block.

The graph is cut into segments at transformer-block boundaries (passes/segments.py). Every
recorded call is carried through the segments in order. At segment s:

1. the segment runs in full precision from the call's current state, recording the statistics
   of the segment's layers (with option `obs_statistics="fp"`, OBS's outlier scores come from
   the same segment run from the full-precision prefix instead: better on the stress models,
   worse on the trained digits DiT; README);
2. each layer gets its OBS transform G = S·H from those statistics (with option `fold`, one G
   per fold group, folded into the producers: passes/folding.py); the segment and the next one
   (CLPS's window) run in full precision in the coordinates those transforms put the activations
   in, and CLPS (passes/cross_layer_search.py) picks each layer's clipping bounds against its
   downstream target layer;
3. the calls advance through segment s with its layers now *quantized*, so segment s+1 is
   calibrated on the inputs it will really see at inference, accumulated error included. With
   option `cbc_prefix="previous"` (the CLQ paper's reviewers' reading) only segment s is
   quantized: segment s+1's inputs are segment s, quantized, run on the full-precision model's
   input to it, so each block is calibrated against the error of the one before it alone.

Without CBC (the `clq-no-cbc` ablation) the calls advance in full precision instead: the usual
calibration, where every layer sees the full-precision model's activations. The reference outputs
CLPS compares against are the full-precision layers applied to the same inputs ("fp-layer",
default) or the full-precision model's own activations ("fp-model", option `cbc_reference`).
Peak memory: one window of activations for the calls used by the search, plus the live
activations at the current boundary for every call; with `Execution.offload` those boundary
activations (and the recordings) wait in CPU memory, and each call visits the device only to run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
import torch
from tqdm.auto import tqdm

from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize

from .configs import CLPSConfig, Execution, GPTQConfig, MethodConfigs, QuantizerConfig
from .cross_layer_search import NO_CLIP, WindowSearch, clip_candidates
from .folding import FoldDecision, find_folds, plan_folds
from .layer import IDENTITY, LowRank, QuantizedLinear
from .lowrank import lowrank_rank, lowrank_split
from .observers import GraphCalibration, check_finite_input
from .orthogonal_smoothing import Smoothing, orthogonal_smoothing
from .rotation import rotate_hessian, rotate_weight
from .segments import SegmentedGraph, fp_linear
from .fisher import row_weights
from .statistics import LayerStats


@dataclass(frozen=True)
class Components:
    """Which parts of CLQ run (the ablation recipes switch one off) and the weight quantizer."""

    cbc: bool = True
    obs: bool = True
    clps: bool = True
    gptq: bool = False
    lowrank: bool = False


def _rank(parts: Components, configs: MethodConfigs, out_features: int, in_features: int) -> int:
    """The rank of a layer's low-rank branch (0: none) under `parts` and configs.lowrank."""
    return lowrank_rank(out_features, in_features, configs.lowrank.rank) if parts.lowrank else 0


def _smoothed_weight(weight: torch.Tensor, smoothing: Smoothing | None) -> torch.Tensor:
    """W·G: weight rows transformed like activation rows, so x·Wᵀ = (x·G)·(W·G)ᵀ."""
    if smoothing is None:
        return weight.detach().float()
    return rotate_weight(weight, *smoothing.transform.parts()).float()


def _output_transformed(weight: torch.Tensor, output: Smoothing | None) -> torch.Tensor:
    """Gᵀ·W for a [N, K] weight (or b·G for a [N] bias): the layer then outputs y·G."""
    if output is None:
        return weight.detach()
    rows = weight.detach().reshape(weight.shape[0], -1).t()
    return rotate_weight(rows, *output.transform.parts()).t().reshape(weight.shape)


def _smoothed_hessian(hessian: torch.Tensor, smoothing: Smoothing | None) -> torch.Tensor:
    """Gᵀ·H·G: the Hessian of the transformed input x·G."""
    if smoothing is None:
        return hessian
    return rotate_hessian(hessian, smoothing.transform.perm, smoothing.transform.rotation)


class _LayerQuantizer:
    """Builds the QuantizedLinear of one layer for a given clip, under its smoothing.

    gptq: GPTQ's config for the final weights (None: round to nearest); smoothing: G of the
    layer's input; online: whether the op applies it (False: the producers already output x·G);
    output: the G of the consumers this layer's output rows are folded for; rank: the rank of a
    16-bit low-rank branch split off the weight in the op's input coordinates (0: none). G is
    orthogonal, so splitting before the online rotation or after it gives the same residual
    (SVD(W·G) = U Σ (GᵀV)ᵀ), and the branch reads the op's input as it arrives.
    fp_weight / bias: the full-precision layer in those coordinates, for search runs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None,
                 quantizer: QuantizerConfig, gptq: GPTQConfig | None, smoothing: Smoothing | None,
                 online: bool = True, output: Smoothing | None = None, rank: int = 0):
        self.quantizer, self.gptq, self.smoothing, self.online = quantizer, gptq, smoothing, online
        self.fold_in = smoothing.transform if smoothing is not None and not online else None
        self.fold_out = None if output is None else output.transform
        rows = _output_transformed(weight, output)
        self.lowrank = None
        if self.fold_in is not None:  # the op receives x·G: W·G is the layer in its coordinates
            self.fp_weight = self.weight = _smoothed_weight(rows, smoothing)
            if rank:
                self.weight, self.lowrank = lowrank_split(self.fp_weight, rank, weight.dtype)
        else:
            self.fp_weight, quantized_rows = rows.float(), rows
            if rank:
                quantized_rows, self.lowrank = lowrank_split(rows, rank, weight.dtype)
            self.weight = _smoothed_weight(quantized_rows, smoothing)
        self.bias = None if output is None or bias is None else _output_transformed(bias, output).float()
        self.stats = stats
        # Whether the full-precision stand-in differs from the graph's own linear.
        self.transformed = self.fold_in is not None or self.fold_out is not None

    def stand_in(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b = self.bias if self.bias is not None else bias
        return torch.nn.functional.linear(x, self.fp_weight.to(x.dtype), None if b is None else b.to(x.dtype))

    def __call__(self, clip: tuple[float, float], final: bool = False) -> QuantizedLinear:
        w, a = self.quantizer.weight, self.quantizer.activation
        if final and self.gptq is not None:
            from .gptq import gptq

            q = gptq(self.weight, _smoothed_hessian(self.stats.hessian, self.smoothing), w.format,
                     w.symmetric, w.group, act_order=self.gptq.act_order, clip=clip)
        else:
            q = quantize(self.weight, w.format, w.symmetric, w.group, clip)
        online = self.smoothing.transform if self.online and self.smoothing is not None else IDENTITY
        return QuantizedLinear(pack_weight(q), a.format, a.group, online=online, bias=self.bias,
                               fold_in=self.fold_in, fold_out=self.fold_out, lowrank=self.lowrank)


def _describe(parts: Components, smoothing: Smoothing | None, clip, target,
              fold: FoldDecision | None, clps: CLPSConfig, lowrank: LowRank | None) -> tuple[str, list[str]]:
    method = "clq" if parts.cbc else "clq (no cbc)"
    notes = []
    if smoothing is not None:
        method += f" {smoothing.note}"
        where = f"folded into {', '.join(fold.producers)}" if fold and fold.producers else "online"
        notes.append(f"rotation: weight side folded offline, activation side {where}")
    if fold and fold.consumers:
        notes.append(f"output rows carry the rotation of {', '.join(fold.consumers)}")
    if parts.clps:
        method += f" clip {clip[0]:.2f}/{clip[1]:.2f}"
        how = {"peak-error": "error peaks", "max-variance": "largest output variance"}[clps.target]
        notes.append(f"CLPS target {target} ({how}; {clps.norm.upper()} objective)" if target else
                     "CLPS: no downstream layer in the window")
    if parts.gptq:
        method += " +gptq"
    if lowrank is not None:
        method += f" +lowrank r{lowrank.rank}"
    return method, notes


class _GraphQuantizer:
    """CBC over one captured graph and its recorded calls."""

    def __init__(self, cal: GraphCalibration, configs: MethodConfigs, parts: Components,
                 weights: dict[str, torch.Tensor], execution: Execution):
        self.seg = SegmentedGraph(cal.gm, cal.analysis)
        # Row weights of the statistics (GPTQ's Hessians, OBS's samples): calibration_weighting.
        # Every linear of the graph, not only those quantized: any may be CLPS's target.
        self.row_weights = row_weights([cal], {x.path for x in cal.analysis.sites},
                                       configs.calibration_weighting, configs.rows)
        self.cal, self.configs, self.parts, self.kernels = cal, configs, parts, execution.kernels
        self.envs = [self.seg.start_env(args) for args in cal.arguments(home=not execution.offload)]
        # Under CBC the calls are also carried through the full-precision prefix when CLPS's
        # targets come from it ("fp-model") or OBS takes its outlier scores from it ("fp").
        self.fp_model = parts.cbc and configs.clps.reference == "fp-model"
        self.fp_scores = parts.cbc and parts.obs and configs.obs.statistics == "fp"
        # With cbc_prefix="previous" each block's inputs start again from the full-precision prefix.
        self.previous_only = parts.cbc and configs.cbc.prefix == "previous"
        self.fp_envs = ([dict(e) for e in self.envs] if self.fp_model or self.fp_scores or self.previous_only
                        else None)
        self.search_calls = min(len(self.envs), configs.clps.search_calls)
        # With `offload`, activations wait in CPU memory and visit the model's device to run.
        self.device = next(iter(cal.state.values())).device if execution.offload and cal.state else None
        candidates = {x.node for x in cal.analysis.sites if x.path in weights}
        self.folds = find_folds(cal.gm, cal.analysis, candidates) if parts.obs and configs.obs.fold else []

    def run(self, weights: dict[str, torch.Tensor], layers: dict[str, QuantizedLinear], bar) -> None:
        seg = self.seg
        kernels = self.kernels

        def quantized(site, x, w, b):
            layer = layers.get(site.path)
            return layer.forward(x, b, kernels) if layer is not None else fp_linear(site, x, w, b)

        for s in range(len(seg)):
            todo = [x for x in seg.segment_sites(s) if x.path in weights and x.path not in layers]
            if todo:
                self._quantize_segment(s, todo, weights, layers, bar)
            linear = quantized if self.parts.cbc else fp_linear
            start = self.fp_envs if self.previous_only else self.envs
            self.envs = [seg.advance(s, e, linear, self.device) for e in start]
            if self.fp_envs is not None:
                self.fp_envs = [seg.advance(s, e, fp_linear, self.device) for e in self.fp_envs]

    def _plan(self, todo, weights, stats, scores) -> dict[str, tuple[_LayerQuantizer, FoldDecision | None]]:
        """Each layer's quantizer under its OBS transform, folded where a whole group is in `todo`.

        stats: the layers' inputs (GPTQ's Hessian; None when nothing needs them); scores: what OBS
        scores the channels on.
        """
        configs, parts, seg = self.configs, self.parts, self.seg
        block = configs.obs.hadamard_block
        gptq = configs.gptq if parts.gptq else None
        smoothing: dict[str, Smoothing | None] = {}
        output: dict[str, Smoothing] = {}
        folds: dict[str, FoldDecision] = {}
        absmax = {n: s.absmax for n, s in scores.items()}
        for planned in plan_folds(self.folds, absmax, {n: x.path for n, x in seg.sites.items()}):
            group = planned.group
            shared = orthogonal_smoothing(group.width, planned.absmax, block, configs.obs.swap, group.granule)
            folds.update(planned.decisions)
            smoothing.update(dict.fromkeys(group.consumers, shared))
            output.update(dict.fromkeys(group.producers, shared))
        plan = {}
        for x in todo:
            if x.node not in smoothing:
                smoothing[x.node] = (orthogonal_smoothing(x.in_features, scores[x.node].absmax, block,
                                                          configs.obs.swap) if parts.obs else None)
            bias = self.cal.state[x.bias_index] if x.bias_index is not None else None
            online = x.node not in folds or not folds[x.node].producers
            inputs = None if stats is None else stats[x.node]
            plan[x.node] = (_LayerQuantizer(weights[x.path], bias, inputs, configs.quantizer, gptq, smoothing[x.node],
                                            online, output.get(x.node), _rank(parts, configs, *weights[x.path].shape)),
                            folds.get(x.node))
        return plan

    def _quantize_segment(self, s, todo, weights, layers, bar) -> None:
        seg = self.seg
        lo, end = seg.bounds[s]
        hi = seg.bounds[min(s + self.configs.clps.window, len(seg) - 1)][1]
        # Inputs as the quantized prefix gives them (GPTQ's Hessian), and the activations OBS
        # scores its channels on: the same, or the full-precision prefix's (`obs_statistics`).
        scores = {x.node: LayerStats(x.in_features) for x in todo} if self.fp_scores else None
        stats = ({x.node: LayerStats(x.in_features, hessian=self.parts.gptq) for x in todo}
                 if scores is None or self.parts.gptq else None)
        scores = scores or stats

        def observe(site, x, w, b, call, into):
            if site.node in into:
                check_finite_input(site, x, call)
                into[site.node].add(x, None if self.row_weights is None else self.row_weights.get(0, site.path, call, x.shape[0]))
            return fp_linear(site, x, w, b)

        passes = [(self.fp_envs, scores)] if self.fp_scores else []
        if stats is not None:
            passes.append((self.envs, stats))
        for envs, into in passes:
            for c, env in enumerate(envs):
                seg.run(seg.nodes[lo:end], env, partial(observe, call=c, into=into), device=self.device)
        plan = self._plan(todo, weights, stats, scores)

        def stand_in(site, x, w, b):
            quantizer = plan.get(site.node, (None, None))[0]
            if quantizer is None or not quantizer.transformed:
                return fp_linear(site, x, w, b)
            return quantizer.stand_in(x, b)

        calls = self.search_calls
        clps = self.configs.clps
        weights = None if self.row_weights is None else (lambda c, path, rows: self.row_weights.get(0, path, c, rows))
        search = WindowSearch(seg, lo, hi, self.envs[:calls], self.fp_envs[:calls] if self.fp_model else None,
                              stand_in, self.kernels, self.device, clps.target, clps.norm, weights)
        for site in todo:
            quantizer, fold = plan[site.node]
            layers[site.path] = self._quantize_site(site, quantizer, fold, search)
            bar.update()

    def _quantize_site(self, site, make, fold, search: WindowSearch) -> QuantizedLinear:
        configs, parts = self.configs, self.parts
        clip, target, objective_values = NO_CLIP, None, {}
        if parts.clps:
            clip, target, objective_values = search.search(
                site, make, clip_candidates(configs.clps.grid, configs.quantizer.weight.symmetric))
        method, notes = _describe(parts, make.smoothing, clip, target, fold, configs.clps, make.lowrank)
        details = {"clip": clip, "target": target, "objective": objective_values,
                   "smoothing": None if make.smoothing is None else make.smoothing.note}
        return replace(make(clip, final=True), method=method, notes=notes, details=details, fold=fold)


def clq_quantize(weights: dict[str, torch.Tensor], configs: MethodConfigs,
                 calibrations: list[GraphCalibration] | None, parts: Components,
                 execution: Execution) -> dict[str, QuantizedLinear]:
    """Quantize `weights` ({module path: weight}) with CLQ's components `parts` switched on.

    Data-free (no calibration): every layer gets the block Hadamard alone (no channel swap, no
    search) and round-to-nearest weights.
    """
    layers: dict[str, QuantizedLinear] = {}
    with torch.no_grad(), tqdm(total=len(weights), desc="clq", leave=False, disable=len(weights) < 8) as bar:
        for cal in calibrations or []:
            _GraphQuantizer(cal, configs, parts, weights, execution).run(weights, layers, bar)
        for path in [p for p in weights if p not in layers]:
            smoothing = (orthogonal_smoothing(weights[path].shape[1], None, configs.obs.hadamard_block)
                         if parts.obs else None)
            rank = _rank(parts, configs, *weights[path].shape)
            layer = _LayerQuantizer(weights[path], None, None, configs.quantizer, None, smoothing, rank=rank)(NO_CLIP)
            layers[path] = replace(layer, method="data-free: " + (
                f"block Hadamard {smoothing.note} + rtn" if smoothing else "rtn") + (
                f" +lowrank r{rank}" if rank else ""))
            bar.update()
    return layers
