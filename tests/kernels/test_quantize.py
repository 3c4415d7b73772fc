"""Quantizers and int4 packing against exact references."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.packing import pack_int3, pack_int4, pack_weight, unpack_int3, unpack_int4, unpack_weight
from clq_compile.kernels.quantize import qrange, quantize, quantize_activation


@st.composite
def matrices(draw):
    """A random [rows, K] float32 matrix, a group size dividing K, and a per-row magnitude spread."""
    group = draw(st.sampled_from([None, 4, 8, 16]))
    k = (group or 8) * draw(st.integers(1, 4))
    rows = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, k, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))
    if draw(st.booleans()):  # an outlier channel, as in real activations
        v[:, draw(st.integers(0, k - 1))] *= 50
    if draw(st.booleans()):  # one-signed rows exercise the asymmetric zero point
        v = v.abs()
    return v, group


@given(matrices(), st.sampled_from([4, 8]), st.booleans())
def test_values_inside_the_range_are_within_half_a_step(data, bits, symmetric):
    v, group = data
    q = quantize(v, bits, symmetric, group)
    qmin, qmax = qrange(bits, symmetric)
    assert q.q.min() >= qmin and q.q.max() <= qmax
    step = q.scale.repeat_interleave(group or v.shape[1], dim=1)
    err = (q.dequantize().double() - v.double()).abs()
    assert (err <= step.double() / 2 * (1 + 1e-5) + 1e-30).all()


@given(matrices(), st.sampled_from([4, 8]), st.booleans(),
       st.floats(0.3, 1.0), st.floats(0.3, 1.0))
def test_clipped_quantizer_is_exact_to_half_a_step_inside_the_clip_range(data, bits, symmetric, lo, hi):
    v, group = data
    q = quantize(v, bits, symmetric, group, clip=(lo, hi))
    g = group or v.shape[1]
    vg = v.reshape(v.shape[0], -1, g)
    lower = (vg.amin(-1, keepdim=True).clamp(max=0) * lo)
    upper = (vg.amax(-1, keepdim=True).clamp(min=0) * hi)
    if symmetric:
        bound = torch.maximum(-lower, upper)
        lower, upper = -bound, bound
    inside = ((vg >= lower) & (vg <= upper)).reshape(v.shape)
    step = q.scale.repeat_interleave(g, dim=1)
    err = (q.dequantize().double() - v.double()).abs()
    assert (err[inside] <= step[inside].double() / 2 * (1 + 1e-5) + 1e-30).all()
    # Values beyond the clip saturate toward the end of the grid, never wrap around:
    # within a group, the integers are ordered like the values.
    qg = q.q.reshape(vg.shape)
    order = vg.argsort(dim=-1)
    assert (qg.gather(-1, order).diff(dim=-1) >= 0).all()


@given(matrices(), st.sampled_from([4, 8]))
def test_activation_quantizer_is_symmetric_per_token(data, bits):
    v, group = data
    q = quantize_activation(v, bits, group)
    assert q.zero is None
    assert q.scale.shape == (v.shape[0], v.shape[1] // (group or v.shape[1]))
    # The largest magnitude of every group lands on the end of the grid.
    qmax = 2 ** (bits - 1) - 1
    peak = q.q.reshape(v.shape[0], q.scale.shape[1], -1).abs().amax(-1)
    assert (peak == qmax).all() or (v == 0).any()


def test_all_zero_rows_quantize_to_zero():
    q = quantize(torch.zeros(2, 8), 4, symmetric=False)
    assert (q.dequantize() == 0).all() and q.scale.gt(0).all()


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_int4_pack_unpack_round_trips(rows, half_k, seed):
    q = torch.randint(-8, 8, (rows, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_k)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_nibble_layout():
    packed = pack_int4(torch.tensor([[1, -2, 7, -8]], dtype=torch.int8))
    assert packed.tolist() == [[0x1 | (0xE << 4), 0x7 | (0x8 << 4)]]


@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_int3_pack_unpack_round_trips(rows, eighth_k, seed):
    q = torch.randint(-4, 4, (rows, 8 * eighth_k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int3(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 3 * eighth_k)
    assert torch.equal(unpack_int3(packed), q)


def test_int3_bit_plane_layout():
    # 3-bit codes 001 111 011 100 000 010 110 001: low two bits four per byte, then the third bits.
    packed = pack_int3(torch.tensor([[1, -1, 3, -4, 0, 2, -2, 1]], dtype=torch.int8))
    assert packed.tolist() == [[0b00_11_11_01, 0b01_10_10_00, 0b01001010]]


def test_packing_rejects_bad_input():
    import pytest

    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int3(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack_int3(torch.full((1, 8), 4, dtype=torch.int8))

    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


@given(matrices(), st.sampled_from([4, 8]), st.booleans())
def test_packed_weight_dequantizes_like_the_quantizer(data, bits, symmetric):
    v, group = data
    if v.shape[1] % 2:
        return
    q = quantize(v, bits, symmetric, group)
    packed = pack_weight(q)
    ints = unpack_weight(packed.qweight, bits).float()
    g = group or v.shape[1]
    ints = ints.reshape(v.shape[0], -1, g)
    if packed.zero is not None:
        ints = ints - packed.zero.float().unsqueeze(-1)
    deq = (ints * packed.scale.unsqueeze(-1)).reshape(v.shape)
    assert torch.equal(deq, q.dequantize())
    groups = v.shape[1] // g
    expected = v.numel() * bits // 8 + v.shape[0] * groups * (4 + (0 if symmetric else 1))
    assert packed.nbytes == expected
