"""`clq::quant_linear` (torch reference) against float64 arithmetic on the dequantized operands."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import E4M3, INT4, INT8, MODES
from clq_compile.kernels.hadamard import normalized_hadamard
from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize, quantize_activation
from clq_compile.kernels.reference import int_matmul, scale_product, transform_activation


QUANTIZING = [pair for pair in MODES.values() if pair[0] is not None]


@st.composite
def layers(draw):
    w_format, a_format = draw(st.sampled_from(QUANTIZING))
    # e4m3 layers have rowwise scales only (torch._scaled_mm's); others any group.
    float8 = w_format == E4M3
    w_group = None if float8 else draw(st.sampled_from([None, 8, 16]))
    a_group = None if float8 or not a_format.quantizes else draw(st.sampled_from([None, 8, 16]))
    k = 16 * draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (2, 1, 4)]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * 3
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if draw(st.booleans()) else None
    transform = {}
    if draw(st.booleans()):
        transform["act_mul"] = torch.rand(k, generator=g) + 0.5
    if draw(st.booleans()):
        transform["act_perm"] = torch.randperm(k, generator=g)
    if draw(st.booleans()):
        transform["act_rotation"] = normalized_hadamard(draw(st.sampled_from([4, 8, 16])))
    return dict(x=x, w=w, bias=bias, w_group=w_group, a_group=a_group, transform=transform,
                w_format=w_format, a_format=a_format,
                symmetric=float8 or draw(st.booleans()))


def run_op(case, kernels="reference"):
    q = quantize(case["w"], case["w_format"], case["symmetric"], case["w_group"])
    p = pack_weight(q)
    t = case["transform"]
    out = torch.ops.clq.quant_linear(
        case["x"], p.qweight, p.scale, p.zero, case["bias"], t.get("act_mul"), t.get("act_perm"),
        t.get("act_rotation"), case["w"].shape[1], case["w_format"].name, case["a_format"].name,
        case["w_group"] or 0, case["a_group"] or 0, kernels)
    return out, q


@given(layers())
def test_quant_linear_equals_float64_on_dequantized_operands(case):
    out, wq = run_op(case)
    k = case["w"].shape[1]
    xt = transform_activation(case["x"].reshape(-1, k).float(), **case["transform"])
    if case["a_format"].quantizes:
        xt = quantize_activation(xt, case["a_format"], case["a_group"]).dequantize()
    x64, w64 = xt.double(), wq.dequantize().double()
    expected = x64 @ w64.t()
    magnitude = x64.abs() @ w64.abs().t()
    if case["bias"] is not None:
        expected = expected + case["bias"].double()
        magnitude = magnitude + case["bias"].double().abs()
    out2 = out.reshape(-1, out.shape[-1]).double()
    assert out.shape == (*case["x"].shape[:-1], case["w"].shape[0])
    assert out.dtype == case["x"].dtype
    # fp32 rounding of the scales and of the accumulation: a few ulps of the magnitude.
    assert ((out2 - expected).abs() <= 1e-5 * magnitude + 1e-6).all()


@given(st.integers(1, 40), st.integers(1, 64), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_int_matmul_is_exact(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(int_matmul(a, b).long(), a.long() @ b.long().t())


def test_quantized_output_really_is_quantized():
    """With 4-bit weights and activations the result differs from the float product."""
    torch.manual_seed(0)
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    case = dict(x=x, w=w, bias=None, w_group=None, a_group=None, transform={}, w_format=INT4, a_format=INT4,
                symmetric=True)
    out, _ = run_op(case)
    rel = float((out - x @ w.t()).norm() / (x @ w.t()).norm())
    assert 0.01 < rel < 0.5


def test_unknown_kernel_choice_is_refused():
    p = pack_weight(quantize(torch.randn(4, 8), 8))
    with pytest.raises(ValueError, match="kernels must be one of"):
        torch.ops.clq.quant_linear(torch.randn(2, 8), p.qweight, p.scale, None, None, None, None,
                                   None, 8, "int8", "int8", 0, 0, "cuda-magic")


def test_activations_near_the_float32_limit_give_finite_outputs():
    # x·w is finite, but the int32 accumulator times the activation scale (~1e37 / 127) is not.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * 1e37
    w = torch.randn(8, 64, generator=g) / 8
    for fmt in (INT4, INT8, E4M3):
        case = dict(x=x, w=w, bias=None, w_group=None, a_group=None, transform={}, w_format=fmt, a_format=fmt,
                    symmetric=True)
        out, wq = run_op(case)
        assert torch.isfinite(out).all()
        xq = quantize_activation(x, fmt).dequantize().double()
        expected = xq @ wq.dequantize().double().t()
        magnitude = xq.abs() @ wq.dequantize().double().abs().t()
        assert ((out.double() - expected).abs() <= 1e-5 * magnitude).all()


def float32_between(lo: float, hi: float):
    return st.floats(torch.tensor(lo).item(), torch.tensor(hi).item(), width=32)


@given(st.integers(-2**31 + 1, 2**31 - 1), float32_between(1e-12, 1e37), float32_between(1e-12, 1e3))
def test_scale_product_equals_the_plain_product_wherever_that_is_finite(acc, a_scale, w_scale):
    # Bit for bit: the fix for the overflow changes no result that did not overflow.
    acc_t = torch.tensor([[acc]], dtype=torch.int32)
    a_t, w_t = torch.tensor([a_scale]), torch.tensor([w_scale])
    plain = acc_t.float() * a_t[:, None] * w_t[None, :]
    if torch.isfinite(acc_t.float() * a_t[:, None]).all():
        assert torch.equal(scale_product(acc_t, a_t, w_t), plain)


@pytest.mark.parametrize("a_scale", [float("nan"), float("inf"), 0.0, 1e-40])
def test_scale_product_of_special_scales_is_the_plain_product(a_scale):
    acc_t = torch.tensor([[3, 0, -5]], dtype=torch.int32)
    a_t, w_t = torch.tensor([a_scale]), torch.tensor([0.5, 2.0, 1e-3])
    expected = acc_t.float() * a_t[:, None] * w_t[None, :]
    torch.testing.assert_close(scale_product(acc_t, a_t, w_t), expected, equal_nan=True, rtol=0, atol=0)
