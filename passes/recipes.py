"""Recipes: named pass pipelines that decide the quantization of every selected layer.

A recipe takes the weights to quantize (by module path), the options and, when the user
calibrated, the recorded calls of each captured graph; it returns one `QuantizedLinear` per path.
Recipes are data in `RECIPES`, so the same graph gives every method's result for a comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm


from .layer import QuantizedLinear
from .observers import GraphCalibration
from .weight_quantization import rtn

if TYPE_CHECKING:
    from clq_compile.options import Options

Recipe = Callable[[dict[str, torch.Tensor], "Options", "list[GraphCalibration] | None"],
                  dict[str, QuantizedLinear]]


def _rtn_recipe(weights: dict[str, torch.Tensor], options: Options,
                calibration: list[GraphCalibration] | None) -> dict[str, QuantizedLinear]:
    """Round to nearest with min-max ranges; needs no calibration data."""
    return {path: rtn(w, options) for path, w in tqdm(weights.items(), desc="rtn", leave=False,
                                                       disable=len(weights) < 50)}


RECIPES: dict[str, Recipe] = {"rtn": _rtn_recipe}


def run_recipe(weights: dict[str, torch.Tensor], options: Options,
               calibration: list[GraphCalibration] | None) -> dict[str, QuantizedLinear]:
    """Quantize `weights` ({module path: [out, in] weight}) with the recipe `options.recipe`."""
    return RECIPES[options.recipe](weights, options, calibration)
