"""Recipes: named pass pipelines that decide the quantization of every selected layer.

A recipe takes the weights to quantize (by module path), the methods' configs
(passes/configs.py), when the user calibrated the recorded calls of each captured graph, and how
its searches run (`Execution`); it returns one `QuantizedLinear` per path.
Recipes are data in `RECIPES`, so the same graph gives every method's result for a comparison:

| recipe | what it does |
|---|---|
| rtn | round to nearest, min-max ranges |
| smoothquant | per-channel smoothing s = max|X|^α / max|W|^(1-α), α searched per layer |
| quarot | full-width randomized Hadamard rotation, weights round to nearest |
| gptq | GPTQ weights (Hessian from calibration inputs) |
| quarot+gptq | the QuaRot rotation with GPTQ weights |
| clq | cross-block calibration + orthogonal-based smoothing + cross-layer parameter search |
| clq-no-cbc / clq-no-obs / clq-no-clps | CLQ with one component removed (ablations) |
| clq+gptq | CLQ with GPTQ weights |
| svdquant | SmoothQuant's smoothing, then a 16-bit low-rank branch split off W·diag(s); the residual quantized |
| clq+lowrank / clq+gptq+lowrank | CLQ (with GPTQ weights) and a 16-bit low-rank branch split off each weight |
| rtn+lowrank / gptq+lowrank / quarot+lowrank / quarot+gptq+lowrank / lrq-dit+lowrank / d2quant+lowrank | the branch split off W first, the residual quantized by the recipe |
| lrq-dit | LRQ-DiT: smoothing α = 0.5, adaptive rotation (Hadamard or outlier-aware, by J), twin-log weights |
| d2quant | D²Quant: GPTQ weights, the feed-forward down projections dual-scaled first; then the mean correction |
| adatsq | AdaTSQ: a bit-width pair per layer and timestep bucket, beam-searched under an average-bits budget |

Recipes that need data quantize round-to-nearest when called without calibration, and say so.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import torch
from tqdm.auto import tqdm

from .configs import Execution, MethodConfigs, QuantizerConfig
from .cross_block import Components, clq_quantize
from .fisher import row_weights
from .layer import IDENTITY, ActivationTransform, QuantizedLinear
from .observers import GraphCalibration, ReplayPosition, observe
from .statistics import LayerStats
from .weight_quantization import rtn

Recipe = Callable[[dict[str, torch.Tensor], MethodConfigs, "list[GraphCalibration] | None", Execution],
                  dict[str, QuantizedLinear]]


def _statistics(weights: dict[str, torch.Tensor], calibration: list[GraphCalibration] | None,
                hessian: bool, configs: MethodConfigs) -> dict[str, LayerStats] | None:
    """Input statistics of every layer on the full-precision model's recorded calls; with
    calibration_weighting "fisher", each row weighted by its sensitivity, and with `configs.rows`
    only one timestep bucket's rows (passes/fisher.py `row_weights`)."""
    if not calibration:
        return None
    stats = {p: LayerStats(w.shape[1], hessian=hessian) for p, w in weights.items()}
    weighting = row_weights(calibration, set(weights), configs.calibration_weighting, configs.rows)
    where = ReplayPosition()

    def record(site, x, weight, bias, y):
        stats[site.path].add(x, None if weighting is None else weighting.get(where.graph, site.path, where.call,
                                                                              x.shape[0]))

    observe(calibration, set(weights), record, desc="calibration statistics", position=where)
    return stats


def _per_layer(weights: dict[str, torch.Tensor], name: str, quantize_one) -> dict[str, QuantizedLinear]:
    return {p: quantize_one(p, w) for p, w in tqdm(weights.items(), desc=name, leave=False,
                                                   disable=len(weights) < 50)}


def _data_free(weight: torch.Tensor, quantizer: QuantizerConfig) -> QuantizedLinear:
    return dataclasses.replace(rtn(weight, quantizer), method="data-free: rtn")


def _rtn_recipe(weights, configs, calibration, execution):
    """Round to nearest with min-max ranges; needs no calibration data."""
    return _per_layer(weights, "rtn", lambda p, w: rtn(w, configs.quantizer))


def _smoothquant_recipe(weights, configs, calibration, execution):
    from .smoothquant import smoothquant_layer

    quantizer = configs.quantizer
    stats = _statistics(weights, calibration, False, configs)
    if stats is None:
        return _per_layer(weights, "smoothquant", lambda p, w: _data_free(w, quantizer))
    layers = _folded_smoothquant(weights, quantizer, calibration, stats) if configs.smoothquant.fold else {}
    rest = {p: w for p, w in weights.items() if p not in layers}
    return {**layers, **_per_layer(rest, "smoothquant", lambda p, w: smoothquant_layer(
        w, stats[p].samples, stats[p].absmax, quantizer))}


