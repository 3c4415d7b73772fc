"""The e4m3 linear layer on torch._scaled_mm: float8 weights and activations, rowwise scales.

y = (Q(T(x)) · Wqᵀ) · s_x[:, None] · s_w[None, :] + bias, with T the online activation transform,
Q dynamic per-token e4m3 quantization (kernels/quantize.py) and Wq the stored e4m3 weight with
one scale per output channel. torch._scaled_mm (a well-kept kernel: cuBLASLt on CUDA sm_89+, a
CPU implementation too) multiplies the codes with float32 accumulation and applies both scales,
as the reference does (kernels/reference.py).

Where _scaled_mm cannot compute a layer exactly as the reference would (CUDA before sm_89, widths
that are not multiples of 16, a 16-bit output other than bfloat16 on CUDA, a CPU build without
rowwise scales: torch 2.11's takes per-tensor scales only), the reference computes it: slower,
never different.
"""

from __future__ import annotations

import functools

import torch

from .formats import NumberFormat
from .quantize import quantize_activation
from .reference import quant_linear_reference, transform_activation
from .triton_gemm import _capability


def _scaled_mm_fits(x: torch.Tensor, n: int) -> bool:
    """Whether _scaled_mm takes this layer as it is: on CPU where this torch build takes rowwise
    scales there; on CUDA (cuBLASLt) sm_89+, K and N multiples of 16 and a bfloat16 model (rowwise
    scales give a bfloat16 output there)."""
    if not x.is_cuda:
        return _cpu_takes_rowwise_scales()
    return (_capability(x.device) >= 89 and x.shape[1] % 16 == 0 and n % 16 == 0
            and x.dtype == torch.bfloat16)


@functools.cache
def _cpu_takes_rowwise_scales() -> bool:
    """Whether this torch build's CPU _scaled_mm accepts scales [M, 1] and [1, N] (2.13 does; 2.11
    raises, taking one scale per tensor only). Asked once, on a 16 x 16 product."""
    codes = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(codes, codes.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def float8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  act_mul: torch.Tensor | None, act_perm: torch.Tensor | None,
                  act_rotation: torch.Tensor | None, a_fmt: NumberFormat, w_group: int,
                  a_group: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype.

    qweight: float8_e4m3fn [N, K]; w_scale: float32 [N, K // w_group]; arguments as
    `clq::quant_linear` documents them. _scaled_mm's rowwise scaling has no groups along K: grouped
    layers go to the reference.
    """
    n, k = qweight.shape
    if w_group or a_group or not _scaled_mm_fits(x, n):
        return quant_linear_reference(x, qweight, w_scale, None, bias, act_mul, act_perm, act_rotation, k,
                                      "e4m3", a_fmt.name, w_group, a_group)
    xa = quantize_activation(transform_activation(x.float(), act_mul, act_perm, act_rotation), a_fmt)
    out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    out = torch._scaled_mm(xa.q, qweight.t(), scale_a=xa.scale.contiguous(),
                           scale_b=w_scale.t().contiguous(), out_dtype=out_dtype)
    if bias is not None:
        out = out.float() + bias.float()
    return out.to(x.dtype)
