"""LRQ-DiT's adaptive rotation scheme and layer (passes/lrq_dit.py), against float64 references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import INT4, INT8, NONE
from clq_compile.passes.configs import ActivationConfig, LRQConfig, QuantizerConfig, WeightQuantizerConfig
from clq_compile.passes.lrq_dit import (activation_criterion, greedy_block_rotation, lrq_dit_layer,
                                        outlier_aware_rotation)
from clq_compile.passes.rotation import rotate_weight


def quantizer(w=INT4, a=INT4, symmetric=True, group=None):
    return QuantizerConfig(WeightQuantizerConfig(w, symmetric, group), ActivationConfig(a, None))


def with_outlier(t, k, seed, channel=3, size=40.0):
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, channel] *= size
    return x


@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_the_criterion_is_the_root_mean_square(t, k, seed):
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed))
    expected = (sum(v * v for v in x.double().flatten().tolist()) / (t * k)) ** 0.5
    assert activation_criterion(x) == pytest.approx(expected, rel=1e-12)


@given(st.sampled_from([4, 8, 16]), st.integers(0, 2**31 - 1))
def test_greedy_rotations_are_orthogonal_and_never_raise_the_peak(b, seed):
    x = with_outlier(32, b, seed, channel=seed % b, size=1 + seed % 50)
    r = greedy_block_rotation(x)
    assert torch.allclose(r @ r.t(), torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert (x @ r).abs().max() <= x.abs().max() * (1 + 1e-12)


def test_a_dominant_channel_is_spread_over_its_block():
    x = with_outlier(64, 16, 0, channel=5, size=100.0)
    r = greedy_block_rotation(x)
    # One step spreads channel 5 evenly: its peak divided by about √16.
    assert (x @ r).abs().max() < 0.4 * x.abs().max()


def test_the_outlier_aware_rotation_keeps_the_product_and_flattens_outliers():
    k = 64
    x = with_outlier(128, k, 1, channel=10, size=60.0)
    r, block = outlier_aware_rotation(x, block=16)
    assert block == 16 and r.shape == (k, k)
    assert torch.allclose(r @ r.t(), torch.eye(k, dtype=torch.float64), atol=1e-10)
    w = torch.randn(8, k, dtype=torch.float64)
    assert torch.allclose((x @ r) @ rotate_weight(w, act_rotation=r).t(), x @ w.t(), atol=1e-9)
    assert (x @ r).abs().max() < 0.3 * x.abs().max()


@pytest.mark.parametrize("threshold,choice", [(1e-6, "outlier-aware"), (1e6, "hadamard")])
def test_the_threshold_chooses_the_rotation_and_explain_shows_it(threshold, choice):
    k = 64
    x = with_outlier(96, k, 2).float()
    w = torch.randn(16, k) * 0.05
    layer = lrq_dit_layer(w, x, x.abs().amax(dim=0), quantizer(), LRQConfig(threshold))
    assert layer.details["ars"] == choice and layer.method == f"lrq-dit: tlq4 + {choice}"
    assert any(n.startswith(f"ars: {choice}") for n in layer.notes)
    assert layer.weight.format.name == "tlq4" and layer.act_mul is not None
    assert layer.details["ars_J"] == pytest.approx(activation_criterion(x.double() * layer.act_mul.double()))


@pytest.mark.parametrize("threshold", [1e-6, 1e6])
@pytest.mark.parametrize("a_format", [INT8, NONE])
def test_the_layer_computes_the_full_precision_product_up_to_quantization(threshold, a_format):
    """The transform and the weight undo each other: the quantized layer's error is the
    quantization's, far below the weight's own scale (a wrong inverse gives an O(1) error)."""
    k = 64
    x = with_outlier(96, k, 3).float()
    w = torch.randn(16, k) * 0.05
    layer = lrq_dit_layer(w, x, x.abs().amax(dim=0), quantizer(a=a_format), LRQConfig(threshold))
    y = x.double() @ w.double().t()
    err = float((layer.forward(x, None, "reference").double() - y).norm() / y.norm())
    assert err < 0.15


def test_8_bit_weights_stay_uniform_and_data_free_layers_are_named():
    w = torch.randn(16, 64) * 0.05
    layer = lrq_dit_layer(w, None, None, quantizer(w=INT8, a=INT8))
    assert layer.weight.format == INT8 and layer.method == "lrq-dit: int8 rtn + hadamard (data-free)"
    assert layer.act_mul is None and layer.act_rotation is not None
    assert any("no twin-log form" in n for n in layer.notes)
