"""The Triton path of `clq::quant_linear`: activation-quantize kernel, then the integer GEMM.

Same arguments and same result as `quant_linear_reference` (kernels/reference.py). On CPU tensors
the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels are
defined), which the tests use; on CUDA they are compiled and autotuned.
"""

from __future__ import annotations

import torch

from .reference import quant_linear_reference
from .triton_gemm import quant_matmul
from .triton_quantize import interpreted, quantize_activation_triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_arguments(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                     w_zero: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, w_bits: int,
                     a_bits: int, w_group: int, a_group: int) -> None:
    k = in_features
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] (in_features = {k}); got shape {tuple(x.shape)}")
    if w_bits not in (4, 8):
        raise ValueError(f"w_bits must be 4 or 8; got {w_bits}")
    if a_bits not in (4, 8, 16):
        raise ValueError(f"a_bits must be 4, 8 or 16 (not quantized); got {a_bits}")
    for name, g in (("w_group", w_group), ("a_group", a_group)):
        if g < 0 or (g and k % g):
            raise ValueError(f"{name} must be 0 (one group per row) or divide in_features = {k}; got {g}")
    wanted = (torch.uint8, k // 2) if w_bits == 4 else (torch.int8, k)
    if qweight.dim() != 2 or (qweight.dtype, qweight.shape[1]) != wanted:
        raise ValueError(f"qweight for w_bits={w_bits} must be {wanted[0]} [N, {wanted[1]}]; got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    scale_shape = (n, k // (w_group or k))
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != scale_shape:
        raise ValueError(f"w_scale must be float32 {list(scale_shape)}; got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.dtype != torch.int8 or tuple(w_zero.shape) != scale_shape):
        raise ValueError(f"w_zero must be int8 {list(scale_shape)} or None; got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}]; got {tuple(bias.shape)}")
    if not x.is_cuda and not interpreted():
        raise RuntimeError(
            "the Triton kernels of clq::quant_linear run on CUDA tensors, or on CPU tensors under "
            "Triton's interpreter: set TRITON_INTERPRET=1 in the environment before importing "
            "clq_compile, or use options={'kernels': 'reference'}")


def quant_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        w_zero: torch.Tensor | None, bias: torch.Tensor | None,
                        act_mul: torch.Tensor | None, act_perm: torch.Tensor | None,
                        act_rotation: torch.Tensor | None, in_features: int, w_bits: int,
                        a_bits: int, w_group: int, a_group: int) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype.  Arguments as `clq::quant_linear` documents them."""
    _check_arguments(x, qweight, w_scale, w_zero, bias, in_features, w_bits, a_bits, w_group, a_group)
    if a_bits >= 16:
        # Weight-only layers (M = batch size for the conditioning GEMMs they serve) are small: a
        # dequantized weight and a float matmul, exactly as the reference computes them.
        return quant_linear_reference(x, qweight, w_scale, w_zero, bias, act_mul, act_perm, act_rotation,
                                      in_features, w_bits, a_bits, w_group, a_group)
    lead = x.shape[:-1]
    xq, x_scale = quantize_activation_triton(x.reshape(-1, in_features), a_bits, a_group or None,
                                             act_mul, act_perm, act_rotation)
    out = quant_matmul(xq, x_scale, qweight, w_scale, w_zero, bias, in_features, a_bits, w_bits, a_group,
                       w_group, x.dtype)
    return out.reshape(*lead, qweight.shape[0])
