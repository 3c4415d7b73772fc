import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clq_compile.kernels.hadamard import (
    block_hadamard,
    fast_block_hadamard_transform,
    hadamard,
    largest_valid_block,
    normalized_hadamard,
    random_hadamard,
)

SMALL_ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 40, 52, 60]
KRONECKER_ORDERS = [24, 56, 72, 80, 96, 104, 120, 192, 768, 1152, 3072, 4608]
BLOCKS = [1, 2, 4, 8, 12, 16, 20, 32, 64, 128]


def is_supported_order(n: int) -> bool:
    """The specification of the available orders, written independently of the module: 2^k or m·2^k."""
    return any(n % m == 0 and (n // m) & (n // m - 1) == 0 for m in (1, 12, 20, 28, 36, 40, 52, 60))


def assert_orthogonal(q: torch.Tensor) -> None:
    n = q.shape[0]
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SMALL_ORDERS + KRONECKER_ORDERS)
def test_hadamard_has_unit_entries_and_orthogonal_rows(n):
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.all(h.abs() == 1)
    # Beyond 1152 a full H·Hᵀ takes seconds on CPU, so every 17th row is checked against all rows.
    rows = torch.arange(0, n, 1 if n <= 1152 else 17)
    # Sums of ±1 products stay small integers, so float64 computes them exactly.
    assert torch.equal(h[rows] @ h.T, n * torch.eye(n, dtype=torch.float64)[rows])


def test_available_orders_are_exactly_the_specified_ones():
    for n in range(1, 1100):
        if is_supported_order(n):
            assert hadamard(n, torch.int8).shape == (n, n)
        else:
            with pytest.raises(ValueError, match=rf"order {n} is available: supported orders are 2\^k"):
                hadamard(n)


@pytest.mark.parametrize("n", [0, -4, 1000, 3, 6])
def test_unsupported_order_names_the_order(n):
    with pytest.raises(ValueError, match=rf"(order|got) {n}\b"):
        hadamard(n)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.float64])
def test_callers_cannot_mutate_the_cached_matrix(dtype):
    hadamard(12, dtype).zero_()
    assert torch.all(hadamard(12).abs() == 1)


@pytest.mark.parametrize("n", [1, 12, 40, 52, 128, 1152])
def test_normalized_hadamard_is_orthogonal(n):
    q = normalized_hadamard(n, torch.float64)
    assert_orthogonal(q)
    torch.testing.assert_close(q, hadamard(n) / math.sqrt(n), rtol=0, atol=0)
    assert normalized_hadamard(n).dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(block=st.sampled_from(BLOCKS + [28, 36, 52, 60]), count=st.integers(1, 4))
def test_block_hadamard_is_block_diagonal_with_normalized_blocks(block, count):
    width = block * count
    g = block_hadamard(width, block, torch.float64)
    assert g.shape == (width, width)
    assert torch.equal(g, torch.block_diag(*[normalized_hadamard(block, torch.float64)] * count))
    assert_orthogonal(g)
    assert block_hadamard(width, block).dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 600), block=st.integers(1, 300))
def test_block_hadamard_rejects_a_block_that_does_not_divide_the_width(width, block):
    if width % block:
        with pytest.raises(ValueError, match=rf"block size {block} does not divide the width {width}"):
            block_hadamard(width, block)


def test_block_hadamard_rejects_a_block_without_hadamard_matrix():
    with pytest.raises(ValueError, match=r"order 6\b"):
        block_hadamard(18, 6)


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([1, 2, 12, 20, 64, 96, 128]), seed=st.integers(0, 2**31 - 1))
def test_random_hadamard_is_left_sign_diagonal_times_normalized_hadamard(n, seed):
    q = random_hadamard(n, seed, torch.float64)
    assert_orthogonal(q)
    assert torch.equal(random_hadamard(n, seed, torch.float64), q)
    # Row i is ±(row i of H / sqrt(n)): the sign diagonal multiplies on the left, so x · Q
    # flips input channels before mixing them.
    signs = q[:, 0] / normalized_hadamard(n, torch.float64)[:, 0]
    assert torch.all(signs.abs() == 1)
    torch.testing.assert_close(q, signs[:, None] * normalized_hadamard(n, torch.float64), rtol=0, atol=0)
    assert random_hadamard(n, seed).dtype == torch.float32


def test_random_hadamard_differs_between_seeds():
    assert not torch.equal(random_hadamard(128, 0), random_hadamard(128, 1))


@settings(max_examples=50, deadline=None)
@given(
    leading=st.lists(st.integers(1, 3), max_size=3),
    block=st.sampled_from(BLOCKS),
    count=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_block_transform_equals_dense_product(leading, block, count, seed):
    width = block * count
    x = torch.randn(*leading, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = fast_block_hadamard_transform(x, block)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, x @ block_hadamard(width, block, torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float32, 1e-5)]
)
def test_fast_block_transform_keeps_the_dtype_of_x(dtype, tolerance):
    x = torch.randn(5, 3, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = fast_block_hadamard_transform(x, 64)
    assert y.dtype == dtype
    reference = x.to(torch.float64) @ block_hadamard(256, 64, torch.float64)
    torch.testing.assert_close(y.to(torch.float64), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("shape, block", [((4, 96), 64), ((4, 100), 0), ((), 4)])
def test_fast_block_transform_rejects_bad_shapes(shape, block):
    with pytest.raises(ValueError, match="width"):
        fast_block_hadamard_transform(torch.zeros(shape), block)


def test_fast_block_transform_rejects_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        fast_block_hadamard_transform(torch.zeros(2, 8, dtype=torch.int32), 8)


@pytest.mark.parametrize(
    "width, preferred, expected",
    [
        (96, 128, 96),
        (1152, 128, 128),
        (1152, 64, 64),
        (3072, 128, 128),
        (100, 128, 20),
        (90, 64, 2),
        (7, 128, 1),
    ],
)
def test_largest_valid_block_examples(width, preferred, expected):
    assert largest_valid_block(width, preferred) == expected


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), preferred=st.integers(1, 300))
def test_largest_valid_block_is_the_largest_usable_divisor(width, preferred):
    usable = [b for b in range(1, min(width, preferred) + 1) if width % b == 0 and is_supported_order(b)]
    assert largest_valid_block(width, preferred) == max(usable)


@pytest.mark.parametrize("width, preferred", [(0, 64), (64, 0), (-8, 4)])
def test_largest_valid_block_rejects_non_positive_sizes(width, preferred):
    with pytest.raises(ValueError, match="must be positive"):
        largest_valid_block(width, preferred)
