"""SVDQuant's low-rank branch (Li et al., 2025): absorb a weight's dominant directions in 16 bit.

After smoothing or rotation moves activation outliers into the weight, W' [N, K] has a few large
singular values. SVDQuant keeps them exactly and quantizes only what is left:

    W' = U Σ Vᵀ,   L1 = U_r Σ_r  [N, r],   L2 = V_rᵀ  [r, K],   R = W' - L1 · L2,
    y  = Q(x') · Q(R)ᵀ + (x' · L2ᵀ) · L1ᵀ,

with x' the input in W''s coordinates. R's largest singular value is σ_{r+1}, so its range (and
with it the quantization step) shrinks where the spectrum decays fast. The branch costs
r · (N + K) 16-bit numbers and two thin GEMMs.

`lowrank_rank(n, k, rank)` caps the rank at min(N, K) / 4: there a square layer's 16-bit branch
already holds twice the bytes of its int4 weight (4 r (N + K) / (N K) = 2), so the branch pays
only on wide layers (PixArt's 1152 x 1152 at r = 32: 22 % of the int4 weight's bytes).
`lowrank_split` computes the split in float64.
"""

from __future__ import annotations

import torch

from .layer import LowRank


def lowrank_rank(out_features: int, in_features: int, rank: int) -> int:
    """The rank a layer [out, in] gets for option `lowrank_rank`: at most min(out, in) // 4 (0: none)."""
    return max(0, min(rank, min(out_features, in_features) // 4))


def lowrank_split(weight: torch.Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, LowRank]:
    """(R, branch) with weight = R + up · down to float64 rounding: R float32 [N, K] is what is
    quantized, the branch holds the `rank` leading singular directions (up = U_r Σ_r, down = V_rᵀ)
    in `dtype` (default: the weight's). R is taken against the branch as stored, so that
    R + up · down is as close to `weight` as the stored branch allows.

    weight: [N, K]; 1 <= rank <= min(N, K).
    """
    n, k = weight.shape
    if not 1 <= rank <= min(n, k):
        raise ValueError(f"a low-rank branch of a [{n}, {k}] weight needs 1 <= rank <= {min(n, k)}; got {rank}")
    w = weight.detach().double()
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    dtype = dtype or weight.dtype
    up, down = (u[:, :rank] * sigma[:rank]).to(dtype), vh[:rank].to(dtype)
    residual = (w - up.double() @ down.double()).float()
    return residual, LowRank(down, up)


def with_input_transform(branch: LowRank, mul: torch.Tensor | None) -> LowRank:
    """The branch for x when it was split for x · diag(mul) (a smoothing applied before the split):
    (x · diag(mul)) · downᵀ = x · (down · diag(mul))ᵀ."""
    if mul is None:
        return branch
    down = (branch.down.double() * mul.double()[None, :]).to(branch.down.dtype)
    return LowRank(down, branch.up)
