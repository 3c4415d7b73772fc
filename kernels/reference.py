"""The torch reference of a quantized linear layer: the CPU path and the oracle for the kernels.

y = Q(T(x)) · Ŵᵀ + bias, where T is the layer's online activation transform (per-channel
multiplier, channel permutation, block rotation; each optional), Q dynamic symmetric quantization
to the activation format per token or per group, and Ŵ the stored quantized weight. For integer
formats the product is accumulated exactly in int32, chunk by chunk where groups need separate
scales; scales and zero-point corrections are applied in float32 afterwards (`scale_product`).
For e4m3 the codes are multiplied in float32 (each product of two e4m3 values is exact there: 4
significant bits times 4) and scaled the same way, as torch._scaled_mm does with rowwise scales.
Weight-only layers (activation format "none") multiply T(x) by the dequantized weight in float32,
and so do non-uniform (twin-log) weights with the dequantized Q(T(x)).
"""

from __future__ import annotations

import math

import torch

from .formats import check_pair, get_format
from .quantize import quantize_activation


def transform_activation(x: torch.Tensor, act_mul: torch.Tensor | None = None,
                         act_perm: torch.Tensor | None = None,
                         act_rotation: torch.Tensor | None = None) -> torch.Tensor:
    """x: [tokens, K] -> (x * act_mul)[:, act_perm] @ blockdiag(act_rotation, ...).

    act_mul: [K] per-channel multiplier; act_perm: int64 [K] gather index; act_rotation: [b, b]
    applied to each of the K // b consecutive blocks of channels (b = K is a full rotation).
    """
    if act_mul is not None:
        x = x * act_mul.to(x.dtype)
    if act_perm is not None:
        x = x.index_select(-1, act_perm)
    if act_rotation is not None:
        tokens, k = x.shape
        b = act_rotation.shape[0]
        if k % b:
            raise ValueError(f"rotation block {b} does not divide the input width {k}")
        x = (x.reshape(tokens, k // b, b) @ act_rotation.to(x.dtype)).reshape(tokens, k)
    return x


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product a · bᵀ.  a: int8 [M, K], b: int8 [N, K] -> int32 [M, N]."""
    if a.shape[1] < 2:
        # torch._int_mm on CPU (torch 2.13) returns wrong sums when K == 1.
        return (a.to(torch.int32) @ b.to(torch.int32).t())
    return torch._int_mm(a.contiguous(), b.t().contiguous())


def code_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · bᵀ of codes a [M, K], b [N, K]: exact int32 for integers, float32 for float8 codes."""
    if a.is_floating_point():
        return a.float() @ b.float().t()
    return int_matmul(a, b)


def scale_product(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """float32 [M, N] = acc · a_scale[:, None] · w_scale[None, :], with no overflow on the way.

    acc: int32 [M, N]; a_scale: float32 [M]; w_scale: float32 [N]. Activations near the float32
    limit have scales near 1e37 / qmax, so acc · a_scale can overflow where the product with the
    (small) weight scale is finite. a_scale = m · p is split exactly into m in [1, 2) and its
    power of two p, and ((acc · m) · w_scale) · p is computed: scaling by a power of two commutes
    with rounding, so this equals (acc · a_scale) · w_scale bit for bit wherever that has no
    overflow or underflow. Zero, subnormal and non-finite scales are used as they are (p = 1).
    """
    bits = a_scale.view(torch.int32)
    exponent = bits & 0x7F800000
    normal = (exponent != 0) & (exponent != 0x7F800000)
    m = torch.where(normal, ((bits & -0x7F800001) | 0x3F800000).view(torch.float32), a_scale)
    p = torch.where(normal, exponent.view(torch.float32), torch.ones_like(a_scale))
    return acc.float() * m[:, None] * w_scale[None, :] * p[:, None]


def quant_linear_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                           w_zero: torch.Tensor | None, bias: torch.Tensor | None,
                           act_mul: torch.Tensor | None, act_perm: torch.Tensor | None,
                           act_rotation: torch.Tensor | None, in_features: int, w_format: str,
                           a_format: str, w_group: int, a_group: int) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype.  Arguments as `clq::quant_linear` documents them."""
    k = in_features
    lead = x.shape[:-1]
    w_fmt, a_fmt = get_format(w_format), get_format(a_format)
    check_pair(w_fmt, a_fmt)
    xt = transform_activation(x.reshape(-1, k).float(), act_mul, act_perm, act_rotation)
    wq = w_fmt.unpack(qweight)
    n = wq.shape[0]
    wg = w_group or k
    if not a_fmt.quantizes:
        out = xt @ w_fmt.dequantize(wq, w_scale, w_zero, w_group or None).t()
    elif not w_fmt.uniform:
        # A non-uniform weight (twin-log) has no integer product: both sides decoded to float32.
        xa = quantize_activation(xt, a_fmt, a_group or None)
        out = xa.dequantize() @ w_fmt.dequantize(wq, w_scale, None, None).t()
    else:
        xa = quantize_activation(xt, a_fmt, a_group or None)
        xq = xa.q.to(wq.dtype)
        ag = a_group or k
        chunk = math.gcd(ag, wg)
        out = xt.new_zeros(xq.shape[0], n)
        for c0 in range(0, k, chunk):
            xc = xq[:, c0:c0 + chunk]
            acc = code_matmul(xc, wq[:, c0:c0 + chunk])
            if w_zero is not None:
                rowsum = xc.sum(dim=1, dtype=torch.int32)
                acc = acc - rowsum[:, None] * w_zero[:, c0 // wg].to(torch.int32)[None, :]
            out += scale_product(acc, xa.scale[:, c0 // ag], w_scale[:, c0 // wg])
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)
