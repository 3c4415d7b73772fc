"""Triton integer GEMM for W4A4, W4A8 and W8A8: y = dequant(a) · dequant(w)ᵀ + bias.

One template serves every bit width: each operand tile is loaded in its storage format (4-bit values
packed two per byte along K, or int8) and unpacked in registers to int8 in true K order, so the
product is always an int8 `tl.dot` accumulating in int32. GPUs have no 4-bit integer tensor cores
past Ampere, and Hopper has none at all: the win of 4 bits is in the bytes moved, the math runs at
the int8 rate (README, Kernels).

Scales: K is split into chunks of gcd(a_group, w_group) channels, inside which one activation scale
and one weight scale apply. Each chunk is accumulated exactly in int32, corrected for the weight's
zero point through the activation's row sums, then added to a float32 accumulator times both scales
— the operations of `quant_linear_reference`, in its order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_quantize import interpreted


@triton.jit
def _load_operand(ptr, rows, row_mask, stride_row, k0, k_end, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """int8 [len(rows), BLOCK_K]: elements k0 .. k0 + BLOCK_K of the given rows, 0 where masked."""
    rows64 = rows.to(tl.int64)
    if BITS == 4:
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & (cols < k_end // 2)[None, :]
        packed = tl.load(ptr + rows64[:, None] * stride_row + cols[None, :], mask=mask, other=0)
        # Shifting a nibble to the top of a signed byte and back sign-extends it; interleaving puts
        # element 2j (low nibble) before 2j + 1 (high nibble).
        return tl.interleave((packed << 4) >> 4, packed >> 4)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & (cols < k_end)[None, :]
        return tl.load(ptr + rows64[:, None] * stride_row + cols[None, :], mask=mask, other=0)


@triton.jit
def _accumulate_tile(acc, a_ptr, w_ptr, rows, row_mask, cols, col_mask, stride_am, stride_wn, k0, K,
                     A_BITS: tl.constexpr, W_BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(acc + a[rows, k0:k0 + BLOCK_K] · w[cols, k0:k0 + BLOCK_K]ᵀ exact in int32, the int8 tile of a)."""
    a = _load_operand(a_ptr, rows, row_mask, stride_am, k0, K, A_BITS, BLOCK_K, EVEN_K)
    w = _load_operand(w_ptr, cols, col_mask, stride_wn, k0, K, W_BITS, BLOCK_K, EVEN_K)
    return tl.dot(a, tl.trans(w), acc), a


