"""Triton kernel for dynamic activation quantization with the online transform fused in.

One pass over x computes T(x) = (x * act_mul)[:, act_perm] @ blockdiag(act_rotation, ...) (each part
optional, see `transform_activation` in kernels/reference.py), a symmetric scale per token or per
`group` channels, and the rounded integers, packed two per byte for 4 bits (the nibble layout of
kernels/packing.py). The arithmetic follows `quantize_activation` operation by operation in float32
(correctly rounded divisions, ties to even), so the integers and scales equal the reference's
whenever T(x) does; T(x) itself can differ in the last bit where a rotation sums in another order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .quantize import MIN_SCALE

_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def _round_half_even(y):
    """Round float32 y to the nearest integer, ties to even (torch.round), as int32.

    libdevice's rint is not available in the interpreter, so it is built from floor: for
    a = |y| < 2^24, a - floor(a) is exact, which makes the tie test exact too.
    """
    # Anything past 2^24 is clamped to the quantizer's range afterwards anyway; the cap keeps the
    # int32 conversion defined.
    a = tl.minimum(tl.abs(y), 16777216.0)
    f = tl.floor(a)
    frac = a - f
    fi = f.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fi & 1) == 1))
    r = fi + up.to(tl.int32)
    return tl.where(y < 0, -r, r)


@triton.jit
def _load_channels(x_ptr, mul_ptr, perm_ptr, rows, row_mask, chans, chan_mask, stride_xm, stride_xk,
                   HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr):
    """float32 [rows, chans] of (x * act_mul)[:, act_perm] at output channels `chans`; 0 where masked."""
    if HAS_PERM:
        src = tl.load(perm_ptr + chans, mask=chan_mask, other=0)
    else:
        src = chans
    offsets = rows.to(tl.int64)[:, None] * stride_xm + src[None, :] * stride_xk
    v = tl.load(x_ptr + offsets, mask=row_mask[:, None] & chan_mask[None, :], other=0.0).to(tl.float32)
    if HAS_MUL:
        v = v * tl.load(mul_ptr + src, mask=chan_mask, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit
def _transformed_tile(x_ptr, mul_ptr, perm_ptr, rot_ptr, rows, row_mask, k0, K, R, stride_xm, stride_xk,
                      HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ROT: tl.constexpr,
                      ROT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """float32 [rows, BLOCK_K]: columns k0 .. k0 + BLOCK_K of T(x), inside one rotation block."""
    if HAS_ROT:
        # An output column of a rotation block depends on all R input channels of that block, so the
        # whole block is loaded (padded to a power of two) and multiplied by the tile's columns of R.
        r0 = (k0 // R) * R
        i = tl.arange(0, BLOCK_R)
        v = _load_channels(x_ptr, mul_ptr, perm_ptr, rows, row_mask, r0 + i, i < R, stride_xm, stride_xk,
                           HAS_MUL, HAS_PERM)
        c = (k0 - r0) + tl.arange(0, BLOCK_K)
        rot = tl.load(rot_ptr + i[:, None] * R + c[None, :], mask=(i < R)[:, None], other=0.0)
        return tl.dot(v, rot, input_precision=ROT_PRECISION)
    else:
        c = k0 + tl.arange(0, BLOCK_K)
        return _load_channels(x_ptr, mul_ptr, perm_ptr, rows, row_mask, c, c < K, stride_xm, stride_xk,
                              HAS_MUL, HAS_PERM)


@triton.jit
def _store_quantized(v, scale, q_ptr, rows, row_mask, k0, K, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Quantize the tile v [BLOCK_M, BLOCK_K] with per-row `scale`; store it at columns k0 .. k0 + BLOCK_K."""
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    q = _round_half_even(tl.math.div_rn(v, scale[:, None]))
    q = tl.minimum(tl.maximum(q, -QMAX - 1), QMAX)
    rows64 = rows.to(tl.int64)
    if BITS == 4:
        even, odd = tl.split(tl.reshape(q, [BLOCK_M, BLOCK_K // 2, 2]))
        byte = (even & 0xF) | ((odd & 0xF) << 4)
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + rows64[:, None] * (K // 2) + cols[None, :], byte.to(tl.uint8),
                 mask=row_mask[:, None])
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(q_ptr + rows64[:, None] * K + cols[None, :], q.to(tl.int8), mask=row_mask[:, None])


@triton.jit
def _scale_from_absmax(absmax, BITS: tl.constexpr):
    """float32 scale = max(absmax / qmax, MIN_SCALE), the reference's operations in its order."""
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    return tl.maximum(tl.math.div_rn(absmax, QMAX), _MIN_SCALE)


# Contract:
#   x:     [M, K] float32/float16/bfloat16, any strides
#   mul:   [K] float (HAS_MUL), indexed by input channel
#   perm:  int64 [K] (HAS_PERM), output channel j reads input channel perm[j]
#   rot:   float32 [R, R] contiguous (HAS_ROT), applied to each of the K // R blocks of channels
#   q:     uint8 [M, K // 2] (BITS 4, element 2j in the low nibble) or int8 [M, K] (BITS 8), contiguous
#   scale: float32 [M, K // GROUP], contiguous
# Grid: (cdiv(M, BLOCK_M), K // GROUP). BLOCK_K divides GROUP and, with a rotation, R; BLOCK_R is
# the next power of two >= R.
@triton.jit
def _quantize_kernel(x_ptr, mul_ptr, perm_ptr, rot_ptr, q_ptr, scale_ptr, M, K, R, stride_xm, stride_xk,
                     GROUP: tl.constexpr, BITS: tl.constexpr, HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr,
                     HAS_ROT: tl.constexpr, ROT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    g = tl.program_id(1)
    g0 = g * GROUP
    if GROUP == BLOCK_K:
        v = _transformed_tile(x_ptr, mul_ptr, perm_ptr, rot_ptr, rows, row_mask, g0, K, R, stride_xm,
                              stride_xk, HAS_MUL, HAS_PERM, HAS_ROT, ROT_PRECISION, BLOCK_K, BLOCK_R)
        scale = _scale_from_absmax(tl.max(tl.abs(v), axis=1), BITS)
        _store_quantized(v, scale, q_ptr, rows, row_mask, g0, K, BITS, BLOCK_M, BLOCK_K)
    else:
        # The group is wider than what fits in registers: one pass for the scale, a second one that
        # recomputes the transform (cheaper than a round trip of T(x) through global memory).
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(g0, g0 + GROUP, BLOCK_K):
            v = _transformed_tile(x_ptr, mul_ptr, perm_ptr, rot_ptr, rows, row_mask, k0, K, R, stride_xm,
                                  stride_xk, HAS_MUL, HAS_PERM, HAS_ROT, ROT_PRECISION, BLOCK_K, BLOCK_R)
            absmax = tl.maximum(absmax, tl.max(tl.abs(v), axis=1))
        scale = _scale_from_absmax(absmax, BITS)
        for k0 in range(g0, g0 + GROUP, BLOCK_K):
            v = _transformed_tile(x_ptr, mul_ptr, perm_ptr, rot_ptr, rows, row_mask, k0, K, R, stride_xm,
                                  stride_xk, HAS_MUL, HAS_PERM, HAS_ROT, ROT_PRECISION, BLOCK_K, BLOCK_R)
            _store_quantized(v, scale, q_ptr, rows, row_mask, k0, K, BITS, BLOCK_M, BLOCK_K)
    tl.store(scale_ptr + rows.to(tl.int64) * (K // GROUP) + g, scale, mask=row_mask)


def _config(block_m: int, block_k: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=warps, num_stages=1)


# GPU configurations, chosen among those that compile without register spills for sm_80, sm_89 and
# sm_90 (per-token groups of 1152 and 3072 channels; compiled, not yet timed). With a rotation every
# program holds an R x BLOCK_K slice of it besides the activations, so tiles are narrower.
ROTATION_CONFIGS = [_config(8, 32, 4), _config(16, 32, 4), _config(16, 32, 8), _config(8, 64, 8),
                    _config(32, 64, 8)]
PLAIN_CONFIGS = [_config(8, 128, 4), _config(16, 128, 4), _config(16, 128, 8), _config(32, 128, 8),
                 _config(32, 64, 4), _config(64, 64, 8), _config(64, 32, 4)]


def _widest_tile(group: int, rotation_block: int | None) -> int:
    """The widest power of two a tile can span: it lies inside one group and one rotation block."""
    span = group if rotation_block is None else math.gcd(group, rotation_block)
    return span & -span


def _fit_to_tile(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configurations for this transform, with BLOCK_K narrowed to the widest tile it allows."""
    widest = _widest_tile(kwargs["GROUP"], named_args["R"] if kwargs["HAS_ROT"] else None)
    fitted, seen = [], set()
    for cfg in ROTATION_CONFIGS if kwargs["HAS_ROT"] else PLAIN_CONFIGS:
        kw = dict(cfg.kwargs, BLOCK_K=min(cfg.kwargs["BLOCK_K"], widest))
        key = (tuple(sorted(kw.items())), cfg.num_warps)
        if key not in seen:
            seen.add(key)
            fitted.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return fitted


_quantize_autotuned = triton.autotune(
    ROTATION_CONFIGS + PLAIN_CONFIGS, key=["M", "K", "R", "GROUP", "BITS", "HAS_ROT", "HAS_PERM"],
    prune_configs_by={"early_config_prune": _fit_to_tile})(_quantize_kernel)

# The interpreter runs every program in Python: one small configuration, with tiles narrow enough
# that the tests' widths take several of them per group.
INTERPRETER_BLOCK_M = 32
INTERPRETER_MAX_BLOCK_K = 32

# Float32 rotation on GPUs: "ieee" multiplies exactly as the reference does; "tf32x3" would be faster
# and is a tuning candidate once measured against the reference.
ROT_PRECISION = "ieee"


def interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_quantize_kernel, InterpretedFunction)


def quantize_activation_triton(x: torch.Tensor, bits: int, group: int | None = None,
                               act_mul: torch.Tensor | None = None, act_perm: torch.Tensor | None = None,
                               act_rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform and quantize activations x: [M, K] -> (q, scale).

    q:     uint8 [M, K // 2] (bits 4, packed as `pack_int4`) or int8 [M, K] (bits 8)
    scale: float32 [M, K // group] (one column when group is None)

    Equals `quantize_activation(transform_activation(x.float(), ...), bits, group)` followed by
    `pack_int4` (for 4 bits); act_mul [K], act_perm int64 [K], act_rotation [b, b] with b | K.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, K]; got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if bits not in (4, 8):
        raise ValueError(f"activations are quantized to 4 or 8 bits; got {bits}")
    m, k = x.shape
    g = group or k
    if k % g:
        raise ValueError(f"the activation group {g} does not divide the input width {k}")
    if bits == 4 and g % 2:
        raise ValueError(f"4-bit packing needs an even group width; got {g}")
    for name, t in (("act_mul", act_mul), ("act_perm", act_perm)):
        if t is not None and tuple(t.shape) != (k,):
            raise ValueError(f"{name} must have shape [{k}]; got {tuple(t.shape)}")
    if act_perm is not None and act_perm.dtype != torch.int64:
        raise ValueError(f"act_perm must be int64; got {act_perm.dtype}")
    r = k
    if act_rotation is not None:
        r = act_rotation.shape[0]
        if act_rotation.dim() != 2 or act_rotation.shape[1] != r or k % r:
            raise ValueError(f"act_rotation must be square [b, b] with b dividing {k}; got "
                             f"{tuple(act_rotation.shape)}")
        act_rotation = act_rotation.to(torch.float32).contiguous()
    tensors = [t for t in (x, act_mul, act_perm, act_rotation) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, act_mul, act_perm and act_rotation must be on the same device")

    tile = _widest_tile(g, r if act_rotation is not None else None)
    if bits == 4 and tile < 2:
        raise ValueError(f"4-bit packing needs tiles of an even width; the group {g} and rotation "
                         f"block {r} have no common even divisor")
    q = torch.empty(m, k // 2 if bits == 4 else k, dtype=torch.uint8 if bits == 4 else torch.int8,
                    device=x.device)
    scale = torch.empty(m, k // g, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    args = (x, act_mul, act_perm, act_rotation, q, scale, m, k, r, x.stride(0), x.stride(1))
    # Rotation blocks above 256 channels work, but their padded [BLOCK_M, BLOCK_R] tile spills
    # registers on GPUs.
    meta = dict(GROUP=g, BITS=bits, HAS_MUL=act_mul is not None, HAS_PERM=act_perm is not None,
                HAS_ROT=act_rotation is not None, ROT_PRECISION=ROT_PRECISION,
                BLOCK_R=max(triton.next_power_of_2(r), 16) if act_rotation is not None else 16)
    if interpreted():
        grid = (triton.cdiv(m, INTERPRETER_BLOCK_M), k // g)
        _quantize_kernel[grid](*args, **meta, BLOCK_M=INTERPRETER_BLOCK_M,
                               BLOCK_K=min(tile, INTERPRETER_MAX_BLOCK_K))
    else:
        _quantize_autotuned[lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), k // g)](*args, **meta)
    return q, scale
