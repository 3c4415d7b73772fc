"""Hadamard matrices for the rotations of clq-compile.

A Hadamard matrix of order n has entries ±1 and H·Hᵀ = n·I, so H / sqrt(n) is orthogonal. Two parts of
the compiler rotate with one:

* CLQ's orthogonal-based smoothing (OBS) rotates the input of each quantized linear by G = S·H, where S is
  a channel permutation and H is block-diagonal with normalized Hadamard blocks of b channels (64 or 128
  by default). `block_hadamard` builds H, `fast_block_hadamard_transform` applies it without forming it,
  and `largest_valid_block` picks a smaller block when the preferred one does not divide the width.
* The QuaRot baseline rotates by a full-width randomized Hadamard matrix, `random_hadamard`.

The orders available are 2^k (Sylvester's construction) and m·2^k for m in 12, 20, 28, 36, 52, 60 (which
includes 40·2^k = 20·2^(k+1)): the base order m comes from one of Paley's constructions over the finite
field GF(q), and the Kronecker product with a Sylvester matrix supplies the power of two. That covers the
widths of the transformers we target, for example 1152 = 36·32 (PixArt, DiT-XL) and 3072 = 12·256 (Flux).
"""

import functools
import itertools

import torch
from torch import Tensor

# Paley I over GF(q), q ≡ 3 (mod 4), gives order q + 1; Paley II over GF(q), q ≡ 1 (mod 4), gives order
# 2(q + 1). Keyed by the order built.
_PALEY_BASES: dict[int, tuple[str, int]] = {
    12: ("I", 11),
    20: ("I", 19),
    28: ("II", 13),
    36: ("II", 17),
    52: ("II", 25),
    60: ("I", 59),
}

_SYLVESTER_STEP = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)


def _split_order(n: int) -> tuple[int, int] | None:
    """The split n = base · 2^k with base 1 or a Paley order and the largest 2^k, or None if none exists."""
    # Trying bases from the smallest leaves the largest power of two for Sylvester's construction.
    for base in (1, *sorted(_PALEY_BASES)):
        power, remainder = divmod(n, base)
        if remainder == 0 and power & (power - 1) == 0:
            return base, power
    return None


def _check_order(n: int) -> tuple[int, int]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the order of a Hadamard matrix must be a positive integer; got {n!r}")
    split = _split_order(n)
    if split is None:
        bases = ", ".join(str(base) for base in sorted(_PALEY_BASES))
        raise ValueError(
            f"no Hadamard matrix of order {n} is available: "
            f"supported orders are 2^k and m·2^k for m in {bases}"
        )
    return split


def _sylvester(n: int) -> Tensor:
    """Sylvester's Hadamard matrix, int64 [n, n], for n a power of two."""
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.kron(_SYLVESTER_STEP, h)
    return h


def _prime_power(q: int) -> tuple[int, int]:
    """(p, k) with q = p^k, p prime; q must be a prime power."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return p, k


def _irreducible_polynomial(p: int, k: int) -> list[int]:
    """A monic polynomial of degree k <= 3 irreducible over GF(p), coefficients from the constant term up."""
    # Up to degree 3 a polynomial that factors has a factor of degree 1, hence a root in GF(p); the Paley
    # table asks for nothing above degree 2.
    candidates = ([*low, 1] for low in itertools.product(range(p), repeat=k))
    return next(
        polynomial
        for polynomial in candidates
        if k == 1 or all(sum(c * x**i for i, c in enumerate(polynomial)) % p for x in range(p))
    )


def _multiply(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """a·b in GF(p)[x] / (modulus); a, b: k coefficients, modulus: monic of degree k, constant term first."""
    k = len(a)
    product = [0] * (2 * k - 1)
    for (i, ai), (j, bj) in itertools.product(enumerate(a), enumerate(b)):
        product[i + j] = (product[i + j] + ai * bj) % p
    for degree in range(2 * k - 2, k - 1, -1):
        lead = product[degree]
        for i, c in enumerate(modulus):
            product[degree - k + i] = (product[degree - k + i] - lead * c) % p
    return product[:k]


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix of GF(q), int64 [q, q]: Q[a, b] = χ(a − b), χ the quadratic character.

    Element e of GF(p^k) is the polynomial over GF(p) whose coefficients are the base-p digits of e, taken
    modulo a monic irreducible polynomial of degree k. χ(0) = 0; χ(z) = 1 if z is a nonzero square,
    else −1.
    """
    p, k = _prime_power(q)
    place = p ** torch.arange(k)
    digits = torch.arange(q)[:, None] // place % p
    difference = ((digits[:, None, :] - digits[None, :, :]) % p * place).sum(-1)

    modulus = _irreducible_polynomial(p, k)
    elements = digits.tolist()
    squares = {sum(c * p**i for i, c in enumerate(_multiply(z, z, modulus, p))) for z in elements[1:]}
    character = torch.tensor([0] + [1 if z in squares else -1 for z in range(1, q)], dtype=torch.int64)
    return character[difference]