@triton.jit
def _add_scaled_chunk(acc, prod, rowsum, c0, a_scale_ptr, w_scale_ptr, w_zero_ptr, rows, row_mask, cols,
                      col_mask, stride_asm, stride_wsn, A_GROUP, W_GROUP, HAS_ZERO: tl.constexpr):
    """acc + (prod - rowsum · w_zero) * a_scale * w_scale, scales of the chunk starting at channel c0."""
    w_idx = cols.to(tl.int64) * stride_wsn + c0 // W_GROUP
    if HAS_ZERO:
        zero = tl.load(w_zero_ptr + w_idx, mask=col_mask, other=0).to(tl.int32)
        prod = prod - rowsum[:, None] * zero[None, :]
    a_s = tl.load(a_scale_ptr + rows.to(tl.int64) * stride_asm + c0 // A_GROUP, mask=row_mask, other=0.0)
    w_s = tl.load(w_scale_ptr + w_idx, mask=col_mask, other=0.0)
    return acc + prod.to(tl.float32) * a_s[:, None] * w_s[None, :]


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
def _round_to_bfloat16(v):
    """float32 -> bfloat16, ties to even, with integer operations.

    The interpreter's float32 -> bfloat16 cast truncates; this gives torch's rounding everywhere.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


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
# SINGLE_CHUNK (EVEN_K tells whether the last K tile needs a mask). Grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N).
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _quant_matmul_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, w_zero_ptr, bias_ptr, out_ptr, M, N, K,
                         stride_am, stride_wn, stride_asm, stride_wsn, stride_om, A_GROUP, W_GROUP,
                         CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr, A_BITS: tl.constexpr,
                         W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    # One flat loop over K tiles keeps the loads software-pipelined. With several chunks, each one's
    # exact int32 product is folded into the float32 accumulator as the chunk ends; with one chunk
    # the float32 accumulator stays out of the loop, which halves the registers it holds.
    for k0 in range(0, K, BLOCK_K):
        prod, a = _accumulate_tile(prod, a_ptr, w_ptr, rows, row_mask, cols, col_mask, stride_am, stride_wn,
                                   k0, K, A_BITS, W_BITS, BLOCK_K, EVEN_K)
        if HAS_ZERO:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
        if not SINGLE_CHUNK:
            if (k0 + BLOCK_K) % CHUNK == 0:
                acc = _add_scaled_chunk(acc, prod, rowsum, k0 + BLOCK_K - CHUNK, a_scale_ptr, w_scale_ptr,
                                        w_zero_ptr, rows, row_mask, cols, col_mask, stride_asm, stride_wsn,
                                        A_GROUP, W_GROUP, HAS_ZERO)
                prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                rowsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    if SINGLE_CHUNK:
        acc = _add_scaled_chunk(acc, prod, rowsum, 0, a_scale_ptr, w_scale_ptr, w_zero_ptr, rows, row_mask,
                                cols, col_mask, stride_asm, stride_wsn, A_GROUP, W_GROUP, HAS_ZERO)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bfloat16(acc)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out,
             mask=row_mask[:, None] & col_mask[None, :])


# Contract: a, w as for _quant_matmul_kernel; out: int32 [M, N] = a · wᵀ, row stride stride_om.
# The GEMM's inner loop alone, so that tests can compare accumulators bit for bit.
@triton.jit
def _int_matmul_kernel(a_ptr, w_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
                       A_BITS: tl.constexpr, W_BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N, 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    prod = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        prod, _ = _accumulate_tile(prod, a_ptr, w_ptr, rows, row_mask, cols, col_mask, stride_am, stride_wn,
                                   k0, K, A_BITS, W_BITS, BLOCK_K, EVEN_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], prod,
             mask=row_mask[:, None] & col_mask[None, :])


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int,
            group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Ampere / Ada (sm_80, sm_86, sm_89): int8 mma.sync m16n8k32, 164 KB (sm_80) or 100 KB (sm_86/89)
# of shared memory per SM; 4-bit tiles take half the bytes of their int8 counterparts. These and the
# Hopper list compile without register spills for one chunk (K = 1152); they are yet to be timed.
SM80_CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 128, 128, 4, 4),
    _config(128, 128, 128, 8, 3),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 5),
    _config(128, 128, 64, 4, 4),
    _config(64, 64, 64, 2, 5),
]

# Hopper (sm_90): int8 wgmma wants a warp group (4 warps) per 64 rows and deep pipelines over 228 KB.
SM90_CONFIGS = [
    _config(128, 256, 128, 8, 4),
    _config(256, 128, 128, 8, 4),
    _config(128, 256, 256, 8, 3),
    _config(128, 128, 128, 4, 5),
    _config(128, 128, 256, 8, 4),
    _config(64, 256, 128, 4, 4),
    _config(64, 128, 128, 4, 5),
    _config(128, 64, 128, 4, 5),
    _config(64, 64, 128, 4, 6),
]

# int8 tl.dot on NVIDIA GPUs needs K tiles of at least 32.
MIN_GPU_BLOCK_K = 32


def _fit_to_chunk(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configurations with BLOCK_K narrowed to the widest power of two dividing the chunk.

    Below the 32 channels an int8 dot needs, a single chunk (all of K) keeps 32-wide tiles and the
    kernel masks the last one; narrower groups are refused by `quant_matmul`.
    """
    chunk = kwargs["CHUNK"]
    widest = max(MIN_GPU_BLOCK_K, chunk & -chunk)
    if not kwargs["SINGLE_CHUNK"]:
        # Several chunks keep an int32 and a float32 accumulator: tiles past 64 elements of each per
        # thread spill registers.
        small = [cfg for cfg in configs
                 if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 64 * 32 * cfg.num_warps]
        configs = small or configs
    fitted, seen = [], set()
    for cfg in configs:
        kw = dict(cfg.kwargs, BLOCK_K=min(cfg.kwargs["BLOCK_K"], widest))
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            fitted.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return fitted


_AUTOTUNE_KEY = ["M", "N", "K", "CHUNK", "A_BITS", "W_BITS", "HAS_ZERO"]
_quant_matmul_sm80, _quant_matmul_sm90 = (
    triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _fit_to_chunk})(
        _quant_matmul_kernel)
    for configs in (SM80_CONFIGS, SM90_CONFIGS))

