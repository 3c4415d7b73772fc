"""D²Quant's dual-scale quantizer (passes/dual_scale.py) against float64 references."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import INT3, INT4, INT8, NONE
from clq_compile.kernels.quantize import quantize
from clq_compile.passes.configs import ActivationConfig, QuantizerConfig, WeightQuantizerConfig
from clq_compile.passes.dual_scale import MAX_FACTOR, column_scales, dsq_layer
from clq_compile.passes.rotation import rotate_weight
from clq_compile.passes.weight_quantization import rtn


def quantizer(w=INT4, a=NONE, group=None, symmetric=True):
    return QuantizerConfig(WeightQuantizerConfig(w, symmetric, group), ActivationConfig(a, None))


def down_projection(n, k, seed):
    """A weight with a few large columns, and inputs whose channels differ in range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, torch.randperm(k, generator=g)[: max(1, k // 32)]] *= 6
    x = torch.randn(256, k, generator=g) * (torch.rand(k, generator=g) * 3) ** 2
    return w, x


@given(st.sampled_from([INT3, INT4, INT8]), st.sampled_from([None, 8]), st.booleans(), st.integers(0, 2**31 - 1))
def test_each_column_scale_is_the_least_squares_fit_of_its_column(fmt, group, symmetric, seed):
    w, _ = down_projection(6, 16, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = (torch.rand(16, generator=g, dtype=torch.float64) + 0.5)
    q = quantizer(fmt, group=group, symmetric=symmetric)
    fitted = column_scales(w, q, t)
    base = quantize((w.double() / t).float(), fmt, symmetric, group).dequantize().double()

    def residual(scale):  # per column: Σ_n (W_nk − scale_k · base_nk)²
        return (w.double() - scale * base).square().sum(dim=0)

    unclamped = (fitted > 1 / MAX_FACTOR) & (fitted < MAX_FACTOR)
    for factor in (0.99, 1.01):
        assert (residual(fitted)[unclamped] <= residual(fitted * factor)[unclamped] + 1e-15).all()
    assert (fitted > 0).all()


@given(st.sampled_from([INT3, INT4]), st.sampled_from([NONE, INT8]), st.integers(0, 2**31 - 1))
def test_dsq_is_never_worse_than_rounding_on_its_calibration_inputs(fmt, act, seed):
    w, x = down_projection(8, 64, seed)
    q = quantizer(fmt, act)
    y = x.double() @ w.double().t()
    layer, t = dsq_layer(w, x, q)
    plain = rtn(w, q)

    def error(l):
        return float((l.forward(x, None, "reference").double() - y).square().sum())

    assert error(layer) <= error(plain)
    assert (t is None) == (layer.act_mul is None)


def test_the_column_scales_move_into_the_input_and_keep_the_product():
    w, x = down_projection(8, 64, 0)
    layer, t = dsq_layer(w, x, quantizer())
    assert t is not None and torch.equal(layer.act_mul, t.float())
    assert torch.allclose((x.double() * t) @ rotate_weight(w, act_mul=t.float()).t(), x.double() @ w.double().t(),
                          rtol=1e-6, atol=1e-6)


def test_dual_scales_cut_the_error_of_a_down_projection_with_large_columns():
    w, x = down_projection(96, 384, 0)
    y = x.double() @ w.double().t()
    for fmt in (INT3, INT4):
        layer, _ = dsq_layer(w, x, quantizer(fmt))
        plain = rtn(w, quantizer(fmt))
        err = [float((l.forward(x, None, "reference").double() - y).norm() / y.norm()) for l in (layer, plain)]
        assert err[0] < 0.8 * err[1], (fmt.name, err)
