"""The compiled path of `clq::quant_linear`, dispatched on the layer's number formats.

- integer weights and activations (int4 / int8): the activation-quantize kernel, then the integer
  GEMM (generated Triton, kernels/triton_quantize.py and kernels/triton_gemm.py);
- e4m3 weights and activations: torch._scaled_mm with rowwise scales (kernels/float8_linear.py);
- weight-only layers (activation format "none", integer weights): the weight-only GEMM, which
  dequantizes the weight tile in registers and multiplies in x's 16-bit dtype
  (kernels/triton_weight_only.py); the online transform, if any, runs first in float32;
- twin-log weights (tlq3 / tlq4, non-uniform): the weight-only GEMM decoding them, on activations
  quantized by the quantize kernel and decoded to x's dtype (or left as they are).

Same arguments and same result as `quant_linear_reference` (kernels/reference.py). On CPU tensors
the Triton kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels
are defined), which the tests use; on CUDA they are compiled.
"""

from __future__ import annotations

import torch

from .float8_linear import float8_linear
from .formats import INTEGER_GEMM, SCALED_MM, WEIGHT_ONLY, NumberFormat, check_pair, get_format
from .packing import unpack_int4
from .reference import quant_linear_reference, transform_activation
from .triton_gemm import quant_matmul
from .triton_quantize import interpreted, quantize_activation_triton
from .triton_weight_only import weight_only_matmul

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_arguments(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                     w_zero: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, w_format: str,
                     a_format: str, w_group: int, a_group: int) -> None:
    k = in_features
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] (in_features = {k}); got shape {tuple(x.shape)}")
    w_fmt, a_fmt = get_format(w_format), get_format(a_format)
    if not w_fmt.quantizes:
        raise ValueError(f"w_format must be a weight format ({w_format!r} leaves values unquantized)")
    check_pair(w_fmt, a_fmt)
    for name, g in (("w_group", w_group), ("a_group", a_group)):
        if g < 0 or (g and k % g):
            raise ValueError(f"{name} must be 0 (one group per row) or divide in_features = {k}; got {g}")
    problem = w_fmt.width_problem(k)
    if problem:
        raise ValueError(f"a {w_format} weight cannot have in_features = {k}: {problem}")
    wanted = w_fmt.storage(k)
    if qweight.dim() != 2 or (qweight.dtype, qweight.shape[1]) != wanted:
        raise ValueError(f"qweight for w_format={w_format!r} must be {wanted[0]} [N, {wanted[1]}]; got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    scale_shape = w_fmt.scale_shape(n, k, w_group or None)
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


def _decoded_activations(rows: torch.Tensor, act_mul, act_perm, act_rotation, w_fmt: NumberFormat,
                         a_fmt: NumberFormat, a_group: int) -> torch.Tensor:
    """For a twin-log weight, which has no integer product: the activations quantized by the
    quantize kernel and decoded back to x's dtype, for the weight-only GEMM to multiply. This runs
    at the 16-bit GEMM's rate; the gain is the weight's memory."""
    if not a_fmt.integer:
        raise ValueError(f"no compiled kernel multiplies {w_fmt.name} weights with {a_fmt.name} activations; "
                         f"use options={{'kernels': 'reference'}}")
    q, scale = quantize_activation_triton(rows, a_fmt.bits, a_group or None, act_mul, act_perm, act_rotation)
    codes = unpack_int4(q) if a_fmt.bits == 4 else q
    return a_fmt.dequantize(codes, scale, None, a_group or None).to(rows.dtype)


def quant_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                        w_zero: torch.Tensor | None, bias: torch.Tensor | None,
                        act_mul: torch.Tensor | None, act_perm: torch.Tensor | None,
                        act_rotation: torch.Tensor | None, in_features: int, w_format: str,
                        a_format: str, w_group: int, a_group: int) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x's dtype.  Arguments as `clq::quant_linear` documents them."""
    _check_arguments(x, qweight, w_scale, w_zero, bias, in_features, w_format, a_format, w_group, a_group)
    w_fmt, a_fmt = get_format(w_format), get_format(a_format)
    lead = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    if not a_fmt.quantizes and WEIGHT_ONLY not in w_fmt.kernels:
        return quant_linear_reference(x, qweight, w_scale, w_zero, bias, act_mul, act_perm, act_rotation,
                                      in_features, w_format, a_format, w_group, a_group)
    if not a_fmt.quantizes or (not w_fmt.uniform and WEIGHT_ONLY in w_fmt.kernels):
        # The weight-only GEMM: integer weights dequantized, or twin-log ones decoded, in registers.
        if a_fmt.quantizes:
            rows = _decoded_activations(rows, act_mul, act_perm, act_rotation, w_fmt, a_fmt, a_group)
        elif any(t is not None for t in (act_mul, act_perm, act_rotation)):
            rows = transform_activation(rows.float(), act_mul, act_perm, act_rotation).to(x.dtype)
        out = weight_only_matmul(rows, qweight, w_scale, w_zero, bias, in_features, w_fmt.bits, w_group, x.dtype,
                                 twin_log=not w_fmt.uniform)
    elif SCALED_MM in w_fmt.kernels and SCALED_MM in a_fmt.kernels:
        out = float8_linear(rows, qweight, w_scale, bias, act_mul, act_perm, act_rotation, a_fmt, w_group, a_group)
    elif INTEGER_GEMM in w_fmt.kernels and INTEGER_GEMM in a_fmt.kernels:
        xq, x_scale = quantize_activation_triton(rows, a_fmt.bits, a_group or None, act_mul, act_perm,
                                                 act_rotation)
        out = quant_matmul(xq, x_scale, qweight, w_scale, w_zero, bias, in_features, a_fmt.bits, w_fmt.bits,
                           a_group, w_group, x.dtype)
    else:
        raise ValueError(f"no compiled kernel multiplies {w_format} weights with {a_format} activations; "
                         f"use options={{'kernels': 'reference'}}")
    return out.reshape(*lead, qweight.shape[0])