def _bordered_jacobsthal(q: int, column_sign: int) -> Tensor:
    """[[0, 1ᵀ], [column_sign·1, Q]], int64 [q + 1, q + 1], Q the Jacobsthal matrix of GF(q)."""
    core = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    core[0, 1:] = 1
    core[1:, 0] = column_sign
    core[1:, 1:] = _jacobsthal(q)
    return core


def _paley(construction: str, q: int) -> Tensor:
    """Paley's Hadamard matrix, int64: [q + 1, q + 1] for construction "I", [2(q + 1), 2(q + 1)] for "II"."""
    if construction == "I":
        # Q is skew-symmetric when q ≡ 3 (mod 4), so the bordered matrix S is skew with S·Sᵀ = q·I, and
        # (I + S)(I + S)ᵀ = (q + 1)·I.
        return torch.eye(q + 1, dtype=torch.int64) + _bordered_jacobsthal(q, -1)
    # Q is symmetric when q ≡ 1 (mod 4), so C is a symmetric conference matrix (C·Cᵀ = q·I, zero
    # diagonal); replacing its zeros by B and its ±1 by ±A (A = H₂) gives a Hadamard matrix because
    # A·Aᵀ = B·Bᵀ = 2·I and A·B + B·A = 0.
    conference = _bordered_jacobsthal(q, 1)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(conference, _SYLVESTER_STEP) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


@functools.lru_cache(maxsize=32)
def _hadamard_signs(base: int, power: int) -> Tensor:
    """The ±1 Hadamard matrix of order base·power, int8; shared by all callers, so never handed out as is."""
    small = _paley(*_PALEY_BASES[base]) if base > 1 else torch.ones(1, 1, dtype=torch.int64)
    return torch.kron(small.to(torch.int8), _sylvester(power).to(torch.int8))


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A Hadamard matrix of order n: entries ±1, H·Hᵀ = n·I.

    Args:
        n: the order, 2^k or m·2^k for m in 12, 20, 28, 36, 52, 60 (so also 40·2^k).
        dtype: dtype of the result.

    Returns:
        H: [n, n], a fresh tensor the caller may modify.

    Raises:
        ValueError: no construction here gives order n.
    """
    return _hadamard_signs(*_check_order(n)).to(dtype=dtype, copy=True)


def normalized_hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """H / sqrt(n), orthogonal: [n, n]. Same orders and errors as `hadamard`."""
    return (hadamard(n) / n**0.5).to(dtype)


def _check_divides(width: int, block: int) -> None:
    if block < 1 or width < 1 or width % block:
        raise ValueError(
            f"the Hadamard block size {block} does not divide the width {width}; "
            f"largest_valid_block({width}, {block}) gives the largest block that does"
        )


def block_hadamard(width: int, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """I ⊗ normalized_hadamard(block): block-diagonal, orthogonal, width // block blocks. [width, width].

    Raises:
        ValueError: block does not divide width, or no Hadamard matrix of order block is available.
    """
    _check_divides(width, block)
    h = normalized_hadamard(block, torch.float64)
    return torch.kron(torch.eye(width // block, dtype=torch.float64), h).to(dtype)


def largest_valid_block(width: int, preferred: int) -> int:
    """The largest b <= preferred that divides width and is the order of an available Hadamard matrix.

    Always at least 1 (the 1x1 Hadamard matrix), for width >= 1 and preferred >= 1.
    """
    if width < 1 or preferred < 1:
        raise ValueError(
            f"width and preferred block size must be positive; got width={width}, preferred={preferred}"
        )
    candidates = range(min(width, preferred), 0, -1)
    return next(b for b in candidates if width % b == 0 and _split_order(b) is not None)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """QuaRot's randomized Hadamard matrix Q = D · (H / sqrt(n)): [n, n], orthogonal.

    D is diagonal with ±1 signs drawn from a torch.Generator seeded with `seed`, multiplied on the left:
    row i of the normalized Hadamard matrix is multiplied by the i-th sign. Activations are rotated as
    x · Q, so the signs flip input channels *before* the Hadamard mixes them; on the right they would
    only flip output signs and leave the rotated magnitudes exactly those of the plain Hadamard, which
    can align with structured activations (sinusoidal position embeddings do). The same seed always
    gives the same matrix.
    """
    h = normalized_hadamard(n, torch.float64)
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
    return (signs[:, None] * h).to(dtype)


def fast_block_hadamard_transform(x: Tensor, block: int) -> Tensor:
    """x @ block_hadamard(width, block) without forming the [width, width] matrix.

    Args:
        x: [..., width], floating point, width divisible by block.
        block: Hadamard block size.

    Returns:
        [..., width] in x's dtype; float16 and bfloat16 inputs are computed in float32 and rounded once.
    """
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(
            f"fast_block_hadamard_transform needs a floating-point x of shape [..., width]; "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )
    width = x.shape[-1]
    _check_divides(width, block)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    h = normalized_hadamard(block, compute).to(x.device)
    blocks = x.to(compute).reshape(*x.shape[:-1], width // block, block)
    return (blocks @ h).reshape(x.shape).to(x.dtype)
