"""Twin-log quantization (TLQ) of LRQ-DiT: each weight row on two log2 grids, searched per row.

DiT weights are Gaussian-like with long tails: a uniform grid spends most of its levels where few
weights are, and rounds the many small ones coarsely. TLQ gives each sign its own log2 grid of
L = 2^(b-1) magnitudes, so one b-bit code is a sign and a magnitude index (kernels/formats.py,
`TwinLogFormat`). For a branch (the row's positive weights, or its negative ones) with clipping
bound s and shift η in [0, 1), level m in [0, L - 1] is

    ℓ_m = s · max(2^(m - L + 1) − η, 0) / (1 − η),      so ℓ_{L-1} = s,

the grid 2^e moved down by η and stretched back to s (LRQ-DiT writes the dequantized value
±(2^q − η)). A weight takes the nearest level of its sign's branch. Per row, η is searched over
`ETAS` and each branch's s over upper percentiles of its magnitudes (`PERCENTILES`; 1.0 is the
branch's maximum), on the row's weight MSE; the two branches are independent given η, so each
takes its own best percentile (the grids follow LRQ-DiT's released search: η from 0 to 0.5,
percentiles from 0.98 to 0.99999).
"""

from __future__ import annotations

import torch

from clq_compile.kernels.formats import TwinLogFormat
from clq_compile.kernels.quantize import MIN_SCALE, Quantized

ETAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
PERCENTILES = (0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 1.0)


def branch_parameters(bound: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) = (s / (1 − η), s · η / (1 − η)) of branches with bounds s and shifts η (same shape)."""
    a = bound / (1 - eta)
    return a, a * eta


def branch_levels(a: torch.Tensor, c: torch.Tensor, levels: int) -> torch.Tensor:
    """[..., L] levels max(a · 2^(m − L + 1) − c, 0) of branches a, c [...], non-decreasing in m."""
    powers = torch.exp2(torch.arange(levels, dtype=a.dtype, device=a.device) - (levels - 1))
    return (a.unsqueeze(-1) * powers - c.unsqueeze(-1)).clamp(min=0)


def nearest_level(magnitude: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """int64 [N, K]: per row, the index of the level [N, L] (non-decreasing) nearest to each magnitude
    [N, K]; a tie between two levels goes to the lower one."""
    midpoints = (levels[:, 1:] + levels[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), magnitude.contiguous(), right=False)


def encode(weight: torch.Tensor, params: torch.Tensor, fmt: TwinLogFormat) -> torch.Tensor:
    """int16 codes [N, K] of `weight` on the grids of `params` [N, 4] = (a⁺, c⁺, a⁻, c⁻):
    c = m for weights >= 0 and −1 − m for negative ones, m the nearest level of the weight's branch."""
    w = weight.double()
    p = params.double()
    positive = nearest_level(w.clamp(min=0), branch_levels(p[:, 0], p[:, 1], fmt.levels))
    negative = nearest_level((-w).clamp(min=0), branch_levels(p[:, 2], p[:, 3], fmt.levels))
    return torch.where(w >= 0, positive, -1 - negative).to(torch.int16)


def _branch_bounds(magnitude: torch.Tensor, mask: torch.Tensor, percentiles: tuple[float, ...]) -> torch.Tensor:
    """float64 [P, N]: each row's percentiles of its magnitudes where `mask` (MIN_SCALE for an empty branch)."""
    values = torch.where(mask, magnitude, torch.nan)
    q = torch.tensor(percentiles, dtype=torch.float64, device=magnitude.device)
    bounds = torch.nanquantile(values, q, dim=1)
    return torch.nan_to_num(bounds, nan=MIN_SCALE).clamp(min=MIN_SCALE)


def twin_log_quantize(weight: torch.Tensor, fmt: TwinLogFormat, etas: tuple[float, ...] = ETAS,
                      percentiles: tuple[float, ...] = PERCENTILES) -> Quantized:
    """TLQ of weight [N, K] in `fmt` (tlq3 / tlq4): per row, the η of `etas` and per branch the bound
    among `percentiles` of the branch's magnitudes that give the least squared error (see the
    module docstring). Ties go to the earlier η and percentile. Returns codes and the rows'
    parameters [N, 4] (float32; the error is measured with the float32 parameters the op reads)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K]; got shape {tuple(weight.shape)}")
    if not etas or not percentiles or any(not 0 <= e < 1 for e in etas) or any(not 0 < p <= 1 for p in percentiles):
        raise ValueError("etas must lie in [0, 1) and percentiles in (0, 1], at least one of each")
    w = weight.detach().double()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or Inf: twin-log quantization needs finite weights")
    n = w.shape[0]
    positive = w >= 0
    masks = {True: positive, False: ~positive}
    # Per branch: its percentile bounds and its magnitudes (0 where the other branch's weights are).
    bounds = {b: _branch_bounds(w.abs(), mask, percentiles) for b, mask in masks.items()}
    magnitudes = {b: torch.where(mask, w.abs(), 0.0) for b, mask in masks.items()}
    best_error = torch.full((n,), torch.inf, dtype=torch.float64, device=w.device)
    best = torch.zeros(n, 4, dtype=torch.float32, device=w.device)
    for eta in etas:
        chosen, total = [], 0
        for branch in (True, False):
            mask, magnitude = masks[branch], magnitudes[branch]
            errors, params = [], []
            for bound in bounds[branch]:
                a, c = branch_parameters(bound, torch.full_like(bound, eta))
                a, c = a.float().double(), c.float().double()  # as stored
                levels = branch_levels(a, c, fmt.levels)
                value = levels.gather(1, nearest_level(magnitude, levels))
                errors.append(((value - magnitude) * mask).square().sum(dim=1))
                params.append(torch.stack([a, c], dim=1))
            errors = torch.stack(errors)  # [P, N]
            pick = errors.argmin(dim=0)
            chosen.append(torch.stack(params)[pick, torch.arange(n)])
            total = total + errors.min(dim=0).values
        better = total < best_error
        best_error = torch.where(better, total, best_error)
        best = torch.where(better[:, None], torch.cat(chosen, dim=1).float(), best)
    return Quantized(encode(w, best, fmt), best, None, fmt, None)
