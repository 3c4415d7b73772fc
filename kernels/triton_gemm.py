"""Triton integer GEMM for W4A4, W4A8 and W8A8: y = dequant(a) · dequant(w)ᵀ + bias.

One template serves every bit width. Operands stay in their storage format (4-bit values packed two
per byte along K, element 2j in the low nibble, or int8) and the product is always an int8 `tl.dot`
accumulating in int32: GPUs have no 4-bit integer tensor cores past Ampere, and Hopper has none at
all, so the win of 4 bits is in the bytes moved and the math runs at the int8 rate (README, Kernels).

Unpacking without per-byte code. For a packed byte p = (hi << 4) | (lo & 0xF), the bytes `p << 4`
and `p & 0xF0`, read as int8, are exactly 16·lo and 16·hi: one shift and one mask per 32-bit word
of four bytes, where sign-extending each nibble costs byte-serial code. So a K tile of BLOCK_K
elements is taken as two halves — the even elements 2j and the odd elements 2j + 1 — and the
product is two int8 dots, one per half:

    Σ_k a_k w_k = Σ_j a_2j w_2j + Σ_j a_2j+1 w_2j+1,

with each 4-bit operand scaled by 16. An 8-bit operand meeting a 4-bit one is split into the same
even and odd halves (a byte permutation); W8A8 needs no split and runs one dot. The int32 sum is
then 2^SHIFT times the exact one (SHIFT = 4 per 4-bit operand) and is shifted back exactly in the
epilogue. Bound: every int8 product is at most 2^14 in magnitude, so K < 2^17 keeps int32 exact,
as for W8A8. Below 64-element K tiles (groups of 32 channels) the halves would be narrower than
the 32 channels an int8 tensor-core dot needs; the halves are then interleaved back into K order
(slower, exact).

Scales: K is split into chunks of gcd(a_group, w_group) channels, inside which one activation scale
and one weight scale apply. Each chunk is accumulated exactly in int32, corrected for the weight's
zero point through the activation's row sums, then added to a float32 accumulator times both scales
— the operations of `quant_linear_reference`, in its order (`scale_product` of kernels/reference.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_quantize import interpreted

# int8 tl.dot on NVIDIA GPUs needs K tiles of at least 32.
MIN_GPU_BLOCK_K = 32
# Products of int8 values (or 16 x int4) are at most 2^14 in magnitude: int32 sums of fewer than
# 2^17 of them are exact.
MAX_K = 2**17

_MIN_DOT_K = tl.constexpr(MIN_GPU_BLOCK_K)
# Whether the kernels run in Triton's interpreter, where inline PTX does not exist and the
# float32 -> bfloat16 cast truncates (a compile-time constant of the kernels below).
_INTERPRET = tl.constexpr(interpreted())


@triton.jit
def _low_nibbles_times_16(p):
    """int8 p << 4 (16 · the low nibble of each byte), one shift and one mask per 32-bit word on GPUs."""
    if _INTERPRET:
        return p << 4
    else:
        # Triton shifts int8 tensors byte by byte; on a packed word the mask drops the bits that a
        # 32-bit shift carries into the next byte.
        return tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
                                         "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _load_halves(ptr, rows, stride_row, k0, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 MASK_K: tl.constexpr):
    """Two int8 [len(rows), BLOCK_K // 2]: elements k0 + 2j and k0 + 2j + 1, times 16 for 4 bits.

    Elements at or past K are 0 when MASK_K.
    """
    rows64 = rows.to(tl.int64)
    if BITS == 4:
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offsets = rows64[:, None] * stride_row + cols[None, :]
        if MASK_K:
            p = tl.load(ptr + offsets, mask=(cols < K // 2)[None, :], other=0)
        else:
            p = tl.load(ptr + offsets)
        return _low_nibbles_times_16(p), p & -16
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        offsets = rows64[:, None] * stride_row + cols[None, :]
        if MASK_K:
            x = tl.load(ptr + offsets, mask=(cols < K)[None, :], other=0)
        else:
            x = tl.load(ptr + offsets)
        return tl.split(tl.reshape(x, [x.shape[0], BLOCK_K // 2, 2]))


@triton.jit
def _load_tile(ptr, rows, stride_row, k0, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               MASK_K: tl.constexpr):
    """int8 [len(rows), BLOCK_K]: elements k0 .. k0 + BLOCK_K in K order, times 16 for 4 bits."""
    if BITS == 4:
        even, odd = _load_halves(ptr, rows, stride_row, k0, K, BITS, BLOCK_K, MASK_K)
        return tl.reshape(tl.join(even, odd), [even.shape[0], BLOCK_K])
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        if MASK_K:
            return tl.load(ptr + offsets, mask=(cols < K)[None, :], other=0)
        else:
            return tl.load(ptr + offsets)


@triton.jit
def _accumulate_tile(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, k0, K,
                     A_BITS: tl.constexpr, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr,
                     HAS_ZERO: tl.constexpr):
    """(prod + 2^SHIFT · a[rows, k0:k0 + BLOCK_K] · w[cols, k0:k0 + BLOCK_K]ᵀ, rowsum + 2^A_SHIFT · Σ_k a).

    Exact in int32. rowsum: int32 [len(rows), 16], every column the row sum, updated only when
    HAS_ZERO (it serves the zero-point correction): a product with ones runs on the tensor cores,
    where summing each tile's rows costs shuffles (2.6x the main loop's instructions on sm_90).
    `out_dtype` is spelled out: Triton 3.6 checks an int8 dot's accumulator against it (float32
    unless given), where 3.9 takes the accumulator's own type.
    """
    if (A_BITS == 8 and W_BITS == 8) or BLOCK_K < 2 * _MIN_DOT_K:
        a = _load_tile(a_ptr, rows, stride_am, k0, K, A_BITS, BLOCK_K, MASK_K)
        w = _load_tile(w_ptr, cols, stride_wn, k0, K, W_BITS, BLOCK_K, MASK_K)
        prod = tl.dot(a, tl.trans(w), prod, out_dtype=tl.int32)
        if HAS_ZERO:
            rowsum = tl.dot(a, tl.full([BLOCK_K, 16], 1, tl.int8), rowsum, out_dtype=tl.int32)
    else:
        a_even, a_odd = _load_halves(a_ptr, rows, stride_am, k0, K, A_BITS, BLOCK_K, MASK_K)
        w_even, w_odd = _load_halves(w_ptr, cols, stride_wn, k0, K, W_BITS, BLOCK_K, MASK_K)
        prod = tl.dot(a_even, tl.trans(w_even), prod, out_dtype=tl.int32)
        prod = tl.dot(a_odd, tl.trans(w_odd), prod, out_dtype=tl.int32)
        if HAS_ZERO:
            ones = tl.full([BLOCK_K // 2, 16], 1, tl.int8)
            rowsum = tl.dot(a_odd, ones, tl.dot(a_even, ones, rowsum, out_dtype=tl.int32), out_dtype=tl.int32)
    return prod, rowsum


@triton.jit
def _accumulate_k(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, K, A_BITS: tl.constexpr,
                  W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZERO: tl.constexpr):
    """`_accumulate_tile` over all of K: unmasked full tiles, then one masked last tile if K needs one."""
    # The loop over full tiles keeps the loads software-pipelined and unmasked; the same binary
    # serves every K.
    k_full = K - K % BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        prod, rowsum = _accumulate_tile(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, k0, K,
                                        A_BITS, W_BITS, BLOCK_K, False, HAS_ZERO)
    if k_full < K:
        prod, rowsum = _accumulate_tile(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, k_full, K,
                                        A_BITS, W_BITS, BLOCK_K, True, HAS_ZERO)
    return prod, rowsum


@triton.jit
def _unscaled(v, BITS_A: tl.constexpr, BITS_B: tl.constexpr):
    """v / 16 per 4-bit operand among (BITS_A, BITS_B): an arithmetic shift, exact on `_accumulate_tile`'s sums."""
    shift: tl.constexpr = (4 if BITS_A == 4 else 0) + (4 if BITS_B == 4 else 0)
    return v >> shift


