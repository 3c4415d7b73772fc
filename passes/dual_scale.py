"""Dual-scale quantization (DSQ) of D²Quant, for the feed-forward down projections.

A down projection W [N, K] reads the feed-forward's wide hidden state (K = 4N in a DiT), whose
channels differ in range by orders of magnitude; so do W's columns. One scale per row (or group)
then serves columns of very different size. DSQ gives every weight two scales,

    W_nk ≈ s_{n,g(k)} · t_k · q_nk,

the row's (group's) scale s as usual and a per-column scale t shared by all rows. t is absorbable:
x · Wᵀ = (x · diag(t)) · (W · diag(1/t))ᵀ, so the stored weight is Q(W · diag(1/t)) with exactly
the bits and scales of plain quantization, and t becomes the op's channel multiplier on the input
(`act_mul`: fused into the input's read, K 16-bit numbers per layer; where the layer has a linear
producer it could be folded into that producer's rows as SmoothQuant's factor is).

t is fitted alternately: with t fixed, W · diag(1/t) is rounded to nearest (s and q); with s and q
fixed, each column's t_k is the least-squares fit Σ_n W_nk s_n q_nk / Σ_n (s_n q_nk)², exact per
column (the rows' scales do not depend on one column alone, so the two steps alternate). Every
iterate, and t = 1 (plain quantization), is scored on the layer's output error on calibration
inputs, through the op; the best is kept, so DSQ never does worse than plain rounding there.
D²Quant's own fitting procedure was not public when this was written: this is our reading of its
abstract ("a dual-scale quantizer tailored to down-projection matrices, with an absorbable
scaling factor ... without increasing the bit budget").
"""

from __future__ import annotations

import dataclasses

import torch

from clq_compile.kernels.quantize import MIN_SCALE, quantize

from .configs import QuantizerConfig
from .layer import ActivationTransform, QuantizedLinear
from .rotation import rotate_weight
from .weight_quantization import rtn

ITERATIONS = 4
# Column scales are kept within this factor of 1 either way: an input channel multiplied by 1e6
# would overflow a 16-bit activation.
MAX_FACTOR = 64.0


def column_scales(weight: torch.Tensor, quantizer: QuantizerConfig, t: torch.Tensor) -> torch.Tensor:
    """One alternating step: the float64 [K] least-squares column scales for the codes and row
    scales that rounding W · diag(1/t) gives (see the module docstring), t [K] the current ones."""
    w = weight.detach().double()
    wq = quantizer.weight
    q = quantize((w / t).float(), wq.format, wq.symmetric, wq.group)
    base = q.dequantize().double()  # s_n (q_nk − z) per element
    num = (w * base).sum(dim=0)
    den = base.square().sum(dim=0)
    # base ≈ W · diag(1/t), so the fit is the new t itself. A column whose codes all round to zero
    # keeps its scale, and so does one whose fit is not positive (a scale's sign cannot flip).
    fitted = num / den.clamp(min=MIN_SCALE)
    fitted = torch.where((den > 0) & (fitted > 0), fitted, t.double())
    return fitted.clamp(1 / MAX_FACTOR, MAX_FACTOR)


def _dual_scaled(weight: torch.Tensor, t: torch.Tensor, quantizer: QuantizerConfig) -> QuantizedLinear:
    act_mul = t.float()
    layer = rtn(rotate_weight(weight, act_mul=act_mul), quantizer)
    return dataclasses.replace(layer, online=ActivationTransform(mul=act_mul))


def dsq_layer(weight: torch.Tensor, x: torch.Tensor, quantizer: QuantizerConfig,
              iterations: int = ITERATIONS) -> tuple[QuantizedLinear, torch.Tensor | None]:
    """DSQ of weight [N, K] with calibration inputs x [T, K]: (the layer, rounded to nearest, whose
    output error on x is least among plain rounding and the `iterations` alternating fits, and its
    column scales t, None when plain rounding won)."""
    xs = x.detach().reshape(-1, weight.shape[1]).float()
    reference = xs.double() @ weight.detach().double().t()

    def error(layer):
        return float((layer.forward(xs, None, "reference").double() - reference).square().sum())

    best, best_t = rtn(weight, quantizer), None
    best_error = error(best)
    t = torch.ones(weight.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        t = column_scales(weight, quantizer, t)
        layer = _dual_scaled(weight, t, quantizer)
        e = error(layer)
        if e < best_error:
            best, best_t, best_error = layer, t, e
    return best, best_t