# One small configuration for the interpreter (which runs every program in Python, so autotuning
# would only cost time) and for int_matmul_triton, a checking tool: tiles smaller than the tests'
# shapes so that masking is exercised, K tiles as wide as the chunk allows.
SMALL_BLOCK_M = 32
SMALL_BLOCK_N = 32
SMALL_MAX_BLOCK_K = 32


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
    chunk = math.gcd(ag, wg)
    gpu = not interpreted()
    if gpu and chunk < k and chunk % MIN_GPU_BLOCK_K:
        raise ValueError(f"on GPUs the groups (activations {ag}, weights {wg}) must be multiples of "
                         f"{MIN_GPU_BLOCK_K} channels, the narrowest K tile of an int8 tensor-core product")
    args = (a.view(torch.int8), w.view(torch.int8), a_scale, w_scale, w_zero, bias, out, m, n, k,
            a.stride(0), w.stride(0), a_scale.stride(0), w_scale.stride(0), out.stride(0), ag, wg)
    meta = dict(CHUNK=chunk, SINGLE_CHUNK=chunk == k, A_BITS=a_bits, W_BITS=w_bits,
                HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if not gpu:
        cfg = dict(BLOCK_M=SMALL_BLOCK_M, BLOCK_N=SMALL_BLOCK_N,
                   BLOCK_K=_small_block_k(chunk), GROUP_M=2)
        _quant_matmul_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        hopper = torch.cuda.get_device_capability(a.device)[0] >= 9
        (_quant_matmul_sm90 if hopper else _quant_matmul_sm80)[grid](*args, **meta)
    return out


def int_matmul_triton(a: torch.Tensor, w: torch.Tensor, in_features: int, a_bits: int, w_bits: int,
                      block_k: int | None = None) -> torch.Tensor:
    """Exact integer product of stored operands: int32 [M, N] = unpack(a) · unpack(w)ᵀ.

    a: [M, K // 2] or [M, K] and w: [N, K // 2] or [N, K], as for `quant_matmul`. The GEMM's inner
    loop without scales, with fixed small tiles: a tool for comparing accumulators with
    `int_matmul` of kernels/reference.py, not a tuned kernel. block_k: the K tile, by default the
    widest power of two dividing K; one that does not divide K runs the masked path.
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
    if block_k is None:
        block_k = _small_block_k(k) if interpreted() else max(MIN_GPU_BLOCK_K, _small_block_k(k))
    if block_k < 2 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 2; got {block_k}")
    grid = (triton.cdiv(m, SMALL_BLOCK_M) * triton.cdiv(n, SMALL_BLOCK_N),)
    _int_matmul_kernel[grid](a.view(torch.int8), w.view(torch.int8), out, m, n, k, a.stride(0), w.stride(0),
                             out.stride(0), A_BITS=a_bits, W_BITS=w_bits, BLOCK_M=SMALL_BLOCK_M,
                             BLOCK_N=SMALL_BLOCK_N, BLOCK_K=block_k, EVEN_K=k % block_k == 0)
    return out


def _small_block_k(chunk: int) -> int:
    # The widest power of two dividing the chunk (even, as 4-bit operands need), capped.
    return max(2, min(chunk & -chunk, SMALL_MAX_BLOCK_K))
