"""Cross-layer parameter search (CLPS) of CLQ: clipping bounds judged downstream.

For a layer l, quantizing it with clipping bounds (lower ratio, upper ratio) perturbs every layer
after it. Among the later linears t within a window that l's output reaches (by default the rest
of l's block and the next block; option `clps_window` blocks, up to 3), CLPS picks a target:

- "peak-error" (option `clps_target`, default): quantize l without clipping and take the t
  where the relative error ‖Y_t − Ŷ_t‖ / ‖Y_t‖ peaks;
- "max-variance" (the CLQ paper's reviewers' reading): the t whose full-precision output Y_t
  has the largest variance (over all its elements and the search calls).

It then picks

    l*, r* = argmin over the grid of ‖Y_t − Ŷ_t(l, r)‖

where Ŷ_t(l, r) is the target's output with l quantized under bounds (l, r), and the norm is
the Frobenius (L2, default; the same argmin as its square, which the paper's figure writes) or
the L1 norm (option `clps_norm`; the reviewers' reading); "peak-error" measures in the same
norm. The grid always contains (1, 1) — no clipping — so the choice is never worse than min-max
on this objective. Symmetric weights search one ratio (l = r); asymmetric weights search the pair.

The search runs inside the window CBC is calibrating (passes/cross_block.py): `WindowSearch`
holds the search calls' full-precision runs through the window, in the coordinates the window's
folded transforms put the activations in, and their reference outputs; `WindowSearch.search`
picks one layer's target and bounds on them.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable, Hashable, Mapping, TypeVar

import torch
from torch import fx

from .capture import LinearSite
from .layer import QuantizedLinear
from .observers import RelativeError
from .segments import LinearFn, SegmentedGraph

T = TypeVar("T", bound=Hashable)
NO_CLIP = (1.0, 1.0)


def clip_candidates(grid: tuple[float, ...], symmetric: bool) -> list[tuple[float, float]]:
    """The (lower, upper) ratio pairs to try; (1, 1) first."""
    ratios = sorted(set(grid) | {1.0}, reverse=True)
    if symmetric:
        return [(r, r) for r in ratios]
    return [(lo, hi) for lo in ratios for hi in ratios]


def pick_target(errors: Mapping[T, float]) -> T:
    """The downstream layer whose score (relative error, or output variance) peaks (ties: the earliest)."""
    if not errors:
        raise ValueError("no downstream layer to choose a target from")
    return max(errors, key=lambda t: errors[t])


def search_clip(objective: Callable[[tuple[float, float]], float],
                candidates: list[tuple[float, float]]) -> tuple[tuple[float, float], dict]:
    """Evaluate `objective` on every candidate; return the argmin (ties: the earlier) and all values."""
    values = {c: objective(c) for c in candidates}
    best = min(candidates, key=lambda c: values[c])
    return best, values


def relative_errors(outputs: list[dict], references: list[dict], nodes, norm: str,
                    weights: Callable[[int, fx.Node, int], torch.Tensor | None] | None = None) -> dict:
    """||Y - Ŷ|| / ||Y|| (in `norm`, "l2" or "l1") at each node over all search calls; `weights(call,
    node, rows)` weighs each call's rows (calibration_weighting "fisher", a timestep bucket), None: uniform."""
    meter = RelativeError(norm)
    for c, (out, reference) in enumerate(zip(outputs, references)):
        for n in nodes:
            meter.add(n, reference[n], out[n], None if weights is None else weights(c, n, reference[n].shape[0]))
    return meter.result()


def output_variances(references: list[dict], nodes) -> dict:
    """The variance of each node's output over all its elements in every search call (float64
    sums: Σy² / n − (Σy / n)²)."""
    variances = {}
    for n in nodes:
        total = square = count = 0.0
        for reference in references:
            y = reference[n].double()
            total, square, count = total + float(y.sum()), square + float(y.square().sum()), count + y.numel()
        variances[n] = square / count - (total / count) ** 2 if count else 0.0
    return variances


class WindowSearch:
    """CLPS over the window seg.nodes[lo:hi] of a segmented graph.

    envs: the search calls' environments at the window's start; reference_envs: the ones the
    reference outputs come from (None: the same, "fp-layer"; the full-precision prefix's:
    "fp-model"); stand_in: the full-precision linear of every layer in the window's coordinates;
    kernels / device: how the candidate layer runs and where the runs compute; target / norm:
    CLPSConfig's (how the target is picked, the norm candidates are scored in); row_weights(call,
    path, rows): the weights of a search call's `rows` rows at the layer `path` (calibration_weighting,
    a timestep bucket), or None.
    """

    def __init__(self, seg: SegmentedGraph, lo: int, hi: int, envs: list[dict[fx.Node, Any]],
                 reference_envs: list[dict[fx.Node, Any]] | None, stand_in: LinearFn, kernels: str,
                 device: torch.device | None, target: str, norm: str,
                 row_weights: Callable[[int, str, int], torch.Tensor | None] | None = None):
        self.seg, self.hi, self.stand_in, self.kernels, self.device = seg, hi, stand_in, kernels, device
        self.target, self.norm = target, norm
        self.weights = None if row_weights is None else (lambda c, n, rows: row_weights(c, seg.sites[n.name].path, rows))
        window = seg.nodes[lo:hi]
        self.runs, self.references = [], []
        for c, env in enumerate(envs):
            local = seg.run(window, env, stand_in, device=device)
            self.runs.append(ChainMap(local, env))
            self.references.append(local if reference_envs is None
                                   else seg.run(window, reference_envs[c], stand_in, device=device))
        self.sites = [seg.sites[n.name] for n in window if n.name in seg.sites]

    def _rerun(self, site: LinearSite, nodes: list[fx.Node], layer: QuantizedLinear) -> list[dict]:
        """The search calls through `nodes` with `site` quantized as `layer`, the rest full precision."""
        def linear(s, x, w, b):
            return layer.forward(x, b, self.kernels) if s.node == site.node else self.stand_in(s, x, w, b)
        return [self.seg.run(nodes, env, linear, device=self.device) for env in self.runs]

    def search(self, site: LinearSite, make: Callable[[tuple[float, float]], QuantizedLinear],
               candidates: list[tuple[float, float]]) -> tuple[tuple[float, float], str | None, dict]:
        """The bounds for `site` (`make(clip)` quantizes it under them), its target's module path and
        the objective of every candidate. Without a later layer in the window that the site's output
        reaches: no clipping, no target, no values."""
        seg = self.seg
        later = [x.node for x in self.sites if seg.index[seg.node(x.node)] > seg.index[seg.node(site.node)]]
        if not later:
            return NO_CLIP, None, {}
        downstream = seg.descendants(site.node, self.hi)
        reached = [n for n in later if seg.node(n) in set(downstream)]
        if not reached:
            return NO_CLIP, None, {}
        candidates_t = [seg.node(n) for n in reached]
        if self.target == "max-variance":
            scores = output_variances(self.references, candidates_t)
        else:
            scores = relative_errors(self._rerun(site, downstream, make(NO_CLIP)), self.references, candidates_t,
                                     self.norm, self.weights)
        target_node = pick_target(scores)
        cone = seg.cone(site.node, target_node.name)

        def objective(c):
            outs = self._rerun(site, cone, make(c))
            return relative_errors(outs, self.references, [target_node], self.norm, self.weights)[target_node]

        clip, values = search_clip(objective, candidates)
        return clip, seg.sites[target_node.name].path, values