def _folded_smoothquant(weights, quantizer, calibration, stats) -> dict[str, QuantizedLinear]:
    """SmoothQuant for the fold groups (passes/folding.py): consumers share one s, searched
    jointly, and read their input already divided by s from the producers' scaled output rows."""
    from .folding import find_folds, plan_folds
    from .smoothquant import smoothquant_layer, smoothquant_shared

    layers: dict[str, QuantizedLinear] = {}
    for cal in calibration:
        paths = {x.node: x.path for x in cal.analysis.sites}
        biases = {x.path: None if x.bias_index is None else cal.state[x.bias_index] for x in cal.analysis.sites}
        absmax = {n: stats[p].absmax for n, p in paths.items() if p in weights}
        for planned in plan_folds(find_folds(cal.gm, cal.analysis, set(absmax)), absmax, paths):
            decisions = {paths[n]: d for n, d in planned.decisions.items()}
            producers = [paths[n] for n in planned.group.producers]
            consumers = [paths[n] for n in planned.group.consumers]
            if any(p in layers for p in decisions):
                continue
            shared = smoothquant_shared([weights[c] for c in consumers], [stats[c].samples for c in consumers],
                                        planned.absmax, quantizer)
            mul = shared[0].act_mul
            for path, layer in zip(consumers, shared):
                layers[path] = dataclasses.replace(
                    layer, online=IDENTITY, fold_in=ActivationTransform(mul=mul), fold=decisions[path],
                    notes=[*layer.notes, f"smoothing folded into {', '.join(producers)}"])
            for path in producers:
                rows = weights[path].detach().double() * mul.double()[:, None]
                layer = smoothquant_layer(rows, stats[path].samples, stats[path].absmax, quantizer)
                bias = biases[path]
                layers[path] = dataclasses.replace(
                    layer, bias=None if bias is None else (bias.detach().double() * mul.double()).float(),
                    fold_out=ActivationTransform(mul=mul), fold=decisions[path],
                    notes=[*layer.notes, f"output rows carry the smoothing of {', '.join(consumers)}"])
    return layers


def _svdquant_recipe(weights, configs, calibration, execution):
    """SVDQuant: smoothing with α searched on the layer's error, branch included (passes/lowrank.py)."""
    from .lowrank import lowrank_rank, lowrank_split
    from .smoothquant import smoothquant_layer

    quantizer, rank = configs.quantizer, configs.lowrank.rank
    stats = _statistics(weights, calibration, False, configs)

    def one(path, w):
        r = lowrank_rank(*w.shape, rank)
        if stats is not None:
            return smoothquant_layer(w, stats[path].samples, stats[path].absmax, quantizer, rank=r)
        if not r:
            return _data_free(w, quantizer)
        residual, branch = lowrank_split(w, r)
        return dataclasses.replace(rtn(residual, quantizer), lowrank=branch, method=f"data-free: rtn +lowrank r{r}")

    return _per_layer(weights, "svdquant", one)


def _lrq_dit_recipe(weights, configs, calibration, execution):
    """LRQ-DiT per layer (passes/lrq_dit.py); data-free: Hadamard and twin-log weights only."""
    from .lrq_dit import lrq_dit_layer

    stats = _statistics(weights, calibration, False, configs)
    return _per_layer(weights, "lrq-dit", lambda p, w: lrq_dit_layer(
        w, None if stats is None else stats[p].samples, None if stats is None else stats[p].absmax,
        configs.quantizer, configs.lrq))


# The roles DSQ is for: the feed-forward down projections.
DOWN_PROJECTIONS = ("ff_down",)


def _d2quant_recipe(weights, configs, calibration, execution):
    """D²Quant's weight side: GPTQ for every layer; a down projection first gets DSQ's column
    scales t (passes/dual_scale.py), and GPTQ then quantizes W · diag(1/t) under the Hessian of
    x · diag(t). The activation side (DAC, the mean correction) runs after the recipe
    (clq_compile/pipeline.py), for every layer."""
    from .dual_scale import dsq_layer
    from .gptq import gptq_layer
    from .rotation import rotate_weight

    quantizer, gptq = configs.quantizer, configs.gptq
    stats = _statistics(weights, calibration, True, configs)
    if stats is None:
        return _per_layer(weights, "d2quant", lambda p, w: _data_free(w, quantizer))
    roles = {site.path: site.role for cal in calibration for site in cal.analysis.sites}

    def one(path, w):
        h = stats[path].hessian
        if roles.get(path) not in DOWN_PROJECTIONS:
            return dataclasses.replace(gptq_layer(w, h, quantizer, gptq), method="d2quant: gptq")
        _, t = dsq_layer(w, stats[path].samples, quantizer)
        if t is None:
            return dataclasses.replace(gptq_layer(w, h, quantizer, gptq), method="d2quant: gptq",
                                       notes=["dsq: one scale per row fit best (no column scales)"])
        mul = t.float()
        scaled = rotate_weight(w, act_mul=mul).float()  # W · diag(1/t): undoes the op's x · diag(t)
        layer = gptq_layer(scaled, h * (mul.double()[:, None] * mul.double()[None, :]), quantizer, gptq)
        return dataclasses.replace(layer, online=ActivationTransform(mul=mul), method="d2quant: dsq + gptq",
                                   notes=[*layer.notes, f"dsq: column scales {float(mul.min()):.3g} .. "
                                                        f"{float(mul.max()):.3g} on the input"])

    return _per_layer(weights, "d2quant", one)


