"""Mean correction: the activation side of D²Quant's deviation-aware correction (DAC).

A quantized layer's output deviates from full precision by e_t = y_t − ŷ_t at token t. Its mean
over tokens, Δ = E_t[e_t] per output channel, is not noise: it shifts every activation downstream
by the same amount at every token (for a weight-only layer Δ = μ_x · (W − Ŵ)ᵀ exactly, a function
of the input mean μ_x alone). Adding Δ to the layer's bias makes the quantized layer's output mean
on the calibration tokens equal full precision's:

    b' = b + E_t[y_t − ŷ_t],   so   E_t[ŷ_t + Δ] = E_t[y_t].

D²Quant applies the shift inside the LayerNorm that feeds the layer; here it goes into the layer's
own bias (QuantizedLinear.bias, which lowering and the artifact already carry), which matches the
mean of every layer reading one LayerNorm separately (q, k and v would need three shifts of one
LayerNorm). Inputs are the full-precision model's activations on the recorded calls, so Δ
corrects each layer's own deviation, measured in the coordinates the layer works in (a
transform folded across layers included, as `observers.layer_errors` measures them).
"""

from __future__ import annotations

import dataclasses

import torch

from .layer import QuantizedLinear
from .observers import GraphCalibration, observe


def output_mean_deviations(calibrations: list[GraphCalibration], layers: dict[str, QuantizedLinear],
                           kernels: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """({path: Δ float64 [N]}, {path: the graph's bias of the layer}) over every recorded call."""
    total: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    biases: dict[str, torch.Tensor | None] = {}

    def folded(t, transform):
        return t if transform is None else transform.apply(t)

    def record(site, x, weight, bias, y):
        layer = layers[site.path]
        reference = folded(y, layer.fold_out).double()
        estimate = layer.forward(folded(x, layer.fold_in), bias, kernels).double()
        rows = (reference - estimate).reshape(-1, reference.shape[-1])
        total[site.path] = total.get(site.path, 0) + rows.sum(dim=0)
        count[site.path] = count.get(site.path, 0) + rows.shape[0]
        biases.setdefault(site.path, bias)

    observe(calibrations, set(layers), record, desc="mean correction")
    return {p: total[p] / count[p] for p in total if count[p]}, biases


def correct_means(calibrations: list[GraphCalibration], layers: dict[str, QuantizedLinear],
                  kernels: str) -> dict[str, QuantizedLinear]:
    """`layers` with each one's own bias moved by its output mean deviation Δ (see the module
    docstring); layers no recorded call reached are returned as they were."""
    deviations, biases = output_mean_deviations(calibrations, layers, kernels)
    corrected = dict(layers)
    for path, delta in deviations.items():
        layer = layers[path]
        base = layer.bias if layer.bias is not None else biases[path]
        bias = delta if base is None else base.detach().double() + delta
        dtype = torch.float32 if base is None else base.dtype
        corrected[path] = dataclasses.replace(
            layer, bias=bias.to(dtype),
            notes=[*layer.notes, f"mean correction: bias moved by |Δ|max {float(delta.abs().max()):.3g}"])
    return corrected
