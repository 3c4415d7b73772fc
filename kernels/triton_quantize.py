"""Triton kernel for dynamic activation quantization with the online transform fused in.

The kernel reads x once and writes the integers and scales once. It sees x: [M, K] as M·K/U *units*:
U consecutive channels of one token (U a power of two; unit r is token r // (K/U), channels
(r mod K/U)·U ...). A program holds a run of whole units in registers: SPP quantization groups of
SEG units each (a group wider than a unit, e.g. a per-token scale over K = 1152 = 9·128), or units
of NSUB groups each (a group narrower than a unit), as two tiles of power-of-two rows (8 tokens of
9 units are 64 + 8 rows, not 128), so that the programs spread evenly over the multiprocessors.
Per unit it computes

    T(x) = (x * act_mul)[:, act_perm] @ blockdiag(R, ...)          (each part optional)

(`transform_activation` in kernels/reference.py), a symmetric scale per group, and the rounded
integers, packed two per byte for 4 bits (the nibble layout of kernels/packing.py).

The fused rotation is a block R of U = b channels whose entries are all ±c (every Hadamard
rotation, normalized or randomized): T(x) = c · (x @ sign(R)). sign(R) is exact in bfloat16/float16,
so x @ sign(R) runs on tensor cores with float32 accumulation; x is split into one (bfloat16/float16
input) or three (float32 input or a multiplier) bfloat16 parts whose sum is exactly x, so every
product is exact. Other rotations (not ±c, blocks that are not powers of two from 16 to
MAX_FUSED_ROTATION channels, or blocks that neither hold whole groups nor lie inside one) are
applied by `transform_activation` first, and the kernel quantizes T(x).

The quantization follows `quantize_activation` bit for bit on T(x), without a division per value:
scale = max(absmax / qmax, MIN_SCALE), where absmax / qmax is a multiplication by RN(1 / qmax)
and one exact-residual correction (two fmas: Markstein's theorem makes the result the correctly
rounded quotient); one correctly rounded division per group gives 1 / scale; per value,
y = v · (1 / scale) corrected the same way is RN(v / scale), and adding 1.5·2^23 rounds it to the
nearest integer, ties to even. T(x) itself can differ from the reference in the last bit where a
rotation sums in another order. A NaN in a group makes its scale NaN (GPU min/max drop NaN, so
the maximum propagates it explicitly).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .quantize import MIN_SCALE
from .reference import transform_activation

_MIN_SCALE = tl.constexpr(MIN_SCALE)
# 1.5 · 2^23: for |y| < 2^22, y + ROUNDER rounds y to an integer n (ties to even) and holds it in
# the low mantissa bits: the float's bits are 0x4B400000 + n.
_ROUNDER = tl.constexpr(12582912.0)

# Largest rotation block fused in the kernel: the ±1 matrix of a 128-channel block is 32 KiB of
# shared memory in bfloat16.
MAX_FUSED_ROTATION = 128
# tl.dot multiplies matrices of at least 16 rows and columns.
MIN_DOT = 16


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _split_bfloat16(v):
    """Three float32 tensors, each exactly a bfloat16, that sum to v exactly (truncated significands).

    An infinite v is its own hi, with rest 0 (not inf - inf); a NaN stays NaN.
    """
    hi = (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    rest = tl.where(hi == v, 0.0, v - hi)
    mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return hi, mid, rest - mid


@triton.jit
def _rotate(v, rot_ptr, signs_ptr, U: tl.constexpr, SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """float32 [BR, U]: v @ R for a rotation block R [U, U] whose entries are all ±c, as c · (v @ sign(R)).

    v: [BR, U] in x's dtype (SPLIT 1: bfloat16/float16, the dot's operand type) or float32 (SPLIT 3).
    signs: sign(R) [U, U], contiguous, in the dot's operand type (float32 when DOT_IN_FP32).
    """
    i = tl.arange(0, U)
    signs = tl.load(signs_ptr + i[:, None] * U + i[None, :])
    c = tl.abs(tl.load(rot_ptr))
    if SPLIT == 1:
        acc = tl.dot(v.to(signs.dtype), signs, input_precision="ieee" if DOT_IN_FP32 else None)
    else:
        parts = _split_bfloat16(v)
        acc = tl.zeros([v.shape[0], U], tl.float32)
        for p in tl.static_range(3):
            acc = tl.dot(parts[p].to(signs.dtype), signs, acc, input_precision="ieee" if DOT_IN_FP32 else None)
    return acc * c


@triton.jit
def _load_units(x_ptr, mul_ptr, perm_ptr, first, local, valid, stride_xm, stride_xk, NU: tl.constexpr,
                U: tl.constexpr, HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr, CONTIGUOUS: tl.constexpr,
                SPLIT: tl.constexpr):
    """[R, U] of (x * act_mul)[:, act_perm] at units first + local: x's dtype, or float32 with a
    multiplier or SPLIT 3; 0 where not valid.

    CONTIGUOUS: x is contiguous and not gathered, so unit r starts at element r·U: one 64-bit base
    per program and 32-bit offsets, instead of a token index and a 64-bit row offset per unit.
    """
    r = first + local
    token = r // NU
    chans = (r - token * NU)[:, None] * U + tl.arange(0, U)[None, :]
    if HAS_PERM:
        chans = tl.load(perm_ptr + chans, mask=valid[:, None], other=0)
    if CONTIGUOUS:
        ptrs = x_ptr + first.to(tl.int64) * U + (local[:, None] * U + tl.arange(0, U)[None, :])
    else:
        ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xm + chans * stride_xk
    v = tl.load(ptrs, mask=valid[:, None], other=0.0)
    if HAS_MUL:
        v = v.to(tl.float32) * tl.load(mul_ptr + chans, mask=valid[:, None], other=0.0).to(tl.float32)
    elif SPLIT != 1:
        v = v.to(tl.float32)
    return v


@triton.jit
def _unit_absmax(v, R: tl.constexpr, U: tl.constexpr, NSUB: tl.constexpr):
    """T(x) v: [R, U] -> [R, NSUB], the maximum of |v| over each of a unit's NSUB groups (NaN if the
    group has one)."""
    return tl.reduce(tl.reshape(tl.abs(v), [R, NSUB, U // NSUB]), 2, _max_keeping_nan)


@triton.jit
def _group_max(m, m2, BR: tl.constexpr, BR2: tl.constexpr, SEG: tl.constexpr, SPP_PAD: tl.constexpr):
    """[SPP_PAD]: group s's maximum over its SEG units (local units s·SEG ... (s+1)·SEG - 1), from the
    per-unit maxima of the first part m: [BR, 1] and of the second part m2: [BR2, 1] (unused when
    BR2 is 0), local units BR ... BR + BR2 - 1.

    Group s gathers its units into row s of [SPP_PAD, SEG_PAD]: indices past its end repeat a unit
    of the program, which leaves a maximum unchanged; padding groups read a group of their own that
    is never stored.
    """
    SEG_PAD: tl.constexpr = triton.next_power_of_2(SEG)
    s = tl.arange(0, SPP_PAD)[:, None]
    t = tl.arange(0, SEG_PAD)[None, :]
    members = tl.reshape(tl.minimum(s * SEG + tl.minimum(t, SEG - 1), BR + BR2 - 1), [SPP_PAD * SEG_PAD])
    gathered = tl.gather(tl.reshape(m, [BR]), tl.minimum(members, BR - 1), 0)
    if BR2 > 0:
        second = tl.gather(tl.reshape(m2, [BR2]), tl.maximum(members - BR, 0), 0)
        gathered = tl.where(members < BR, gathered, second)
    return tl.reduce(tl.reshape(gathered, [SPP_PAD, SEG_PAD]), 1, _max_keeping_nan)


@triton.jit
def _quantized_integers(v, scale, recip):
    """round(v / scale) in the low 8 bits of an int32 (two's complement), given recip = 1 / scale
    (both correctly rounded), for |v| <= absmax.

    The reference then clamps to [-qmax - 1, qmax]; that never binds: scale >= RN(absmax / qmax)
    gives |v / scale| <= qmax · (1 + 2^-23) < qmax + 1/2.
    """
    y = v * recip
    y = tl.fma(tl.fma(-y, scale, v), recip, y)
    # ROUNDER's own bits are 0 below bit 22, so the low byte is the integer's.
    return (y + _ROUNDER).to(tl.int32, bitcast=True)


@triton.jit
def _divide_by_qmax(a, BITS: tl.constexpr):
    """RN(a / qmax) for a >= 2^-126 (smaller a end below MIN_SCALE anyway) with one multiplication by
    RN(1 / qmax) and the exact-residual correction, instead of a division."""
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    RECIP: tl.constexpr = 1.0 / QMAX
    q = a * RECIP
    # An infinite a leaves q infinite, and its residual would be inf - inf.
    return tl.where(q == float("inf"), q, tl.fma(tl.fma(q, -1.0 * QMAX, a), RECIP, q))


@triton.jit
def _per_channel(s, R: tl.constexpr, U: tl.constexpr, NSUB: tl.constexpr):
    """[R, NSUB] per-group values -> [R, U], each repeated over its group's channels."""
    return tl.reshape(tl.broadcast_to(s[:, :, None], [R, NSUB, U // NSUB]), [R, U])


@triton.jit
def _scale_and_reciprocal(absmax, BITS: tl.constexpr):
    """(scale, 1 / scale), both correctly rounded, from a group's maximum |T(x)|."""
    scale = tl.maximum(_divide_by_qmax(absmax, BITS), _MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _transformed_units(x_ptr, mul_ptr, perm_ptr, rot_ptr, signs_ptr, first, local, valid, stride_xm, stride_xk,
                       NU: tl.constexpr, U: tl.constexpr, HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr,
                       CONTIGUOUS: tl.constexpr, HAS_ROT: tl.constexpr, SPLIT: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr):
    """float32 [R, U]: T(x) at units first + local: [R] (0 where not valid)."""
    v = _load_units(x_ptr, mul_ptr, perm_ptr, first, local, valid, stride_xm, stride_xk, NU, U, HAS_MUL, HAS_PERM,
                    CONTIGUOUS, SPLIT)
    if HAS_ROT:
        v = _rotate(v, rot_ptr, signs_ptr, U, SPLIT, DOT_IN_FP32)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def _quantize_rows(q_ptr, scale_ptr, v, m, first, local, valid, group_scale, group_recip, R: tl.constexpr,
                   U: tl.constexpr, SEG: tl.constexpr, NSUB: tl.constexpr, SPP_PAD: tl.constexpr,
                   BITS: tl.constexpr):
    """Quantizes and stores the rows v: [R, U] of units first + local.

    SEG > 1: the scales are their groups' (group_scale, group_recip: [SPP_PAD], stored by the
    caller); else each row's NSUB groups take theirs from the row's maxima m: [R, NSUB], stored here.
    """
    if SEG > 1:
        g = tl.minimum(local // SEG, SPP_PAD - 1)
        scale = tl.gather(group_scale, g, 0)[:, None]
        recip = tl.gather(group_recip, g, 0)[:, None]
    else:
        scale, recip = _scale_and_reciprocal(m, BITS)
        tl.store(scale_ptr + first.to(tl.int64) * NSUB + (local[:, None] * NSUB + tl.arange(0, NSUB)[None, :]),
                 scale, mask=valid[:, None])
    q = _quantized_integers(v, _per_channel(scale, R, U, NSUB), _per_channel(recip, R, U, NSUB))
    # q is contiguous: unit r's values start at r·U (r·U / 2 bytes packed).
    if BITS == 4:
        even, odd = tl.split(tl.reshape(q, [R, U // 2, 2]))
        packed = ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.uint8)
        tl.store(q_ptr + first.to(tl.int64) * (U // 2) + (local[:, None] * (U // 2) + tl.arange(0, U // 2)[None, :]),
                 packed, mask=valid[:, None])
    else:
        tl.store(q_ptr + first.to(tl.int64) * U + (local[:, None] * U + tl.arange(0, U)[None, :]), q.to(tl.int8),
                 mask=valid[:, None])


# Contract:
#   x:     [M, K] float32/float16/bfloat16, any strides (CONTIGUOUS: contiguous, and no HAS_PERM)
#   mul:   [K] float (HAS_MUL), indexed by input channel
#   perm:  int64 [K] (HAS_PERM), output channel j reads input channel perm[j]
#   rot:   [U, U] (HAS_ROT), entries all ±c, applied to every unit; only |rot[0, 0]| = c is read
#   signs: sign(rot) [U, U] contiguous, the dot's operand type
#   q:     uint8 [M, K // 2] (BITS 4, element 2j in the low nibble) or int8 [M, K] (BITS 8), contiguous
#   scale: float32 [M, K // group], contiguous
# Grid: (cdiv(units, SPP·SEG),) with units = M·NU, NU = K // U. A program takes the SPP·SEG units
# from pid·SPP·SEG as two tiles of BR and BR2 rows (powers of two, BR2 = 0 for none, BR + BR2 >=
# SPP·SEG): any number of whole groups without padding to the next power of two. Group width:
# U // NSUB (SEG = 1) or SEG·U.
@triton.jit
def _quantize_kernel(x_ptr, mul_ptr, perm_ptr, rot_ptr, signs_ptr, q_ptr, scale_ptr, units, stride_xm,
                     stride_xk, NU: tl.constexpr, U: tl.constexpr, SEG: tl.constexpr, NSUB: tl.constexpr,
                     SPP: tl.constexpr, SPP_PAD: tl.constexpr, BR: tl.constexpr, BR2: tl.constexpr,
                     BITS: tl.constexpr, HAS_MUL: tl.constexpr, HAS_PERM: tl.constexpr, HAS_ROT: tl.constexpr,
                     CONTIGUOUS: tl.constexpr, SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    UPP: tl.constexpr = SPP * SEG
    first = tl.program_id(0) * UPP
    local = tl.arange(0, BR)
    valid = (local < UPP) & (first + local < units)
    v = _transformed_units(x_ptr, mul_ptr, perm_ptr, rot_ptr, signs_ptr, first, local, valid, stride_xm, stride_xk,
                           NU, U, HAS_MUL, HAS_PERM, CONTIGUOUS, HAS_ROT, SPLIT, DOT_IN_FP32)
    m = _unit_absmax(v, BR, U, NSUB)
    if BR2 > 0:
        local2 = BR + tl.arange(0, BR2)
        valid2 = (local2 < UPP) & (first + local2 < units)
        v2 = _transformed_units(x_ptr, mul_ptr, perm_ptr, rot_ptr, signs_ptr, first, local2, valid2, stride_xm,
                                stride_xk, NU, U, HAS_MUL, HAS_PERM, CONTIGUOUS, HAS_ROT, SPLIT, DOT_IN_FP32)
        m2 = _unit_absmax(v2, BR2, U, NSUB)
    else:
        m2 = m
    if SEG > 1:
        # One scale and one reciprocal per group, not per row: a division per group.
        group_scale, group_recip = _scale_and_reciprocal(_group_max(m, m2, BR, BR2, SEG, SPP_PAD), BITS)
        s = tl.arange(0, SPP_PAD)
        groups = tl.program_id(0) * SPP + s
        tl.store(scale_ptr + groups, group_scale, mask=(s < SPP) & (groups < units // SEG))
    else:
        group_scale = m
        group_recip = m
    _quantize_rows(q_ptr, scale_ptr, v, m, first, local, valid, group_scale, group_recip, BR, U, SEG, NSUB,
                   SPP_PAD, BITS)
    if BR2 > 0:
        _quantize_rows(q_ptr, scale_ptr, v2, m2, first, local2, valid2, group_scale, group_recip, BR2, U, SEG, NSUB,
                       SPP_PAD, BITS)


@dataclass(frozen=True)
class Plan:
    """How the kernel tiles x: [M, K] for one group width (see the kernel's contract).

    A program quantizes units_per_program units of `unit` channels: whole groups of seg units
    (seg > 1), or units of nsub groups each. Its two tiles have br and br2 rows (br2 = 0: one tile),
    each at least min_rows (a dot's rows, with a rotation).
    """

    unit: int
    seg: int
    nsub: int
    units_per_program: int
    min_rows: int

    @property
    def spp(self) -> int:
        """Groups per program (seg > 1), else units per program."""
        return self.units_per_program // self.seg

    @property
    def spp_pad(self) -> int:
        return triton.next_power_of_2(self.spp)

    @property
    def br(self) -> int:
        return self._tiles[0]

    @property
    def br2(self) -> int:
        return self._tiles[1]

    @property
    def rows(self) -> int:
        return self.br + self.br2

    @property
    def waste(self) -> float:
        """The share of the rows that pad."""
        return 1 - self.units_per_program / self.rows

    @property
    def _tiles(self) -> tuple[int, int]:
        """The largest power of two within the units, and a second tile for the rest (none where it
        would be as large as the first: one tile of twice the rows is then the same work)."""
        upp, least = self.units_per_program, self.min_rows
        if upp <= least:
            return least, 0
        br = 1 << (upp.bit_length() - 1)
        rest = upp - br
        br2 = max(triton.next_power_of_2(rest), least) if rest else 0
        return (2 * br, 0) if br2 >= br else (br, br2)


def plan(m: int, k: int, group: int, rotation_block: int | None, min_elements: int, max_elements: int,
         sms: int) -> Plan:
    """The tiling of x: [m, k] for groups of `group` channels and a fused rotation block (or None).

    The unit is the rotation block, or else the widest power of two dividing the group, up to 128.
    A program holds whole groups, in tiles of at least the MIN_DOT rows of a dot with a rotation,
    at least min_elements values, and at most max_elements values where a group allows it. The plan
    minimizes the rows the busiest multiprocessor works through, rows · ceil(programs / sms)
    (padding included: the kernel is issue-bound near its bandwidth floor, and the programs on one
    multiprocessor share its issue slots); ties go to plans that launch at least `sms` programs,
    then to more rows per program.
    """
    unit = rotation_block if rotation_block is not None else min(group & -group, 128)
    seg = max(group // unit, 1)
    nsub = max(unit // group, 1)
    units = m * (k // unit)
    least = 1 if rotation_block is None else MIN_DOT
    # The most groups (or units) per program within max_elements, at least one; the largest is kept
    # even below min_elements (it holds more than max_elements minus one group).
    most = max(max_elements // (seg * unit), 1)
    candidates = [p for p in (Plan(unit, seg, nsub, n * seg, least) for n in range(1, most + 1))
                  if (p.rows * unit <= max_elements or p.spp == 1)
                  and (p.rows * unit >= min_elements or p.spp == most)]

    def cost(c: Plan) -> tuple:
        programs = triton.cdiv(units, c.units_per_program)
        return triton.cdiv(programs, sms) * c.rows, programs < sms, -c.rows

    return min(candidates, key=cost)


# Values a program holds: about 64 float32 registers per thread, 4 to 16 warps. Fewer values per
# thread would repeat the per-group work (reductions, reciprocals) over fewer values; with 128-channel
# units the minimum is also the 64 rows Hopper's wgmma takes per warp group (fewer fall back to
# mma.sync). The interpreter runs every program in Python, at a cost per program: tiles small
# enough that the tests' widths still take several programs, large enough that a rotation's 16-row
# dot holds more than one token (with 256 values, a 96-wide token padded to 16 rows per program
# made the interpreted tests 12x slower).
GPU_MIN_ELEMENTS = 8192
GPU_MAX_ELEMENTS = 32768
INTERPRETER_MAX_ELEMENTS = 2048


def _num_warps(elements: int) -> int:
    """A power of two from 4 to 16: about 2048 values per warp."""
    warps = max(elements // 2048, 4)
    return min(1 << (warps.bit_length() - 1), 16)


@functools.lru_cache(maxsize=1024)
def launch_parameters(m: int, k: int, bits: int, group: int, rotation_block: int | None, has_mul: bool,
                      has_perm: bool, contiguous: bool, split: int, sms: int) -> tuple[Mapping[str, Any], int]:
    """(the kernel's arguments other than tensors and strides, with num_warps and num_stages, read-only;
    the number of programs) for x: [m, k] — what the wrapper launches, and what an offline compile of
    the same launch needs. rotation_block: a fused rotation's block, else None; contiguous: x is
    (`torch.Tensor.is_contiguous`); split: 1 or 3.
    Cached: a layer launches the same shapes on every call."""
    if interpreted():
        p = plan(m, k, group, rotation_block, 1, INTERPRETER_MAX_ELEMENTS, sms)
    else:
        p = plan(m, k, group, rotation_block, GPU_MIN_ELEMENTS, GPU_MAX_ELEMENTS, sms)
    units = m * (k // p.unit)
    meta = dict(units=units, NU=k // p.unit, U=p.unit, SEG=p.seg, NSUB=p.nsub, SPP=p.spp, SPP_PAD=p.spp_pad,
                BR=p.br, BR2=p.br2, BITS=bits, HAS_MUL=has_mul, HAS_PERM=has_perm,
                CONTIGUOUS=contiguous and not has_perm,
                HAS_ROT=rotation_block is not None, SPLIT=split, DOT_IN_FP32=interpreted(),
                num_warps=_num_warps(p.rows * p.unit), num_stages=1)
    return MappingProxyType(meta), triton.cdiv(units, p.units_per_program)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """Programs that fill the device: its multiprocessor count (1 on the CPU, for the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_quantize_kernel, InterpretedFunction)


# sign(R) of the fused rotations, per rotation tensor, its version and the dot's operand type: the
# check that R's entries are all ±c synchronizes with the device, so it runs once per rotation.
_SIGNS: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, torch.Tensor | None]] = {}


def _signs(rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """sign(rotation) [b, b] contiguous in dtype if the entries of rotation are all ±c (c > 0), else None."""
    key = (id(rotation), dtype)
    # Inference tensors have no version counter; outside inference mode they cannot change.
    version = -1 if rotation.is_inference() else rotation._version
    hit = _SIGNS.get(key)
    if hit is not None and hit[0]() is rotation and hit[1] == version:
        return hit[2]
    a = rotation.abs()
    plus_minus_c = bool((a == a[0, 0]).all()) and bool(a[0, 0] > 0)
    signs = torch.where(rotation > 0, 1.0, -1.0).to(dtype).contiguous() if plus_minus_c else None
    _SIGNS[key] = (weakref.ref(rotation, lambda _, key=key: _SIGNS.pop(key, None)), version, signs)
    return signs


def _fused_signs(act_rotation: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor | None:
    """sign(act_rotation) when the kernel applies act_rotation [b, b] itself, else None."""
    b = act_rotation.shape[0]
    if MIN_DOT <= b <= MAX_FUSED_ROTATION and b & (b - 1) == 0 and (group % b == 0 or b % group == 0):
        return _signs(act_rotation, dtype)
    return None


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
    if act_rotation is not None:
        r = act_rotation.shape[0]
        if act_rotation.dim() != 2 or act_rotation.shape[1] != r or k % r:
            raise ValueError(f"act_rotation must be square [b, b] with b dividing {k}; got "
                             f"{tuple(act_rotation.shape)}")
    tensors = [t for t in (x, act_mul, act_perm, act_rotation) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, act_mul, act_perm and act_rotation must be on the same device")

    q = torch.empty(m, k // 2 if bits == 4 else k, dtype=torch.uint8 if bits == 4 else torch.int8,
                    device=x.device)
    scale = torch.empty(m, k // g, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    split = 1 if act_mul is None and x.dtype != torch.float32 else 3
    signs = None
    if act_rotation is not None:
        operand = torch.float32 if interpreted() else x.dtype if split == 1 else torch.bfloat16
        signs = _fused_signs(act_rotation, g, operand)
        if signs is None:
            x = transform_activation(x.float(), act_mul, act_perm, act_rotation)
            act_mul = act_perm = act_rotation = None
        else:
            # The reference rotates by R in float32: c is |R[0, 0]| in float32.
            act_rotation = act_rotation.to(torch.float32)
    meta, programs = launch_parameters(m, k, bits, g, None if signs is None else signs.shape[0], act_mul is not None,
                                       act_perm is not None, x.is_contiguous(), split, _multiprocessors(x.device))
    _quantize_kernel[(programs,)](x, act_mul, act_perm, act_rotation, signs, q, scale, stride_xm=x.stride(0),
                                  stride_xk=x.stride(1), **meta)
    return q, scale