def _quarot_recipe(weights, configs, calibration, execution, gptq: bool = False):
    from .rotation import quarot_layer, rotate_hessian, rotate_weight

    quantizer = configs.quantizer
    if not gptq:
        return _per_layer(weights, "quarot", lambda p, w: quarot_layer(w, quantizer, configs.quarot))
    from .gptq import gptq_layer

    stats = _statistics(weights, calibration, True, configs)

    def one(path, w):
        layer = quarot_layer(w, quantizer, configs.quarot)
        if stats is None:
            return layer
        r = layer.act_rotation
        rotated = gptq_layer(rotate_weight(w, act_rotation=r).float(),
                             rotate_hessian(stats[path].hessian, act_rotation=r), quantizer, configs.gptq)
        return dataclasses.replace(rotated, online=layer.online, method="quarot+gptq", notes=layer.notes)

    return _per_layer(weights, "quarot+gptq", one)


def _gptq_recipe(weights, configs, calibration, execution):
    from .gptq import gptq_layer

    stats = _statistics(weights, calibration, True, configs)
    if stats is None:
        return _per_layer(weights, "gptq", lambda p, w: _data_free(w, configs.quantizer))
    return _per_layer(weights, "gptq", lambda p, w: gptq_layer(w, stats[p].hessian, configs.quantizer, configs.gptq))


def _lowrank_first(weights, configs, calibration, execution, base: str):
    """`base` on the residuals R of W = R + up · down (the rank-r branch split off W itself,
    passes/lowrank.py), each layer keeping its branch: y = Q(R)(x) + (x · downᵀ) · upᵀ, exact in
    full precision for any base. For bases whose transforms are orthogonal (a rotation Q: the
    leading singular directions of W·Q are those of W, turned) or none, splitting before or after
    the transform gives the same branch and residual; for a base that scales channels first
    (lrq-dit's smoothing, d2quant's column scales) the branch is W's own, not the scaled weight's
    as svdquant's is."""
    from .lowrank import lowrank_rank, lowrank_split

    split = {p: lowrank_split(w, r, w.dtype) if (r := lowrank_rank(*w.shape, configs.lowrank.rank)) else (w, None)
             for p, w in weights.items()}
    layers = RECIPES[base]({p: residual for p, (residual, _) in split.items()}, configs, calibration, execution)
    return {p: layer if (branch := split[p][1]) is None else
            dataclasses.replace(layer, lowrank=branch, method=f"{layer.method} +lowrank r{branch.rank}")
            for p, layer in layers.items()}


def _clq_recipe(weights, configs, calibration, execution, parts: Components):
    return clq_quantize(weights, configs, calibration, parts, execution)


def _adatsq_recipe(weights, configs, calibration, execution):
    """AdaTSQ (passes/adatsq.py): each candidate by the base recipe, then the bit allocation."""
    from .adatsq import adatsq

    def base(chosen, candidate_configs):
        return RECIPES[configs.adatsq.base](chosen, candidate_configs, calibration, execution)

    return adatsq(weights, configs, calibration, execution, base)


RECIPES: dict[str, Recipe] = {
    "rtn": _rtn_recipe,
    "smoothquant": _smoothquant_recipe,
    "quarot": _quarot_recipe,
    "gptq": _gptq_recipe,
    "quarot+gptq": partial(_quarot_recipe, gptq=True),
    "clq": partial(_clq_recipe, parts=Components()),
    "clq-no-cbc": partial(_clq_recipe, parts=Components(cbc=False)),
    "clq-no-obs": partial(_clq_recipe, parts=Components(obs=False)),
    "clq-no-clps": partial(_clq_recipe, parts=Components(clps=False)),
    "clq+gptq": partial(_clq_recipe, parts=Components(gptq=True)),
    "svdquant": _svdquant_recipe,
    "clq+lowrank": partial(_clq_recipe, parts=Components(lowrank=True)),
    "clq+gptq+lowrank": partial(_clq_recipe, parts=Components(gptq=True, lowrank=True)),
    "rtn+lowrank": partial(_lowrank_first, base="rtn"),
    "gptq+lowrank": partial(_lowrank_first, base="gptq"),
    "quarot+lowrank": partial(_lowrank_first, base="quarot"),
    "quarot+gptq+lowrank": partial(_lowrank_first, base="quarot+gptq"),
    "lrq-dit": _lrq_dit_recipe,
    "lrq-dit+lowrank": partial(_lowrank_first, base="lrq-dit"),
    "d2quant": _d2quant_recipe,
    "d2quant+lowrank": partial(_lowrank_first, base="d2quant"),
    "adatsq": _adatsq_recipe,
}


def run_recipe(recipe: str, weights: dict[str, torch.Tensor], configs: MethodConfigs,
               calibration: list[GraphCalibration] | None, execution: Execution) -> dict[str, QuantizedLinear]:
    """Quantize `weights` ({module path: [out, in] weight}) with the recipe named `recipe`."""
    return RECIPES[recipe](weights, configs, calibration, execution)
