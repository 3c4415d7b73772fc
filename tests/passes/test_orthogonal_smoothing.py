"""OBS: outlier scores, balanced channel swapping, G = S·H orthogonal and function-preserving."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.reference import transform_activation
from clq_compile.passes.orthogonal_smoothing import (
    balanced_permutation,
    block_loads,
    grouped_permutation,
    orthogonal_smoothing,
    outlier_scores,
)
from clq_compile.passes.rotation import rotate_weight


@st.composite
def activations(draw):
    block = draw(st.sampled_from([4, 8, 16, 32]))
    blocks = draw(st.integers(1, 6))
    k = block * blocks
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    absmax = torch.rand(k, generator=g) + 0.1
    outliers = draw(st.integers(0, k))
    absmax[torch.randperm(k, generator=g)[:outliers]] *= torch.rand(outliers, generator=g) * 100 + 1
    return absmax, block


@given(activations())
def test_permutation_balances_the_outlier_load(data):
    absmax, block = data
    scores = outlier_scores(absmax)
    perm = balanced_permutation(scores, block)
    assert torch.equal(perm.sort().values, torch.arange(absmax.numel()))
    loads = block_loads(scores, perm, block)
    # Snake dealing: two blocks never differ by more than the largest single score.
    assert float(loads.max() - loads.min()) <= float(scores.max()) * (1 + 1e-6)
    # The b largest channels land in b different blocks (up to the number of blocks).
    blocks = absmax.numel() // block
    top = torch.argsort(scores, descending=True)[:blocks]
    where = {int(torch.nonzero(perm == c)) // block for c in top}
    assert len(where) == blocks


@given(activations(), st.integers(1, 3))
def test_grouped_swap_puts_channels_of_similar_score_in_one_block(data, runs):
    """obs_swap="group": inside each run of `granule` channels, block i holds ranks i·b .. (i+1)·b - 1."""
    absmax, block = data
    k = absmax.numel()
    granule = k if k // block % runs else k // runs
    scores = outlier_scores(absmax)
    perm = grouped_permutation(scores, block, granule)
    assert torch.equal(perm.sort().values, torch.arange(k))
    for start in range(0, k, granule):
        run = perm[start:start + granule]
        assert bool(((run >= start) & (run < start + granule)).all())  # channels stay in their run
        placed = scores[run].reshape(-1, block)
        # Every block's smallest score is at least the next block's largest.
        assert bool((placed[:-1].min(dim=1).values >= placed[1:].max(dim=1).values).all())
        order = sorted(range(start, start + granule), key=lambda c: (-float(scores[c]), c))
        assert run.tolist() == order
    spread = orthogonal_smoothing(k, absmax, block)
    grouped = orthogonal_smoothing(k, absmax, block, "group")
    assert torch.equal(grouped.transform.perm, grouped_permutation(scores, grouped.block))
    assert grouped.note.startswith("S (grouped) + ") and spread.note.startswith("S + ")


def test_scores_are_relative_to_the_mean_channel():
    scores = outlier_scores(torch.tensor([1.0, 1.0, 1.0, 97.0]))
    assert torch.allclose(scores, torch.tensor([0.04, 0.04, 0.04, 3.88]))


@given(activations(), st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_g_is_orthogonal_and_the_rewrite_preserves_the_layer(data, tokens, n, seed):
    absmax, block = data
    k = absmax.numel()
    sm = orthogonal_smoothing(k, absmax, block)
    g_matrix = transform_activation(torch.eye(k, dtype=torch.float64), None, sm.transform.perm,
                                    sm.transform.rotation.double())
    assert torch.allclose(g_matrix @ g_matrix.t(), torch.eye(k, dtype=torch.float64), atol=1e-6)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float64) * absmax.double()
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    xg = transform_activation(x, None, sm.transform.perm, sm.transform.rotation.double())
    wg = rotate_weight(w, act_perm=sm.transform.perm, act_rotation=sm.transform.rotation.double())
    assert torch.allclose(xg @ wg.t(), x @ w.t(), atol=1e-5 * float(x.abs().max() * w.abs().max() * k))


@pytest.mark.parametrize("width, block, used", [(96, 128, 96), (1152, 128, 128), (100, 64, 20), (256, 128, 128)])
def test_block_falls_back_to_the_largest_valid_one_and_says_so(width, block, used):
    sm = orthogonal_smoothing(width, torch.rand(width) + 0.5, block)
    assert sm.block == used and sm.transform.rotation.shape == (used, used)
    assert (f"does not divide {width}" in sm.note) == (used != block)


def test_data_free_smoothing_has_no_swap():
    sm = orthogonal_smoothing(256, None, 128)
    assert sm.transform.perm is None and sm.block == 128


def test_rotation_flattens_an_outlier_channel():
    """What OBS is for: after G, no channel stands out (the paper's activation figure)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, [3, 7]] *= 50
    sm = orthogonal_smoothing(256, x.abs().amax(0), 128)
    xg = transform_activation(x, None, sm.transform.perm, sm.transform.rotation)
    before = x.abs().amax(0)
    after = xg.abs().amax(0)
    assert float(before.max() / before.median()) > 20
    assert float(after.max() / after.median()) < 3
