"""SmoothQuant: the smoothing preserves the layer, helps against outlier channels, and α is searched."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clq_compile.kernels.packing import unpack_weight
from clq_compile.options import parse_options
from clq_compile.passes.smoothquant import DEFAULT_ALPHAS, smoothing_factors, smoothquant_layer
from clq_compile.passes.weight_quantization import rtn


def _layer_and_inputs(seed: int, k: int = 32, n: int = 24, tokens: int = 48, outlier: float = 50.0):
    """x: [tokens, k] with one channel scaled by `outlier`, W: [n, k] of std 1/sqrt(k)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, int(torch.randint(0, k, (1,), generator=g))] *= outlier
    w = torch.randn(n, k, generator=g) / k**0.5
    return w, x


def _output_error(layer, w, x) -> float:
    return float((layer.forward(x, None, "reference").double() - x.double() @ w.double().t()).square().sum())


def _chosen_alpha(layer) -> float:
    match = re.fullmatch(r"smoothquant α=([0-9.]+)", layer.method)
    assert match, layer.method
    return float(match.group(1))


def _dequantized_weight(layer) -> torch.Tensor:
    """float64 [N, K]: the weight the op multiplies by, from its stored integers and scales."""
    w = layer.weight
    q = unpack_weight(w.qweight, w.bits).double()
    group = w.group or w.in_features
    zero = 0 if w.zero is None else w.zero.double().repeat_interleave(group, dim=1)
    return (q - zero) * w.scale.double().repeat_interleave(group, dim=1)


@settings(max_examples=20)
@given(st.integers(1, 24), st.integers(1, 12), st.integers(1, 16), st.floats(0.0, 1.0),
       st.integers(0, 2**31 - 1), st.booleans())
def test_smoothing_alone_preserves_the_layer(k, n, tokens, alpha, seed, silent_channel):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(k, generator=g))
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    if silent_channel:
        x[:, 0] = 0
    s = smoothing_factors(x.abs().amax(0), w, alpha)
    assert s.dtype == torch.float64 and s.shape == (k,)
    assert torch.isfinite(s).all() and (s > 0).all()
    smoothed = (x * (1 / s)) @ (w * s).t()
    assert torch.allclose(smoothed, x @ w.t(), rtol=1e-10, atol=1e-10 * float(x.abs().max() * w.abs().max()) * k)


def test_smoothing_factors_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, generator=g, dtype=torch.float64) * 10 + 0.1
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    wmax = w.abs().amax(0)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        assert torch.allclose(smoothing_factors(a, w, alpha), a**alpha / wmax ** (1 - alpha), rtol=1e-12)


def test_silent_channels_and_zero_weight_columns_get_finite_factors():
    w = torch.randn(4, 6)
    w[:, 2] = 0
    a = torch.rand(6) + 1
    a[4] = 0
    for alpha in DEFAULT_ALPHAS:
        s = smoothing_factors(a, w, alpha)
        assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(1 / s).all()


@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["w4a4", "w4a8", "w8a8"]), st.sampled_from([None, 32]))
def test_the_layer_holds_the_inverse_factors_and_the_smoothed_weight(seed, bits, group):
    w, x = _layer_and_inputs(seed, k=64, n=8, tokens=16)
    opts = parse_options({"bits": bits, "weight_group": group} if group else {"bits": bits}).method_configs().quantizer
    layer = smoothquant_layer(w, x, x.abs().amax(0), opts)
    s = smoothing_factors(x.abs().amax(0), w, _chosen_alpha(layer))
    assert torch.allclose(layer.act_mul.double(), 1 / s, rtol=1e-6)
    # The stored weight is W · diag(s) rounded to nearest: within half a step of it everywhere.
    target = w.double() / layer.act_mul.double()
    step = layer.weight.scale.double().repeat_interleave(group or 64, dim=1)
    assert ((_dequantized_weight(layer) - target).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_smoothquant_beats_rtn_with_an_outlier_channel(bits):
    opts = parse_options({"bits": bits}).method_configs().quantizer
    ratios = []
    for seed in range(6):
        w, x = _layer_and_inputs(seed)
        layer = smoothquant_layer(w, x, x.abs().amax(0), opts)
        ratios.append(_output_error(layer, w, x) / _output_error(rtn(w, opts), w, x))
    # Measured on this setup: 0.03-0.05 at w8a8 and 0.07-0.14 at w4a8 for every seed.
    assert max(ratios) < 0.5, ratios


@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["w4a4", "w8a8"]), st.floats(1.0, 100.0))
def test_the_chosen_alpha_has_the_least_error_on_the_grid(seed, bits, outlier):
    w, x = _layer_and_inputs(seed, k=16, n=8, tokens=24, outlier=outlier)
    opts = parse_options({"bits": bits}).method_configs().quantizer
    absmax = x.abs().amax(0)
    chosen = smoothquant_layer(w, x, absmax, opts)
    alpha = _chosen_alpha(chosen)
    assert any(abs(alpha - a) < 1e-12 for a in DEFAULT_ALPHAS)
    errors = {a: _output_error(smoothquant_layer(w, x, absmax, opts, alphas=(a,)), w, x) for a in DEFAULT_ALPHAS}
    assert _output_error(chosen, w, x) == min(errors.values())


def test_bad_arguments_raise_value_errors():
    w, x = _layer_and_inputs(0, k=8, n=4, tokens=4)
    opts = parse_options({"bits": "w4a4"}).method_configs().quantizer
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(x.abs().amax(0), w, 1.5)
    with pytest.raises(ValueError, match="act_absmax"):
        smoothing_factors(x.abs().amax(0)[:4], w, 0.5)
    with pytest.raises(ValueError, match="alphas"):
        smoothquant_layer(w, x, x.abs().amax(0), opts, alphas=())
    with pytest.raises(ValueError, match="channels"):
        smoothquant_layer(w, x[:, :4], x.abs().amax(0), opts)
