"""The quantizer: scales from min-max (or clipped) ranges, values to the codes of a number format.

The math, for a format with code range [qmin, qmax] (kernels/formats.py) and a group of values v
(a row of a weight, or a token of an activation, or a `group`-wide slice of either along the input
dimension K):

- symmetric:  s = max|v| / qmax,                          q = encode(v / s),      v ~ s * q
- asymmetric: s = (max(v, 0) - min(v, 0)) / (qmax - qmin), z = round(-min(v, 0) / s),
              q = encode(v / s) + z (clamped),            v ~ s * (q - z)       (integer formats)

For a b-bit integer format qmax = 2^(b-1) - 1 (symmetric) or 2^b - 1 (asymmetric, qmin = 0) and
encode rounds to the nearest integer and clamps; for float8 e4m3 qmax = 448 and encode rounds to
the nearest e4m3 value. The range always contains 0, so z lies in [qmin, qmax] and zero is
represented exactly. Clipping multiplies the range's ends by ratios in (0, 1] before the scale is
computed. Scales are float32 with shape [rows, K // group] (one column when `group` is None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import NumberFormat, as_format, integer_format

# Smallest scale allowed: an all-zero group quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range [qmin, qmax] of a `bits`-bit quantizer."""
    return integer_format(bits).qrange(symmetric)


def _grouped(v: torch.Tensor, group: int | None) -> torch.Tensor:
    """v: [rows, K] -> [rows, K // group, group] (one group of K when `group` is None)."""
    rows, k = v.shape
    g = k if group is None else group
    if k % g:
        raise ValueError(f"group size {g} does not divide the input width {k}")
    return v.reshape(rows, k // g, g)


@dataclass(frozen=True)
class Quantized:
    """Codes and the parameters that map them back to real numbers.

    q:      [rows, K] codes in format.code_dtype (int16 for integers, in format.qrange(symmetric))
    scale:  float32 [rows, K // group]
    zero:   int16 [rows, K // group] for asymmetric quantization, else None
    format: the number format (kernels/formats.py)
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    format: NumberFormat
    group: int | None

    @property
    def bits(self) -> int:
        return self.format.bits

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, K]: scale * (q - zero), group by group (a non-uniform format: its decoding)."""
        return self.format.dequantize(self.q, self.scale, self.zero, self.group)


def quantize(v: torch.Tensor, fmt: NumberFormat | int, symmetric: bool = True, group: int | None = None,
             clip: tuple[float, float] = (1.0, 1.0)) -> Quantized:
    """Quantize v: [rows, K] row by row (or group by group along K) to the codes of `fmt`.

    fmt: a number format, or b for the b-bit integer format.
    clip = (lower, upper): ratios applied to the minimum and maximum of each group; a symmetric
    quantizer uses the larger clipped magnitude. (1, 1) is plain min-max.
    """
    fmt = as_format(fmt)
    if not (symmetric or fmt.asymmetric):
        raise ValueError(f"{fmt.name} is a symmetric format: it has no zero point")
    if v.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, K]; got shape {tuple(v.shape)}")
    lo_ratio, hi_ratio = clip
    if not (0 < lo_ratio <= 1 and 0 < hi_ratio <= 1):
        raise ValueError(f"clip ratios must lie in (0, 1]; got {clip}")
    vg = _grouped(v.float(), group)
    vmin = vg.amin(dim=-1).clamp(max=0) * lo_ratio
    vmax = vg.amax(dim=-1).clamp(min=0) * hi_ratio
    qmin, qmax = fmt.qrange(symmetric)
    if symmetric:
        scale = (torch.maximum(-vmin, vmax) / qmax).clamp(min=MIN_SCALE)
        q = fmt.encode(vg / scale.unsqueeze(-1), None)
        zero = None
    else:
        scale = ((vmax - vmin) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero = torch.round(-vmin / scale).clamp(qmin, qmax)
        q = fmt.encode(vg / scale.unsqueeze(-1), zero.unsqueeze(-1))
        zero = zero.to(torch.int16)
    return Quantized(q.reshape(v.shape).to(fmt.code_dtype), scale, zero, fmt, group)


def quantize_activation(x: torch.Tensor, fmt: NumberFormat | int, group: int | None = None) -> Quantized:
    """Dynamic symmetric quantization of activations x: [tokens, K], one scale per token (or group)."""
    return quantize(x, fmt, symmetric=True, group=group)