@triton.jit
def _scale_parts(s):
    """(m, p) with s = m · p exactly: p the power of two of s's exponent, m in [1, 2).

    Zero, subnormal and non-finite s give (s, 1). See `scale_product` in kernels/reference.py.
    """
    bits = s.to(tl.int32, bitcast=True)
    exponent = bits & 0x7F800000
    normal = (exponent != 0) & (exponent != 0x7F800000)
    m = ((bits & -0x7F800001) | 0x3F800000).to(tl.float32, bitcast=True)
    return tl.where(normal, m, s), tl.where(normal, exponent.to(tl.float32, bitcast=True), 1.0)


@triton.jit
def _add_scaled_chunk(acc, prod, rowsum, c0, a_scale_ptr, w_scale_ptr, w_zero_ptr, rows, cols, stride_asm,
                      stride_wsn, A_GROUP, W_GROUP, A_BITS: tl.constexpr, W_BITS: tl.constexpr,
                      HAS_ZERO: tl.constexpr):
    """acc + (prod - rowsum · w_zero) · a_scale · w_scale for the chunk starting at channel c0.

    prod and rowsum come scaled by 16 per 4-bit operand, as `_accumulate_tile` leaves them.
    """
    prod = _unscaled(prod, A_BITS, W_BITS)
    w_idx = cols.to(tl.int64) * stride_wsn + c0 // W_GROUP
    if HAS_ZERO:
        zero = tl.load(w_zero_ptr + w_idx).to(tl.int32)
        # rowsum's 16 columns are equal (see _accumulate_tile).
        prod = prod - _unscaled(tl.max(rowsum, axis=1), A_BITS, 8)[:, None] * zero[None, :]
    a_m, a_p = _scale_parts(tl.load(a_scale_ptr + rows.to(tl.int64) * stride_asm + c0 // A_GROUP))
    w_s = tl.load(w_scale_ptr + w_idx)
    return acc + prod.to(tl.float32) * a_m[:, None] * w_s[None, :] * a_p[:, None]


@triton.jit
def _tile_coordinates(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program; programs sweep GROUP_M row tiles per column of tiles."""
    # Programs that run at the same time then share weight tiles (and activation tiles) in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * tiles_n
    first_m = (pid // per_band) * GROUP_M
    band_height = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_height
    pid_n = (pid % per_band) // band_height
    return pid_m, pid_n


@triton.jit
def _tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, cols, row_mask, col_mask) of this program's output tile.

    rows and cols past M and N are clamped to 0, so loads need no masks; their results are not stored.
    """
    pid_m, pid_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    return tl.where(row_mask, rows, 0), tl.where(col_mask, cols, 0), row_mask, col_mask


@triton.jit
def _round_to_bfloat16(v):
    """float32 -> bfloat16, ties to even, NaN kept, with integer operations.

    The interpreter's float32 -> bfloat16 cast truncates; this gives torch's rounding there. GPUs
    convert natively.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    # Adding the rounding bias to a NaN's payload can carry it into +-0 or +-inf.
    return tl.where(v != v, v.to(tl.bfloat16), rounded)


# Contract:
#   a:       int8 [M, K // 2] (A_BITS 4, two values per byte, element 2j in the low nibble) or
#            int8 [M, K] (A_BITS 8); row stride stride_am, columns contiguous
#   w:       int8 [N, K // 2] or [N, K] likewise (W_BITS), row stride stride_wn
#   a_scale: float32 [M, K // A_GROUP], row stride stride_asm
#   w_scale: float32 [N, K // W_GROUP], row stride stride_wsn
#   w_zero:  int8 [N, K // W_GROUP], row stride stride_wsn (HAS_ZERO; signed storage, kernels/packing.py)
#   bias:    [N] float (HAS_BIAS)
#   out:     [M, N] float32/float16/bfloat16, row stride stride_om
# CHUNK = gcd(A_GROUP, W_GROUP) divides K; SINGLE_CHUNK: CHUNK == K. BLOCK_K divides CHUNK unless
# SINGLE_CHUNK, where a last, masked K tile takes what the full ones leave. M_BUCKET only keys the
# autotuner. Every K runs the same binary. Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N).
@triton.jit
def _quant_matmul_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, out_ptr, M, N, K,
                         stride_am, stride_wn, stride_asm, stride_wsn, stride_om, A_GROUP, W_GROUP, CHUNK,
                         M_BUCKET, SINGLE_CHUNK: tl.constexpr, A_BITS: tl.constexpr, W_BITS: tl.constexpr,
                         HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    rows, cols, row_mask, col_mask = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rowsum = tl.zeros([BLOCK_M, 16], dtype=tl.int32)
    if SINGLE_CHUNK:
        # The float32 accumulator stays out of the loop, which halves the registers it holds.
        prod, rowsum = _accumulate_k(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, K, A_BITS,
                                     W_BITS, BLOCK_K, HAS_ZERO)
        acc = _add_scaled_chunk(acc, prod, rowsum, 0, a_scale_ptr, w_scale_ptr, w_zero_ptr, rows, cols,
                                stride_asm, stride_wsn, A_GROUP, W_GROUP, A_BITS, W_BITS, HAS_ZERO)
    else:
        # Each chunk's exact int32 product is folded into the float32 accumulator as the chunk ends.
        for k0 in range(0, K, BLOCK_K):
            prod, rowsum = _accumulate_tile(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, k0, K,
                                            A_BITS, W_BITS, BLOCK_K, False, HAS_ZERO)
            if (k0 + BLOCK_K) % CHUNK == 0:
                acc = _add_scaled_chunk(acc, prod, rowsum, k0 + BLOCK_K - CHUNK, a_scale_ptr, w_scale_ptr,
                                        w_zero_ptr, rows, cols, stride_asm, stride_wsn, A_GROUP, W_GROUP,
                                        A_BITS, W_BITS, HAS_ZERO)
                prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                rowsum = tl.zeros([BLOCK_M, 16], dtype=tl.int32)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if _INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bfloat16(acc)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out,
             mask=row_mask[:, None] & col_mask[None, :])


# Contract: a, w as for _quant_matmul_kernel; out: int32 [M, N] = a · wᵀ, row stride stride_om.
# The GEMM's inner loop alone, so that tests can compare accumulators bit for bit.
@triton.jit
def _int_matmul_kernel(a_ptr, w_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
                       A_BITS: tl.constexpr, W_BITS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, row_mask, col_mask = _tile_indices(M, N, BLOCK_M, BLOCK_N, 1)
    prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rowsum = tl.zeros([BLOCK_M, 16], dtype=tl.int32)
    prod, rowsum = _accumulate_k(prod, rowsum, a_ptr, w_ptr, rows, cols, stride_am, stride_wn, K, A_BITS,
                                 W_BITS, BLOCK_K, False)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], _unscaled(prod, A_BITS, W_BITS),
             mask=row_mask[:, None] & col_mask[None, :])


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int,
            group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Ampere / Ada (sm_80, sm_86, sm_89): int8 mma.sync m16n8k32, 164 KB (sm_80) or 100 KB (sm_86/89)
# of shared memory per SM; 4-bit tiles take half the bytes of their int8 counterparts. Tiles of
# 128 accumulators per thread spill (see MAX_REGISTER_ESTIMATE).
SM80_CONFIGS = [
    _config(128, 128, 128, 8, 3),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 5),
    _config(64, 64, 64, 2, 5),
    _config(64, 64, 64, 4, 5),
]

# Hopper (sm_90): int8 wgmma wants a warp group (4 warps) per 64 rows and deep pipelines.
# 256 x 128 tiles spill at every bit width; 128 x 256 serves W8A8 only (see MAX_REGISTER_ESTIMATE).
SM90_CONFIGS = [
    _config(128, 256, 128, 8, 4),
    _config(128, 128, 128, 4, 5),
    _config(128, 128, 256, 8, 4),
    _config(128, 128, 128, 8, 5),
    _config(64, 256, 128, 4, 4),
    _config(64, 128, 128, 4, 5),
    _config(128, 64, 128, 4, 5),
    _config(64, 64, 128, 4, 6),
]

# Shared memory one block may claim: 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89 (CUDA C++
# Programming Guide, technical specifications per compute capability).
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}

# Register estimates (below) that compile without spills, by architecture and warps per program:
# measured offline with bench/offline_compile.py on every configuration listed here (sm_90 is
# checked by tests/kernels/test_sm90_build.py). On sm_90 with one warp group (4 warps), a 64 x 256
# accumulator and its 4-bit operand tiles (168) fit and an int8 activation tile split into halves
# beside them (200) spills; with two warp groups a 128 x 256 int8 product (128) fits but its W4A4
# form (152) spills, as do chunked products over 128 x 128 tiles (192), whose scaling epilogue sits
# inside the loop. On sm_80/89 (mma.sync, all operands in registers) 128 accumulators per thread
# spill at every bit width and 88 fit.
MAX_REGISTER_ESTIMATE = {90: {4: 176, 8: 128}, 80: {2: 112, 4: 112, 8: 112}}


def shared_memory_bytes(cfg: triton.Config, a_bits: int, w_bits: int) -> int:
    """An upper bound on the shared memory the GEMM takes with this configuration: num_stages
    buffered operand tiles, the unpacked weight tile that the tensor-core product reads from shared
    memory when the weight is not used as loaded (any 4-bit operand), and the ones of the row-sum
    product (with a zero point)."""
    kw = cfg.kwargs
    tiles = (kw["BLOCK_M"] * a_bits + kw["BLOCK_N"] * w_bits) * kw["BLOCK_K"] // 8
    unpacked = 0 if a_bits == w_bits == 8 else kw["BLOCK_N"] * kw["BLOCK_K"]
    return cfg.num_stages * tiles + unpacked + 16 * kw["BLOCK_K"]


def register_estimate(cfg: triton.Config, a_bits: int, w_bits: int, single_chunk: bool) -> int:
    """32-bit registers per thread that the accumulators and the unpacked operand tiles hold.

    One int32 accumulator with one chunk; with several, an int32 and a float32 one plus the
    temporaries of the per-chunk scaling (counted as a third). Operand tiles pass through
    registers only when they are unpacked or split (any 4-bit operand).
    """
    kw = cfg.kwargs
    threads = 32 * cfg.num_warps
    acc = kw["BLOCK_M"] * kw["BLOCK_N"] // threads * (1 if single_chunk else 3)
    operands = 0
    if not a_bits == w_bits == 8:
        operands = (kw["BLOCK_M"] * a_bits + kw["BLOCK_N"] * w_bits) * kw["BLOCK_K"] // (8 * 4 * threads)
    return acc + operands


def fits(cfg: triton.Config, a_bits: int, w_bits: int, single_chunk: bool, capability: int) -> bool:
    """Whether the configuration fits the device's shared memory and compiles without spills."""
    smem = SHARED_MEMORY_LIMIT.get(capability, SHARED_MEMORY_LIMIT[89])
    registers = MAX_REGISTER_ESTIMATE[90 if capability >= 90 else 80]
    return (shared_memory_bytes(cfg, a_bits, w_bits) <= smem
            and register_estimate(cfg, a_bits, w_bits, single_chunk)
            <= registers.get(cfg.num_warps, min(registers.values())))


def _narrowed(cfg: triton.Config, chunk: int, single_chunk: bool) -> triton.Config:
    """cfg with BLOCK_K at most the widest power of two dividing a chunk (any width for one chunk)."""
    widest = max(MIN_GPU_BLOCK_K, chunk & -chunk)
    block_k = cfg.kwargs["BLOCK_K"] if single_chunk else min(cfg.kwargs["BLOCK_K"], widest)
    return triton.Config(dict(cfg.kwargs, BLOCK_K=block_k), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def prune_configs(configs: list[triton.Config], chunk: int, single_chunk: bool, a_bits: int, w_bits: int,
                  capability: int) -> list[triton.Config]:
    """The configurations to try, before anything is compiled: K tiles fitted to the chunk, those
    that need more shared memory or registers than the device has left out, duplicates removed."""
    kept, seen = [], set()
    for cfg in configs:
        cfg = _narrowed(cfg, chunk, single_chunk)
        key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen and fits(cfg, a_bits, w_bits, single_chunk, capability):
            seen.add(key)
            kept.append(cfg)
    if not kept:
        raise ValueError(f"no GEMM configuration fits a device of compute capability {capability} "
                         f"(chunk {chunk}, W{w_bits}A{a_bits})")
    return kept


def _pruner(nominal_capability: int):
    """The autotuner's early_config_prune for a config list meant for devices of this capability."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        # The launch's own device when there is one (sm_86/89 have less shared memory than sm_80).
        a = named_args["a_ptr"]
        capability = nominal_capability
        if isinstance(a, torch.Tensor) and a.is_cuda:
            capability = _capability(a.device)
        return prune_configs(configs, named_args["CHUNK"], kwargs["SINGLE_CHUNK"], kwargs["A_BITS"],
                             kwargs["W_BITS"], capability)

    return prune


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    """The CUDA device's compute capability as 10 · major + minor (90 for Hopper)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def m_bucket(m: int) -> int:
    """The autotuner's key for M: the next power of two, between 16 and 16384."""
    return min(max(triton.next_power_of_2(m), 16), 16384)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "CHUNK", "A_BITS", "W_BITS", "HAS_ZERO"]
_quant_matmul_sm80, _quant_matmul_sm90 = (
    triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(capability)})(
        _quant_matmul_kernel)
    for configs, capability in ((SM80_CONFIGS, 80), (SM90_CONFIGS, 90)))

# One small configuration for the interpreter (which runs every program in Python, so autotuning
# would only cost time) and for int_matmul_triton, a checking tool: tiles smaller than the tests'
# shapes so that masking is exercised, K tiles as wide as the chunk allows (64 takes the two-halves
# path, 32 the interleaved one).
SMALL_BLOCK_M = 32
SMALL_BLOCK_N = 32
SMALL_MAX_BLOCK_K = 64


def _storage_width(bits: int, k: int) -> int:
    return k // 2 if bits == 4 else k


def _check_operand(name: str, t: torch.Tensor, bits: int, k: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{name} must hold 4- or 8-bit integers; got bits={bits}")
    if t.dim() != 2 or t.shape[1] != _storage_width(bits, k):
        form = f"[rows, {k // 2}] (two 4-bit values per byte)" if bits == 4 else f"[rows, {k}]"
        raise ValueError(f"{name} must be {form} for K = {k}; got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"{name} must be int8 or uint8 storage; got {t.dtype}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride 1 along K); got strides {t.stride()}")


def quant_matmul(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, a_bits: int,
                 w_bits: int, a_group: int, w_group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantized integer product: out [M, N] = (a_scale ⊙ a) · (w_scale ⊙ (w - w_zero))ᵀ + bias.

    a:       uint8/int8 [M, K // 2] (a_bits 4, packed as `pack_int4`) or int8 [M, K] (a_bits 8)
    a_scale: float32 [M, K // a_group]
    w:       uint8/int8 [N, K // 2] (w_bits 4) or int8 [N, K] (w_bits 8), signed storage
    w_scale: float32 [N, K // w_group];  w_zero: int8 [N, K // w_group] or None;  bias: [N] or None
    a_group, w_group: channels per scale along K, 0 = all of K.  Returns out_dtype [M, N].
    """
    k = in_features
    _check_operand("a", a, a_bits, k)
    _check_operand("w", w, w_bits, k)
    if k >= MAX_K:
        raise ValueError(f"in_features must be below {MAX_K} for the int32 accumulator to stay exact; got {k}")
    ag, wg = a_group or k, w_group or k
    if k % ag or k % wg:
        raise ValueError(f"the groups (activations {ag}, weights {wg}) must divide K = {k}")
    m, n = a.shape[0], w.shape[0]
    for name, t, rows, width in (("a_scale", a_scale, m, k // ag), ("w_scale", w_scale, n, k // wg),
                                 ("w_zero", w_zero, n, k // wg)):
        if t is not None and tuple(t.shape) != (rows, width):
            raise ValueError(f"{name} must have shape [{rows}, {width}]; got {tuple(t.shape)}")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise ValueError(f"scales must be float32; got {a_scale.dtype} and {w_scale.dtype}")
    if w_zero is not None and w_zero.dtype != torch.int8:
        raise ValueError(f"w_zero must be int8 (signed storage); got {w_zero.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}]; got {tuple(bias.shape)}")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    if any(t.device != a.device for t in (a_scale, w, w_scale, w_zero, bias) if t is not None):
        raise ValueError("all operands of quant_matmul must be on the same device")

    a_scale = a_scale.contiguous()
    w_scale = w_scale.contiguous()
    w_zero = None if w_zero is None else w_zero.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    chunk, meta = _launch_meta(k, ag, wg, a_bits, w_bits, w_zero is not None, bias is not None, interpreted())
    args = (a.view(torch.int8), w.view(torch.int8), a_scale, w_scale, w_zero, bias, out, m, n, k,
            a.stride(0), w.stride(0), a_scale.stride(0), w_scale.stride(0), out.stride(0), ag, wg, chunk,
            m_bucket(m))

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if interpreted():
        cfg = dict(BLOCK_M=SMALL_BLOCK_M, BLOCK_N=SMALL_BLOCK_N, BLOCK_K=_small_block_k(chunk), GROUP_M=2)
        _quant_matmul_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        (_quant_matmul_sm90 if _capability(a.device) >= 90 else _quant_matmul_sm80)[grid](*args, **meta)
    return out


@functools.lru_cache(maxsize=1024)
def _launch_meta(k: int, a_group: int, w_group: int, a_bits: int, w_bits: int, has_zero: bool, has_bias: bool,
                 interpret: bool) -> tuple[int, Mapping[str, Any]]:
    """(the chunk: channels sharing one activation and one weight scale; the kernel's constexpr
    arguments, read-only) of a quant_matmul launch. Cached: a layer launches the same K, groups and
    bit widths on every call."""
    chunk = math.gcd(a_group, w_group)
    if not interpret and chunk < k and chunk % MIN_GPU_BLOCK_K:
        raise ValueError(f"on GPUs the groups (activations {a_group}, weights {w_group}) must be multiples of "
                         f"{MIN_GPU_BLOCK_K} channels, the narrowest K tile of an int8 tensor-core product")
    return chunk, MappingProxyType(dict(SINGLE_CHUNK=chunk == k, A_BITS=a_bits, W_BITS=w_bits, HAS_ZERO=has_zero,
                                        HAS_BIAS=has_bias))


def int_matmul_triton(a: torch.Tensor, w: torch.Tensor, in_features: int, a_bits: int, w_bits: int,
                      block_k: int | None = None) -> torch.Tensor:
    """Exact integer product of stored operands: int32 [M, N] = unpack(a) · unpack(w)ᵀ.

    a: [M, K // 2] or [M, K] and w: [N, K // 2] or [N, K], as for `quant_matmul`. The GEMM's inner
    loop without scales, with fixed small tiles: a tool for comparing accumulators with
    `int_matmul` of kernels/reference.py, not a tuned kernel. block_k: the K tile, by default the
    widest power of two dividing K; one that does not divide K runs a masked last tile.
    """
    k = in_features
    _check_operand("a", a, a_bits, k)
    _check_operand("w", w, w_bits, k)
    if a.device != w.device:
        raise ValueError("a and w must be on the same device")
    m, n = a.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    interpret = interpreted()
    if block_k is None:
        block_k = _small_block_k(k) if interpret else max(MIN_GPU_BLOCK_K, _small_block_k(k))
    if block_k < 2 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 2; got {block_k}")
    grid = (triton.cdiv(m, SMALL_BLOCK_M) * triton.cdiv(n, SMALL_BLOCK_N),)
    _int_matmul_kernel[grid](a.view(torch.int8), w.view(torch.int8), out, m, n, k, a.stride(0), w.stride(0),
                             out.stride(0), A_BITS=a_bits, W_BITS=w_bits,
                             BLOCK_M=SMALL_BLOCK_M, BLOCK_N=SMALL_BLOCK_N, BLOCK_K=block_k)
    return out


def _small_block_k(chunk: int) -> int:
    # The widest power of two dividing the chunk (even, as 4-bit operands need), capped.
    return max(2, min(chunk & -chunk, SMALL_MAX_BLOCK_K))
