"""Recipes: named pass pipelines that decide the quantization of every selected layer.

A recipe takes the weights to quantize (by module path), the options and, when the user
calibrated, the recorded calls of each captured graph; it returns one `QuantizedLinear` per path.
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

Recipes that need data quantize round-to-nearest when called without calibration, and say so.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from .cross_block import Components, clq_quantize
from .layer import QuantizedLinear
from .observers import GraphCalibration, observe
from .statistics import LayerStats
from .weight_quantization import rtn

if TYPE_CHECKING:
    from clq_compile.options import Options

Recipe = Callable[[dict[str, torch.Tensor], "Options", "list[GraphCalibration] | None"],
                  dict[str, QuantizedLinear]]


def _statistics(weights: dict[str, torch.Tensor], calibration: list[GraphCalibration] | None,
                hessian: bool) -> dict[str, LayerStats] | None:
    """Input statistics of every layer on the full-precision model's recorded calls."""
    if not calibration:
        return None
    stats = {p: LayerStats(w.shape[1], hessian=hessian) for p, w in weights.items()}

    def record(site, x, weight, bias, y):
        stats[site.path].add(x)

    observe(calibration, set(weights), record, desc="calibration statistics")
    return stats


def _per_layer(weights: dict[str, torch.Tensor], name: str, quantize_one) -> dict[str, QuantizedLinear]:
    return {p: quantize_one(p, w) for p, w in tqdm(weights.items(), desc=name, leave=False,
                                                   disable=len(weights) < 50)}


def _data_free(weight: torch.Tensor, options: Options) -> QuantizedLinear:
    layer = rtn(weight, options)
    layer.method = "data-free: rtn"
    return layer


def _rtn_recipe(weights, options, calibration):
    """Round to nearest with min-max ranges; needs no calibration data."""
    return _per_layer(weights, "rtn", lambda p, w: rtn(w, options))


def _smoothquant_recipe(weights, options, calibration):
    from .smoothquant import smoothquant_layer

    stats = _statistics(weights, calibration, hessian=False)
    if stats is None:
        return _per_layer(weights, "smoothquant", lambda p, w: _data_free(w, options))
    layers = _folded_smoothquant(weights, options, calibration, stats) if options.fold else {}
    rest = {p: w for p, w in weights.items() if p not in layers}
    return {**layers, **_per_layer(rest, "smoothquant", lambda p, w: smoothquant_layer(
        w, stats[p].samples, stats[p].absmax, options))}


def _folded_smoothquant(weights, options, calibration, stats) -> dict[str, QuantizedLinear]:
    """SmoothQuant for the fold groups (passes/folding.py): consumers share one s, searched
    jointly, and read their input already divided by s from the producers' scaled output rows."""
    from .folding import find_folds
    from .smoothquant import smoothquant_layer, smoothquant_shared

    layers: dict[str, QuantizedLinear] = {}
    for cal in calibration:
        paths = {x.node: x.path for x in cal.analysis.sites}
        biases = {x.path: None if x.bias_index is None else cal.state[x.bias_index] for x in cal.analysis.sites}
        for group in find_folds(cal.gm, cal.analysis, {n for n, p in paths.items() if p in weights}):
            decisions = {paths[n]: d for n, d in group.decisions(paths).items()}
            producers = [paths[n] for n in group.producers]
            consumers = [paths[n] for n in group.consumers]
            if any(p in layers for p in decisions):
                continue
            absmax = torch.stack([stats[c].absmax for c in consumers]).amax(dim=0)
            shared = smoothquant_shared([weights[c] for c in consumers], [stats[c].samples for c in consumers],
                                        absmax, options)
            mul = shared[0].act_mul
            for path, layer in zip(consumers, shared):
                layer.act_mul, layer.fold_in = None, (mul, None, None)
                layer.notes.append(f"smoothing folded into {', '.join(producers)}")
                layer.details["fold"] = decisions[path]
                layers[path] = layer
            for path in producers:
                rows = weights[path].detach().double() * mul.double()[:, None]
                layer = smoothquant_layer(rows, stats[path].samples, stats[path].absmax, options)
                bias = biases[path]
                layer.bias = None if bias is None else (bias.detach().double() * mul.double()).float()
                layer.fold_out = (mul, None, None)
                layer.notes.append(f"output rows carry the smoothing of {', '.join(consumers)}")
                layer.details["fold"] = decisions[path]
                layers[path] = layer
    return layers


def _quarot_recipe(weights, options, calibration, gptq: bool = False):
    from .rotation import quarot_layer, rotate_hessian, rotate_weight

    if not gptq:
        return _per_layer(weights, "quarot", lambda p, w: quarot_layer(w, options))
    from .gptq import gptq_layer

    stats = _statistics(weights, calibration, hessian=True)

    def one(path, w):
        layer = quarot_layer(w, options)
        if stats is None:
            return layer
        r = layer.act_rotation
        rotated = gptq_layer(rotate_weight(w, act_rotation=r).float(),
                             rotate_hessian(stats[path].hessian, act_rotation=r), options,
                             act_order=options.gptq_act_order)
        rotated.act_rotation, rotated.method, rotated.notes = r, "quarot+gptq", layer.notes
        return rotated

    return _per_layer(weights, "quarot+gptq", one)


def _gptq_recipe(weights, options, calibration):
    from .gptq import gptq_layer

    stats = _statistics(weights, calibration, hessian=True)
    if stats is None:
        return _per_layer(weights, "gptq", lambda p, w: _data_free(w, options))
    return _per_layer(weights, "gptq", lambda p, w: gptq_layer(
        w, stats[p].hessian, options, act_order=options.gptq_act_order))


def _clq_recipe(weights, options, calibration, parts: Components):
    return clq_quantize(weights, options, calibration, parts)


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
}


def run_recipe(weights: dict[str, torch.Tensor], options: Options,
               calibration: list[GraphCalibration] | None) -> dict[str, QuantizedLinear]:
    """Quantize `weights` ({module path: [out, in] weight}) with the recipe `options.recipe`."""
    return RECIPES[options.recipe](weights, options, calibration)
