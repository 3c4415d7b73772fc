"""SVDQuant's low-rank branch: the split against float64, the branch in the op's coordinates."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import MODES
from clq_compile.options import parse_options
from clq_compile.passes.layer import LowRank, QuantizedLinear
from clq_compile.passes.lowrank import lowrank_rank, lowrank_split, with_input_transform
from clq_compile.passes.smoothquant import smoothquant_layer
from clq_compile.passes.weight_quantization import rtn


@st.composite
def weights(draw):
    n, k = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # A decaying spectrum with a few dominant directions, as smoothing leaves a weight.
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    spikes = draw(st.integers(0, min(n, k)))
    if spikes:
        w += 20 * torch.randn(n, spikes, generator=g, dtype=torch.float64) @ torch.randn(
            spikes, k, generator=g, dtype=torch.float64) / k ** 0.5
    return w.float(), draw(st.integers(1, min(n, k)))


@given(weights())
def test_split_reconstructs_the_weight_and_leaves_the_tail_of_the_spectrum(data):
    w, rank = data
    residual, branch = lowrank_split(w, rank)
    assert residual.dtype == torch.float32 and branch.down.dtype == branch.up.dtype == w.dtype
    assert branch.down.shape == (rank, w.shape[1]) and branch.up.shape == (w.shape[0], rank)
    exact = w.double()
    rebuilt = residual.double() + branch.up.double() @ branch.down.double()
    scale = float(exact.abs().max())
    assert float((rebuilt - exact).abs().max()) <= 1e-5 * max(scale, 1e-30) + 1e-30
    sigma = torch.linalg.svdvals(exact)
    tail = float(sigma[rank]) if rank < sigma.numel() else 0.0
    # R's largest singular value is σ_{r+1}, up to the float32 rounding of the stored branch.
    assert float(torch.linalg.matrix_norm(residual.double(), ord=2)) <= tail + 1e-5 * float(sigma[0]) + 1e-30


def test_split_refuses_a_rank_out_of_range():
    with pytest.raises(ValueError, match=r"1 <= rank <= 4"):
        lowrank_split(torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match=r"1 <= rank"):
        lowrank_split(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match=r"down \[r, K\] and up \[N, r\]"):
        LowRank(torch.randn(3, 8), torch.randn(4, 2))


def test_rank_is_capped_at_a_quarter_of_the_narrow_side():
    assert lowrank_rank(1152, 1152, 32) == 32
    assert lowrank_rank(96, 384, 32) == 24
    assert lowrank_rank(3, 1152, 32) == 0


@given(weights(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_a_branch_split_after_smoothing_reads_the_unsmoothed_input(data, tokens, seed):
    """(x · diag(mul)) · downᵀ · upᵀ = x · (down · diag(mul))ᵀ · upᵀ, against float64."""
    w, rank = data
    g = torch.Generator().manual_seed(seed)
    mul = torch.rand(w.shape[1], generator=g) + 0.1
    _, branch = lowrank_split(w, rank)
    moved = with_input_transform(branch, mul)
    x = torch.randn(tokens, w.shape[1], generator=g, dtype=torch.float64)
    want = (x * mul.double()) @ branch.down.double().t() @ branch.up.double().t()
    got = x @ moved.down.double().t() @ moved.up.double().t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-12)
    assert with_input_transform(branch, None) is branch


@given(weights(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_a_layer_adds_its_branch_to_the_op(data, tokens, seed):
    """forward = op(x) on the residual's codes + (x · downᵀ) · upᵀ; the branch costs its bytes."""
    w, rank = data
    quantizer = parse_options({"bits": "w8a8"}).method_configs().quantizer
    residual, branch = lowrank_split(w, rank)
    plain = rtn(residual, quantizer)
    layer = QuantizedLinear(plain.weight, plain.a_format, plain.a_group, lowrank=branch)
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(seed))
    expected = plain.forward(x, None, "reference").double() + (
        x.double() @ branch.down.double().t() @ branch.up.double().t())
    assert torch.allclose(layer.forward(x, None, "reference").double(), expected, rtol=1e-5, atol=1e-4)
    assert layer.nbytes == plain.weight.nbytes + 4 * rank * sum(w.shape)


def test_svdquant_keeps_the_dominant_directions_in_16_bit():
    """On a weight with a few large directions, the branch takes them and the residual's range
    (and so the layer's error) shrinks: the chosen layer beats SmoothQuant's on the same data."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) + 8 * torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 30
    quantizer = parse_options({"bits": "w4a4"}).method_configs().quantizer
    absmax = x.abs().amax(0)
    plain = smoothquant_layer(w, x, absmax, quantizer)
    svd = smoothquant_layer(w, x, absmax, quantizer, rank=4)
    assert svd.lowrank is not None and svd.lowrank.rank == 4 and "+lowrank r4" in svd.method
    y = x.double() @ w.double().t()

    def error(layer):
        return float((layer.forward(x, None, "reference").double() - y).norm() / y.norm())

    assert error(svd) < error(plain)
    assert MODES["w4a4"][0] is svd.weight.format


@pytest.mark.parametrize("online", [True, False])
def test_clq_splits_the_branch_in_the_coordinates_the_op_receives(online):
    """A CLQ layer whose input arrives as x·G (folded, online=False) or is rotated by the op
    (online=True) computes x·Wᵀ either way, branch included: at 8 bits within 8-bit rounding,
    where a branch in the wrong coordinates would be off by the whole weight."""
    from clq_compile.passes.cross_block import _LayerQuantizer
    from clq_compile.passes.cross_layer_search import NO_CLIP
    from clq_compile.passes.orthogonal_smoothing import orthogonal_smoothing

    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) + 6 * torch.randn(48, 2, generator=g) @ torch.randn(2, 64, generator=g)
    x = torch.randn(32, 64, generator=g)
    smoothing = orthogonal_smoothing(64, torch.rand(64, generator=g) + 0.5, 32)
    quantizer = parse_options({"bits": "w8a8"}).method_configs().quantizer
    layer = _LayerQuantizer(w, None, None, quantizer, None, smoothing, online=online, rank=4)(NO_CLIP)
    assert layer.lowrank is not None and layer.lowrank.rank == 4
    arriving = x if online else smoothing.transform.apply(x)
    y = x.double() @ w.double().t()
    error = float((layer.forward(arriving, None, "reference").double() - y).norm() / y.norm())
    assert error < 0.02
