"""The twin-log number formats (tlq3 / tlq4): decoding against float64, storage, the op's paths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import INT4, INT8, NONE, TLQ3, TLQ4, check_pair, mode_name
from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import Quantized, quantize_activation
from clq_compile.kernels.reference import quant_linear_reference


def value64(code: int, params: list[float], levels: int) -> float:
    """The twin-log value of one code, from the format's definition, in float64 (Python floats)."""
    m = code if code >= 0 else -1 - code
    a, c = (params[0], params[1]) if code >= 0 else (params[2], params[3])
    magnitude = max(a * 2.0 ** (m - (levels - 1)) - c, 0.0)
    return magnitude if code >= 0 else -magnitude


def random_weight(fmt, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-fmt.levels, fmt.levels, (n, k), generator=g, dtype=torch.int16)
    bound = torch.rand(n, 2, generator=g) + 0.25
    eta = torch.rand(n, 1, generator=g) * 0.5
    a = bound / (1 - eta)
    params = torch.stack([a[:, 0], a[:, 0] * eta[:, 0], a[:, 1], a[:, 1] * eta[:, 0]], dim=1)
    return Quantized(codes, params.float(), None, fmt, None)


@given(st.sampled_from([TLQ3, TLQ4]), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_decoding_is_the_formats_definition(fmt, n, eighths, seed):
    q = random_weight(fmt, n, 8 * eighths, seed)
    got = q.dequantize()
    expected = torch.tensor([[value64(int(c), q.scale[i].double().tolist(), fmt.levels) for c in row]
                             for i, row in enumerate(q.q)], dtype=torch.float64)
    assert torch.allclose(got.double(), expected, rtol=2**-22, atol=0)


@given(st.sampled_from([TLQ3, TLQ4]), st.integers(0, 2**31 - 1))
def test_codes_are_stored_as_the_integers_of_their_width(fmt, seed):
    q = random_weight(fmt, 3, 16, seed)
    packed = pack_weight(q)
    assert (packed.qweight.dtype, packed.qweight.shape[1]) == fmt.storage(16) == fmt.slot.storage(16)
    assert torch.equal(fmt.unpack(packed.qweight).to(torch.int16), q.q)
    assert packed.scale.shape == fmt.scale_shape(3, 16, None) == (3, 4)


def test_the_format_takes_the_integer_formats_place_and_refuses_what_it_cannot_hold():
    assert TLQ4.slot == INT4 and TLQ3.slot.name == "int3" and not TLQ4.uniform and INT4.uniform
    assert mode_name(TLQ4, INT4) == "w4a4 (tlq4 weights)" and mode_name(TLQ3, NONE) == "w3a16 (tlq3 weights)"
    check_pair(TLQ4, INT8)  # decoded, then multiplied: any activation format
    with pytest.raises(ValueError, match="no weight groups"):
        TLQ4.scale_shape(4, 64, 32)
    with pytest.raises(ValueError, match="passes/twin_log.py"):
        TLQ4.encode(torch.zeros(2), None)


@given(st.sampled_from([TLQ3, TLQ4]), st.sampled_from(["none", "int8", "int4"]), st.integers(1, 9),
       st.integers(0, 2**31 - 1))
def test_the_reference_op_is_the_decoded_product(fmt, a_format, m, seed):
    k, n = 32, 5
    q = random_weight(fmt, n, k, seed)
    packed = pack_weight(q)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    bias = torch.randn(n)
    out = quant_linear_reference(x, packed.qweight, packed.scale, None, bias, None, None, None, k, fmt.name,
                                 a_format, 0, 0)
    xs = x.double() if a_format == "none" else quantize_activation(x, int(a_format[3:])).dequantize().double()
    expected = xs @ q.dequantize().double().t() + bias.double()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
