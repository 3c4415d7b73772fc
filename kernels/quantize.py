"""Uniform integer quantizers for weights and activations.

The math, for b bits and a group of values v (a row of a weight, or a token of an activation,
or a `group`-wide slice of either along the input dimension K):

- symmetric:  s = max|v| / (2^(b-1) - 1),            q = clamp(round(v / s), -2^(b-1), 2^(b-1) - 1),  v ~ s * q
- asymmetric: s = (max(v, 0) - min(v, 0)) / (2^b - 1), z = round(-min(v, 0) / s),
              q = clamp(round(v / s) + z, 0, 2^b - 1),  v ~ s * (q - z)

The range always contains 0, so z lies in [0, 2^b - 1] and zero is represented exactly.
Clipping multiplies the range's ends by ratios in (0, 1] before the scale is computed.
Scales are float32 with shape [rows, K // group] (one column when `group` is None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale allowed: an all-zero group quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range [qmin, qmax] of a `bits`-bit quantizer."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grouped(v: torch.Tensor, group: int | None) -> torch.Tensor:
    """v: [rows, K] -> [rows, K // group, group] (one group of K when `group` is None)."""
    rows, k = v.shape
    g = k if group is None else group
    if k % g:
        raise ValueError(f"group size {g} does not divide the input width {k}")
    return v.reshape(rows, k // g, g)


@dataclass(frozen=True)
class Quantized:
    """Integers and the parameters that map them back to real numbers.

    q:     int16 [rows, K]  (values in qrange(bits, symmetric))
    scale: float32 [rows, K // group]
    zero:  int16 [rows, K // group] for asymmetric quantization, else None
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int | None

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, K]: scale * (q - zero), group by group."""
        qg = _grouped(self.q.float(), self.group)
        if self.zero is not None:
            qg = qg - self.zero.float().unsqueeze(-1)
        return (qg * self.scale.unsqueeze(-1)).reshape(self.q.shape)


def quantize(v: torch.Tensor, bits: int, symmetric: bool = True, group: int | None = None,
             clip: tuple[float, float] = (1.0, 1.0)) -> Quantized:
    """Quantize v: [rows, K] row by row (or group by group along K).

    clip = (lower, upper): ratios applied to the minimum and maximum of each group; a symmetric
    quantizer uses the larger clipped magnitude. (1, 1) is plain min-max.
    """
    if v.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, K]; got shape {tuple(v.shape)}")
    lo_ratio, hi_ratio = clip
    if not (0 < lo_ratio <= 1 and 0 < hi_ratio <= 1):
        raise ValueError(f"clip ratios must lie in (0, 1]; got {clip}")
    vg = _grouped(v.float(), group)
    vmin = vg.amin(dim=-1).clamp(max=0) * lo_ratio
    vmax = vg.amax(dim=-1).clamp(min=0) * hi_ratio
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(-vmin, vmax) / qmax).clamp(min=MIN_SCALE)
        q = torch.round(vg / scale.unsqueeze(-1)).clamp(qmin, qmax)
        zero = None
    else:
        scale = ((vmax - vmin) / qmax).clamp(min=MIN_SCALE)
        zero = torch.round(-vmin / scale).clamp(qmin, qmax)
        q = (torch.round(vg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(qmin, qmax)
        zero = zero.to(torch.int16)
    return Quantized(q.reshape(v.shape).to(torch.int16), scale, zero, bits, group)


def quantize_activation(x: torch.Tensor, bits: int, group: int | None = None) -> Quantized:
    """Dynamic symmetric quantization of activations x: [tokens, K], one scale per token (or group)."""
    return quantize(x, bits, symmetric=True, group=group)
