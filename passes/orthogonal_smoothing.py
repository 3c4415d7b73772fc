"""Orthogonal-based smoothing (OBS) of CLQ: channel swapping S plus a block Hadamard H, G = S·H.

For a linear layer y = x·Wᵀ with input x: [tokens, K], CLQ quantizes X̂ = Q(x·G) and
Ŵ = Q(Wᵀ-side Gᵀ·W), i.e. the stored weight rows are transformed exactly like the activation rows
(W' = W·G), which leaves the full-precision product unchanged because G is orthogonal.

- Outlier score of input channel c:  score_c = max_t |x_tc| / mean_c' max_t |x_tc'|
  (1 is a typical channel; massive-activation channels score in the tens).
- Channel swapping (option `obs_swap`): the permutation S orders the channels by score, then
  "spread" (default) deals them, in order of decreasing score, to the K/b Hadamard blocks in a
  snake order (0, 1, ..., B-1, B-1, ..., 0, 0, 1, ...), so every block gets its share of outliers
  and the per-block score sums differ by at most the largest single score; "group" (the CLQ
  paper's reviewers' reading) fills the blocks in order of decreasing score instead, so channels
  of similar magnitude share a block and the outliers are rotated among themselves.
  With a single block S still reorders the channels by score: the Hadamard then no longer meets
  the channels in the model's own order, whose structure (sinusoidal embeddings, head layout)
  can line up with Hadamard rows and concentrate energy instead of spreading it (measured on the
  digits DiT's width-96 layers: +1.4 dB PSNR at W4A4 with outliers, unchanged without).
- H: block-diagonal normalized Hadamard with block b (default 128); a block that does not divide
  K falls back to the largest valid one, and the fallback is reported.

The weight side is folded offline. The activation side x·G is folded into the layers that produce
x where passes/folding.py proves it legal (their output rows become Gᵀ·W_p; G then stays inside
each attention head), otherwise applied online by `clq::quant_linear` (a gather and a b x b
matmul per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from clq_compile.kernels.hadamard import largest_valid_block, normalized_hadamard

from .layer import ActivationTransform


def outlier_scores(act_absmax: torch.Tensor) -> torch.Tensor:
    """act_absmax: [K] per-channel max |x| -> float32 [K] scores (see the module docstring)."""
    absmax = act_absmax.float()
    mean = absmax.mean()
    return absmax / mean if mean > 0 else torch.ones_like(absmax)


def balanced_permutation(scores: torch.Tensor, block: int, granule: int | None = None) -> torch.Tensor:
    """int64 [K]: position j of the transformed input reads original channel perm[j].

    Channels are dealt to the K // block blocks in snake order of decreasing score; within a
    block they keep the order in which they were dealt. With a `granule` (a multiple of `block`
    dividing K), channels stay inside their run of `granule` consecutive channels (one attention
    head when the transform is folded into the value projection) and are dealt within it.
    """
    k = scores.numel()
    granule = k if granule is None else granule
    if k % granule or granule % block:
        raise ValueError(f"block {block} must divide the granule {granule}, which must divide the width {k}")
    if granule < k:
        return torch.cat([balanced_permutation(part, block) + i * granule
                          for i, part in enumerate(scores.split(granule))])
    blocks = k // block
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.arange(k)
    round_, offset = rank // blocks, rank % blocks
    target = torch.where(round_ % 2 == 0, offset, blocks - 1 - offset)
    slots = target * block + round_
    perm = torch.empty(k, dtype=torch.long)
    perm[slots] = order
    return perm


def grouped_permutation(scores: torch.Tensor, block: int, granule: int | None = None) -> torch.Tensor:
    """int64 [K] like `balanced_permutation`, but block i holds the channels of ranks
    i·block .. (i+1)·block - 1 in decreasing score (ties: original order); inside each run of
    `granule` channels with a granule."""
    k = scores.numel()
    granule = k if granule is None else granule
    if k % granule or granule % block:
        raise ValueError(f"block {block} must divide the granule {granule}, which must divide the width {k}")
    return torch.cat([torch.argsort(part, descending=True, stable=True) + i * granule
                      for i, part in enumerate(scores.split(granule))])


SWAPS = {"spread": balanced_permutation, "group": grouped_permutation}


def block_loads(scores: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of scores in each Hadamard block after the permutation: [K // block]."""
    return scores[perm].reshape(-1, block).sum(dim=1)


@lru_cache(maxsize=None)
def shared_hadamard(block: int) -> torch.Tensor:
    """One normalized Hadamard block per size, shared by every layer that uses it."""
    return normalized_hadamard(block, dtype=torch.float32)


@dataclass(frozen=True)
class Smoothing:
    """The transform G = S·H of one layer (its perm S, None = identity, and its b x b rotation H),
    the block b and how explain() names it."""

    transform: ActivationTransform
    block: int
    note: str


def orthogonal_smoothing(in_features: int, act_absmax: torch.Tensor | None, block: int = 128,
                         swap: str = "spread", granule: int | None = None) -> Smoothing:
    """G for a layer of width `in_features`; without statistics (data-free) S is the identity.

    swap: how S places the channels by score, "spread" or "group" (see the module docstring).

    granule: G must keep channels inside runs of this many (see `balanced_permutation`); the
    Hadamard block then also divides it.
    """
    span = in_features if granule is None else granule
    used = largest_valid_block(span, block)
    if used == block:
        note = f"H{used}"
    elif granule is None:
        note = f"H{used} (block {block} does not divide {in_features})"
    else:
        note = f"H{used} (inside runs of {granule} channels, one attention head)"
    perm = None
    if act_absmax is not None:
        perm = SWAPS[swap](outlier_scores(act_absmax), used, granule)
        note = f"S{'' if swap == 'spread' else ' (grouped)'} + {note}"
    return Smoothing(ActivationTransform(perm=perm, rotation=shared_hadamard(used)), used, note)
