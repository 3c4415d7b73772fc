"""Triton weight-only GEMM for W4A16, W8A16 and W3A16: y = x · Ŵᵀ + bias, Ŵ = scale · (q − zero).

Activations stay in their 16-bit type; weights are stored as kernels/packing.py writes them (signed
int4 nibbles, int8, or int3 bit planes) with float32 scales per output channel or per group of
channels along K and optional signed int8 zero points. The math is the a_bits >= 16 branch of
`quant_linear_reference` (kernels/reference.py), which computes it in float32.

Each K tile of the weight is dequantized in registers — unpacked, the zero point subtracted and the
scale multiplied in float32 (q − zero is an exact integer there), then rounded to x's dtype — and
multiplied with x on the tensor cores in that dtype with float32 accumulation. The integers become
floats without a conversion instruction (32-bit conversions issue at 16 per clock per SM on Hopper,
an eighth of the float32 rate): the offset code u = q + 2^(b-1) placed under float32's exponent of
2^23 is the float 2^23 + u, and one subtraction of 2^23 + 2^(b-1) + zero gives q − zero exactly.
float32 x keeps Ŵ in float32 and runs the dot with input_precision="ieee" (no TF32 rounding; on
GPUs that is FFMA, not tensor cores: float32 DiTs are rare, and small M is not bound by the math).
A NaN in x reaches every output of its row through the dot; nothing on the way takes a min or max.

The product is computed transposed, acc [BLOCK_N, BLOCK_M] = Ŵ_tile · x_tileᵀ: the weight rows are
the MMA's M dimension, so that a small M (the conditioning GEMMs, M = batch) is the MMA's narrow N
side, and the dequantized operand is the one that may stay in registers.

Unpacking without interleaving. The elements of a K tile are taken in phases, one dot per phase: a
4-bit tile is its low nibbles (elements k0 + 2j) and its high nibbles (k0 + 2j + 1), a 3-bit tile the
four positions i of its low-bit plane (elements k0 + 4j + i, whose third bit is bit 4·(j mod 2) + i of
high-plane byte j // 2); x's tile, loaded in K order, is split the same way in registers. Since
Σ_k x_k Ŵ_k is the same sum in any order, no weight tile is ever re-interleaved into K order.

Twin-log weights (TWIN_LOG; tlq3 / tlq4 of kernels/formats.py) are stored as int3 / int4 codes and
decoded arithmetically instead of through a table: the magnitude index m of the offset code u gives
2^e (e = m − (L − 1)) by placing e + 127 under float32's exponent bits, and the row's branch
parameters turn it into ±max(a · 2^e − c, 0): a compare, two selects, one FMA, one max per weight
on top of the integer path's work. The four parameters of a row are read per phase (cached).

Scales: when the K tile lies inside one group (BLOCK_K divides the group, or one group spans K) a
tile reads one scale and zero point per row; narrower groups are gathered per element.

Weight-only GEMM on H200, a bandwidth MODEL (not a measurement; no GPU ran this kernel). A GEMM
takes at least max(bytes / 4.8 TB/s, 2·M·N·K / 790 TFLOP/s, the bf16 rate measured here). bf16
reads 2 bytes of weight per weight, a weight-only mode bits / 8 plus a float32 scale per row: per
output element, 2K / M bytes of weight against K·bits / (8M). `python bench/weight_only_model.py`
prints the ratio of bf16's bound to each mode's (the speedup the model allows; launch floor of a few
microseconds left out, which dominates every M <= 16 row):

    (N, K)        M     bf16 MB  bf16 µs (limit)   w8a16  w4a16  w3a16
    (1152, 1152)  1     2.66     0.55 (memory)     1.99   3.95   5.25
    (1152, 1152)  2     2.66     0.55 (memory)     1.99   3.93   5.21
    (1152, 1152)  16    2.73     0.57 (memory)     1.94   3.68   4.74
    (1152, 1152)  4096  21.53    13.76 (compute)   1.00   1.00   1.00
    (4608, 1152)  1     10.63    2.21 (memory)     1.99   3.96   5.26
    (4608, 1152)  2     10.64    2.22 (memory)     1.99   3.95   5.24
    (4608, 1152)  16    10.80    2.25 (memory)     1.96   3.78   4.92
    (4608, 1152)  4096  57.80    55.05 (compute)   1.00   1.00   1.00
    (1152, 4608)  1     10.63    2.21 (memory)     2.00   3.98   5.30
    (1152, 4608)  2     10.64    2.22 (memory)     1.99   3.97   5.27
    (1152, 4608)  16    10.80    2.25 (memory)     1.96   3.80   4.96
    (1152, 4608)  4096  57.80    55.05 (compute)   1.00   1.00   1.00

At M = 4096 every shape is compute-bound and dequantizing only adds work to the tensor-core loop:
weight-only is for the small-M conditioning GEMMs (and for memory), not for token GEMMs. At M <= 16
the bound leaves out what the offline build shows to matter:

- Instruction issue, not HBM, bounds the dequantizing loop (offline build, sm_90, M = 1; a MODEL
  from it). Per 128-wide K tile a thread dequantizes 64 weights and issues, in the main loop,
  462 (w4a16), 628 (w8a16) or 702 (w3a16) SASS instructions at 16 x 128 x 128 on 8 warps, and
  467 / 626 / 709 at 16 x 64 x 128 on 4 warps: 7.2-11.1 per weight (per weight one LOP3, one FADD,
  one FMUL, half an F2FP, plus byte extraction, and the 3-bit planes' shifts), against 8 HGMMA.
  An SM issues 4 warp-instructions per clock, so a block streams 8.9 (w4a16), 13.0 (w8a16) or 4.4
  (w3a16) bytes of weight per SM clock, where 4.8 TB/s over 132 SMs at 1.83 GHz is 19.9: 45%, 66%
  and 22% of HBM. Times the bandwidth ratios above, the model's bound at M <= 16 with every SM
  busy is about 1.8x bf16 for w4a16, 1.3x for w8a16 and 1.2x for w3a16, not 4x / 2x / 5.3x.
- Programs: a (1152, 1152) layer at BLOCK_N = 32 is 36 programs on 132 SMs (split-K is not
  implemented), so there even that bound is out of reach; (4608, 1152) gives 144.
- Resources (bench/weight_only_build.py, table in bench/results/weight-only-build.md): 130 binaries,
  every shipped config after pruning at M = 1, 32, 4096, N = K = 1152, for w4a16, w8a16, w3a16 per
  channel and w4a16 / w3a16 with groups of 128 and zero points: no spills; 93-163 registers on
  sm_90, 104-242 on sm_80; shared memory at most 65 KiB (sm_90) and 49 KiB (sm_80), always within
  `shared_memory_bytes`; loads by cp.async. MMAs: HGMMA.64xNx16.F32.BF16 (N from 16 to 128) for
  every tile of 64 or more weight rows on sm_90, HMMA.16816.F32.BF16 for 32-row tiles and on sm_80.
  float32 x: FFMA (1024 per tile at 16 x 64 x 128), no tensor cores, as documented above.
  Groups narrower than the narrowest K tile (32 channels at 4 bits, 64 at 3, 16 at 8) gather
  their scales per element: 644 instructions per 32-wide tile at 4 bits (16 weights per thread at
  16 x 32 x 32 on 2 warps), correct but slow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import TWIN_LOG, integer_format
from .triton_gemm import SHARED_MEMORY_LIMIT, _capability, _config, _round_to_bfloat16, _tile_indices, m_bucket
from .triton_quantize import interpreted

# Storage bits of each weight format and the phases a K tile is split into (see the module docstring).
PHASES = {8: 1, 4: 2, 3: 4}
# A 16-bit tl.dot on NVIDIA GPUs needs K >= 16 per product (float32: 8); each phase is BLOCK_K / PHASES.
MIN_GPU_DOT_K = 16

_INTERPRET = tl.constexpr(interpreted())
# 2^23 and its float32 bits: for 0 <= u < 2^23, the bits 0x4B000000 | u are the float 2^23 + u.
_FLOAT_2_23 = tl.constexpr(8388608.0)
_FLOAT_2_23_BITS = tl.constexpr(0x4B000000)


@triton.jit
def _group_params(s_ptr, z_ptr, cols, stride_sn, gk, K, GROUP, HAS_ZERO: tl.constexpr, MASK_K: tl.constexpr):
    """(scale, zero) float32 [len(cols), len(gk)] of the groups holding channels gk (0 past K when MASK_K)."""
    offsets = cols.to(tl.int64)[:, None] * stride_sn + (gk // GROUP)[None, :]
    if MASK_K:
        valid = (gk < K)[None, :]
        scale = tl.load(s_ptr + offsets, mask=valid, other=0.0)
    else:
        scale = tl.load(s_ptr + offsets)
    if HAS_ZERO:
        if MASK_K:
            zero = tl.load(z_ptr + offsets, mask=valid, other=0).to(tl.float32)
        else:
            zero = tl.load(z_ptr + offsets).to(tl.float32)
    else:
        zero = tl.zeros_like(scale)
    return scale, zero


@triton.jit
def _dot_operand(v, DTYPE: tl.constexpr):
    """float32 v rounded to DTYPE (to nearest even), as the dot takes it.

    The interpreter's float32 -> bfloat16 cast truncates and its bfloat16 dot is wrong, so there the
    rounded values are returned in float32 (every product of two 16-bit values is exact in float32).
    """
    if DTYPE == tl.float32:
        return v
    elif _INTERPRET:
        if DTYPE == tl.bfloat16:
            return _round_to_bfloat16(v).to(tl.float32)
        else:
            return v.to(DTYPE).to(tl.float32)
    else:
        return v.to(DTYPE)


@triton.jit
def _x_tile(x_ptr, rows, stride_xm, k0, K, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """x[rows, k0:k0 + BLOCK_K] (0 past K when MASK_K), in float32 under the interpreter (see `_dot_operand`)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    offsets = rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    if MASK_K:
        x = tl.load(x_ptr + offsets, mask=(ks < K)[None, :], other=0.0)
    else:
        x = tl.load(x_ptr + offsets)
    if _INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _twin_log_values(u, s_ptr, cols, stride_sn, OFFSET: tl.constexpr):
    """float32 weights of twin-log offset codes u = c + OFFSET [len(cols), n] (see the module docstring)."""
    row = cols.to(tl.int64) * stride_sn
    a_pos = tl.load(s_ptr + row)[:, None]
    c_pos = tl.load(s_ptr + row + 1)[:, None]
    a_neg = tl.load(s_ptr + row + 2)[:, None]
    c_neg = tl.load(s_ptr + row + 3)[:, None]
    positive = u >= OFFSET
    m = tl.where(positive, u - OFFSET, OFFSET - 1 - u)
    power = ((m + (128 - OFFSET)) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.maximum(tl.where(positive, a_pos, a_neg) * power - tl.where(positive, c_pos, c_neg), 0.0)
    return tl.where(positive, magnitude, -magnitude)


@triton.jit
def _accumulate_phase(acc, u, x, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks, k0, K, GROUP, OFFSET: tl.constexpr,
                      HAS_ZERO: tl.constexpr, PER_TILE: tl.constexpr, MASK_K: tl.constexpr,
                      TWIN_LOG: tl.constexpr):
    """acc + Ŵ[cols, ks] · x[:, ks]ᵀ for the codes u = q + OFFSET, int32 [len(cols), len(ks)] in [0, 2^b),
    and x's columns ks, [BLOCK_M, len(ks)].

    u's bits under float32's exponent of 2^23 are the float 2^23 + u, so q − zero is one subtraction
    of 2^23 + OFFSET + zero (a per-row constant): exact, as every integer below 2^24 is in float32.
    That replaces an integer-to-float conversion and a zero-point subtraction per weight.
    """
    if TWIN_LOG:
        w = _dot_operand(_twin_log_values(u, s_ptr, cols, stride_sn, OFFSET), x_ptr.dtype.element_ty)
        return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    if PER_TILE:
        scale, zero = _group_params(s_ptr, z_ptr, cols, stride_sn, k0 + tl.zeros([1], dtype=tl.int32), K, GROUP,
                                    HAS_ZERO, False)
    else:
        scale, zero = _group_params(s_ptr, z_ptr, cols, stride_sn, ks, K, GROUP, HAS_ZERO, MASK_K)
    q_minus_zero = (u | _FLOAT_2_23_BITS).to(tl.float32, bitcast=True) - (_FLOAT_2_23 + OFFSET + zero)
    w = _dot_operand(q_minus_zero * scale, x_ptr.dtype.element_ty)
    return tl.dot(w, tl.trans(x), acc, input_precision="ieee")


@triton.jit
def _int3_codes(low, high, i: tl.constexpr):
    """Codes q + 4 of phase i from the low plane and the shifted, inverted high plane (`_accumulate_tile`)."""
    return ((low >> (2 * i)) & 3) | ((high >> i) & 4)


@triton.jit
def _accumulate_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, stride_xm, stride_wn, stride_sn, k0, K,
                     GROUP, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, PER_TILE: tl.constexpr,
                     BLOCK_K: tl.constexpr, MASK_K: tl.constexpr, TWIN_LOG: tl.constexpr):
    """acc + Ŵ[cols, k0:k0 + BLOCK_K] · x[rows, k0:k0 + BLOCK_K]ᵀ, one dot per phase.

    Channels at or past K contribute nothing when MASK_K. x is loaded in K order (contiguous, so
    software-pipelined by cp.async) and split into the phases in registers.
    """
    x = _x_tile(x_ptr, rows, stride_xm, k0, K, BLOCK_K, MASK_K)
    w_rows = cols.to(tl.int64)[:, None] * stride_wn
    # Codes u = q + 2^(b-1) (offset binary): flipping the sign bit of a two's complement b-bit value.
    if W_BITS == 8:
        ks = k0 + tl.arange(0, BLOCK_K)
        if MASK_K:
            q = tl.load(w_ptr + w_rows + ks[None, :], mask=(ks < K)[None, :], other=0)
        else:
            q = tl.load(w_ptr + w_rows + ks[None, :])
        acc = _accumulate_phase(acc, (q.to(tl.int32) & 0xFF) ^ 0x80, x, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks,
                                k0, K, GROUP, 128, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
    elif W_BITS == 4:
        j = tl.arange(0, BLOCK_K // 2)
        ks = k0 + 2 * j
        if MASK_K:
            p = tl.load(w_ptr + w_rows + (k0 // 2 + j)[None, :], mask=(ks < K)[None, :], other=0)
        else:
            p = tl.load(w_ptr + w_rows + (k0 // 2 + j)[None, :])
        p = p.to(tl.int32)
        x_even, x_odd = tl.split(tl.reshape(x, [x.shape[0], BLOCK_K // 2, 2]))
        acc = _accumulate_phase(acc, (p & 0xF) ^ 8, x_even, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks, k0, K, GROUP,
                                8, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
        acc = _accumulate_phase(acc, ((p >> 4) & 0xF) ^ 8, x_odd, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks + 1, k0,
                                K, GROUP, 8, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
    else:
        j = tl.arange(0, BLOCK_K // 4)
        ks = k0 + 4 * j
        low_cols = (k0 // 4 + j)[None, :]
        # High-plane byte j // 2 holds the third bits of elements k0 + 4j .. k0 + 4j + 3 from bit 4·(j mod 2).
        high_cols = (K // 4 + k0 // 8 + j // 2)[None, :]
        if MASK_K:
            valid = (ks < K)[None, :]
            low = tl.load(w_ptr + w_rows + low_cols, mask=valid, other=0)
            high = tl.load(w_ptr + w_rows + high_cols, mask=valid, other=0)
        else:
            low = tl.load(w_ptr + w_rows + low_cols)
            high = tl.load(w_ptr + w_rows + high_cols)
        low = low.to(tl.int32)
        # The third bit of element k0 + 4j (phase 0) moved to bit 2, inverted: the sign bit flipped.
        high = ~(high.to(tl.int32) >> (4 * (j % 2))[None, :] << 2)
        # Element k0 + 4j + 2a + b of x: split on b, then on a.
        x_b0, x_b1 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_K // 4, 2, 2]))
        x0, x2 = tl.split(x_b0)
        x1, x3 = tl.split(x_b1)
        acc = _accumulate_phase(acc, _int3_codes(low, high, 0), x0, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks, k0, K,
                                GROUP, 4, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
        acc = _accumulate_phase(acc, _int3_codes(low, high, 1), x1, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks + 1, k0,
                                K, GROUP, 4, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
        acc = _accumulate_phase(acc, _int3_codes(low, high, 2), x2, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks + 2, k0,
                                K, GROUP, 4, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
        acc = _accumulate_phase(acc, _int3_codes(low, high, 3), x3, x_ptr, s_ptr, z_ptr, cols, stride_sn, ks + 3, k0,
                                K, GROUP, 4, HAS_ZERO, PER_TILE, MASK_K, TWIN_LOG)
    return acc


# Contract:
#   x:     float16/bfloat16/float32 [M, K], row stride stride_xm, columns contiguous
#   w:     int8 [N, K // 2] (W_BITS 4: element 2j in the low nibble of byte j, two's complement, read
#          as int8), int8 [N, K] (W_BITS 8) or uint8 [N, 3K // 8] (W_BITS 3: two bit planes,
#          `pack_int3`); row stride stride_wn
#   scale: float32 [N, K // GROUP], row stride stride_sn; TWIN_LOG: float32 [N, 4] (a⁺, c⁺, a⁻, c⁻), GROUP = K
#   zero:  int8 [N, K // GROUP], row stride stride_sn (HAS_ZERO)
#   bias:  [N] float (HAS_BIAS)
#   out:   [M, N] float32/float16/bfloat16, row stride stride_om
# GROUP divides K. PER_TILE: every K tile lies inside one group (GROUP == K or BLOCK_K divides
# GROUP). BLOCK_K is a multiple of 8 for W_BITS 3; a last, masked K tile takes what the full ones
# leave. M_BUCKET only keys the autotuner. Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N).
@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                        stride_om, GROUP, M_BUCKET, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PER_TILE: tl.constexpr, TWIN_LOG: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rows, cols, row_mask, col_mask = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Full tiles unmasked (their loads software-pipelined), then one masked tile if K needs one.
    k_full = K - K % BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc = _accumulate_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, stride_xm, stride_wn, stride_sn, k0,
                               K, GROUP, W_BITS, HAS_ZERO, PER_TILE, BLOCK_K, False, TWIN_LOG)
    if k_full < K:
        acc = _accumulate_tile(acc, x_ptr, w_ptr, s_ptr, z_ptr, rows, cols, stride_xm, stride_wn, stride_sn,
                               k_full, K, GROUP, W_BITS, HAS_ZERO, PER_TILE, BLOCK_K, True, TWIN_LOG)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols).to(tl.float32)[:, None]
    if _INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bfloat16(acc)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[None, :] * stride_om + cols[:, None], out,
             mask=col_mask[:, None] & row_mask[None, :])


def _per_tile(args: dict) -> bool:
    return args["GROUP"] == args["K"] or args["GROUP"] % args["BLOCK_K"] == 0


_weight_only = triton.heuristics({"PER_TILE": _per_tile})(_weight_only_kernel)


def _unspilled(cfg: triton.Config) -> triton.Config:
    """cfg with every register a thread may have (255): left to itself ptxas stopped at 128 registers
    and spilled 4-12 bytes on some of these tiles (3-bit 16 x 32 x 128 on 2 warps: 149 suffice)."""
    return triton.Config(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=255)


# BLOCK_M 16 serves M <= 16 (the conditioning GEMMs): memory-bound, so narrow weight tiles give more
# programs to keep HBM busy. Taller tiles serve token GEMMs, where each dequantized weight tile is
# reused across BLOCK_M rows. BLOCK_N 64 per 4 warps lets Hopper use wgmma (one warp group per 64
# weight rows); other tiles run mma.sync (or wgmma split along M). K tiles of 256 and 128 x 64 tiles
# on 4 warps spilled or came within a few registers of it on sm_80 (bench/weight_only_build.py).
CONFIGS = [_unspilled(cfg) for cfg in (
    _config(16, 32, 128, 2, 3),
    _config(16, 32, 128, 4, 3),
    _config(16, 64, 128, 4, 3),
    _config(16, 128, 128, 8, 3),
    _config(32, 64, 128, 4, 3),
    _config(64, 64, 64, 8, 3),
    _config(64, 128, 64, 8, 3),
    _config(128, 64, 64, 8, 3),
    _config(128, 128, 64, 8, 3),
)]

# A coarse guard on registers per thread (`register_estimate`), against configurations added later:
# the shipped ones estimate at most 112 and compiled with 93-163 (sm_90) and 104-242 (sm_80)
# registers and no spills (bench/weight_only_build.py; tests/kernels/test_weight_only_build.py is the check);
# tiles of 128 weights per thread (estimate 200) took 219-255 registers and spilled with zero points.
MAX_REGISTER_ESTIMATE = 128


def shared_memory_bytes(cfg: triton.Config, w_bits: int, x_bytes: int) -> int:
    """An upper bound on the shared memory the kernel takes with this configuration (when the
    scales are read per tile): num_stages buffered x and packed weight tiles, and the dequantized
    weight and x operand tiles of one phase staged for the tensor-core product."""
    kw = cfg.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    loaded = bm * bk * x_bytes + bn * bk * w_bits // 8
    phase_k = bk // PHASES[w_bits]
    return cfg.num_stages * loaded + (bn + bm) * phase_k * x_bytes


def register_estimate(cfg: triton.Config) -> int:
    """32-bit registers per thread: the float32 accumulator and 1.5 per weight of a K tile."""
    kw = cfg.kwargs
    threads = 32 * cfg.num_warps
    return (kw["BLOCK_M"] * kw["BLOCK_N"] + 3 * kw["BLOCK_N"] * kw["BLOCK_K"] // 2) // threads


def min_block_k(w_bits: int, x_bytes: int) -> int:
    """The narrowest K tile on GPUs: each phase (BLOCK_K / PHASES) must be a tensor-core dot's K."""
    return PHASES[w_bits] * MIN_GPU_DOT_K * 2 // x_bytes


def fits(cfg: triton.Config, w_bits: int, x_bytes: int, capability: int) -> bool:
    """Whether the configuration fits the device's shared memory, compiles without spills, and its
    phases are wide enough for a tensor-core dot."""
    smem = SHARED_MEMORY_LIMIT.get(capability, SHARED_MEMORY_LIMIT[89])
    return (shared_memory_bytes(cfg, w_bits, x_bytes) <= smem and register_estimate(cfg) <= MAX_REGISTER_ESTIMATE
            and cfg.kwargs["BLOCK_K"] >= min_block_k(w_bits, x_bytes))


def _narrowed(cfg: triton.Config, group: int, k: int, w_bits: int, x_bytes: int) -> triton.Config:
    """cfg with BLOCK_K narrowed to the widest power of two dividing the group (when groups split K),
    so that a tile reads one scale per row; not below `min_block_k`, where scales are gathered."""
    block_k = cfg.kwargs["BLOCK_K"]
    if group < k:
        block_k = min(block_k, max(group & -group, min_block_k(w_bits, x_bytes)))
    return triton.Config(dict(cfg.kwargs, BLOCK_K=block_k), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                         maxnreg=cfg.maxnreg)


def prune_configs(configs: list[triton.Config], m_bucket_: int, group: int, k: int, w_bits: int, x_bytes: int,
                  capability: int) -> list[triton.Config]:
    """The configurations to try for a launch, before anything is compiled: K tiles fitted to the
    groups (`_narrowed`), tiles no taller than the M bucket (and, from M = 128, at least 64 rows:
    large M is compute-bound and reuses each dequantized tile across rows), those that fit the
    device (`fits`), duplicates removed."""
    kept, seen = [], set()
    for cfg in configs:
        cfg = _narrowed(cfg, group, k, w_bits, x_bytes)
        key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, cfg.maxnreg)
        block_m = cfg.kwargs["BLOCK_M"]
        if (key not in seen and block_m <= max(m_bucket_, 16) and (m_bucket_ < 128 or block_m >= 64)
                and fits(cfg, w_bits, x_bytes, capability)):
            seen.add(key)
            kept.append(cfg)
    if not kept:
        raise ValueError(f"no weight-only GEMM configuration fits a device of compute capability {capability} "
                         f"(M bucket {m_bucket_}, {w_bits}-bit weights, {8 * x_bytes}-bit activations)")
    return kept


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # The launch's own device (sm_86/89 have less shared memory than sm_80).
    x = named_args["x_ptr"]
    return prune_configs(configs, named_args["M_BUCKET"], named_args["GROUP"], named_args["K"], kwargs["W_BITS"],
                         x.element_size(), _capability(x.device))


_weight_only_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "W_BITS", "HAS_ZERO", "TWIN_LOG"],
                                     prune_configs_by={"early_config_prune": _prune})(_weight_only)

# The interpreter's tiles: smaller than the tests' shapes so that masking and several programs are
# exercised; 32-wide K tiles take the per-tile scales for groups of 32 and wider, gathered ones below.
SMALL_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)

WEIGHT_BITS = (3, 4, 8)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_arguments(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                     bias: torch.Tensor | None, k: int, w_bits: int, group: int,
                     out_dtype: torch.dtype, twin_log: bool = False) -> None:
    if w_bits not in WEIGHT_BITS or (twin_log and w_bits not in TWIN_LOG):
        raise ValueError(f"w_bits must be 3, 4 or 8 (3 or 4 for twin-log weights); got {w_bits}")
    fmt = TWIN_LOG[w_bits] if twin_log else integer_format(w_bits)
    if k <= 0 or fmt.width_problem(k):
        raise ValueError(f"in_features must be a positive multiple of {fmt.width_multiple} for "
                         f"{w_bits}-bit weights; got {k}")
    if group <= 0 or k % group:
        raise ValueError(f"w_group must be None (one group per row) or a positive divisor of in_features = {k}; "
                         f"got {group}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] (in_features = {k}; reshape leading dimensions into M); got "
                         f"shape {tuple(x.shape)}")
    dtype, width = fmt.storage(k)
    if qweight.dim() != 2 or qweight.dtype != dtype or qweight.shape[1] != width:
        raise ValueError(f"qweight for w_bits={w_bits} must be {dtype} [N, {width}] (the {fmt.name} storage of "
                         f"kernels/formats.py and kernels/packing.py); got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if twin_log and (group != k or w_zero is not None):
        raise ValueError("twin-log weights have one set of parameters per row: no groups, no zero points")
    scale_shape = fmt.scale_shape(n, k, None if group == k else group)
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != scale_shape:
        raise ValueError(f"w_scale must be float32 {list(scale_shape)}; got {w_scale.dtype} {tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.dtype != torch.int8 or tuple(w_zero.shape) != scale_shape):
        raise ValueError(f"w_zero must be int8 {list(scale_shape)} or None; got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"bias must be a float tensor of shape [{n}] or None; got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    if any(t.device != x.device for t in (qweight, w_scale, w_zero, bias) if t is not None):
        raise ValueError("x, qweight, w_scale, w_zero and bias must be on the same device")
    if not x.is_cuda and not interpreted():
        raise RuntimeError("the weight-only Triton kernel runs on CUDA tensors, or on CPU tensors under Triton's "
                           "interpreter: set TRITON_INTERPRET=1 in the environment before importing "
                           "clq_compile, or use the torch reference (kernels/reference.py)")


def weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                       bias: torch.Tensor | None, in_features: int, w_bits: int, w_group: int | None,
                       out_dtype: torch.dtype, twin_log: bool = False) -> torch.Tensor:
    """Weight-only quantized product: out [M, N] = x · (w_scale ⊙ (q − w_zero))ᵀ + bias.

    x:       float16/bfloat16/float32 [M, K] (K = in_features)
    qweight: uint8 [N, K // 2] (w_bits 4), int8 [N, K] (w_bits 8) or uint8 [N, 3K // 8] (w_bits 3),
             the signed storage of kernels/packing.py
    w_scale: float32 [N, K // g] with g = w_group or K;  w_zero: int8 [N, K // g] or None
    bias:    [N] float or None.  Returns out_dtype [M, N].

    twin_log: the codes are tlq3 / tlq4 (kernels/formats.py) and w_scale float32 [N, 4] their rows'
    parameters; Ŵ is then their decoded values.

    Ŵ is rounded to x's dtype before the product (float32 x: Ŵ stays float32); the sum is float32.
    """
    k = in_features
    group = w_group or k
    _check_arguments(x, qweight, w_scale, w_zero, bias, k, w_bits, group, out_dtype, twin_log)
    m, n = x.shape[0], qweight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x = x.contiguous()
    qweight = qweight.contiguous()
    w_scale = w_scale.contiguous()
    w_zero = None if w_zero is None else w_zero.contiguous()
    w = qweight.view(torch.int8) if w_bits == 4 else qweight
    args = (x, w, w_scale, w_zero, bias, out, m, n, k, x.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
            group, m_bucket(m))
    meta = dict(W_BITS=w_bits, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, TWIN_LOG=twin_log)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if interpreted():
        _weight_only[grid(SMALL_CONFIG)](*args, **meta, **SMALL_CONFIG)
    else:
        _weight_only_tuned[grid](*args, **meta)
    return out
