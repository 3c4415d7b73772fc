"""Cross-layer parameter search (CLPS) of CLQ: clipping bounds judged downstream.

For a layer l, quantizing it with clipping bounds (lower ratio, upper ratio) perturbs every layer
after it. CLPS first quantizes l without clipping and measures the relative error
‖Y_t − Ŷ_t‖ / ‖Y_t‖ at each later linear t within a window (by default the rest of l's block and
the next block); the target is the t where it peaks. It then picks

    l*, r* = argmin over the grid of ‖Y_t − Ŷ_t(l, r)‖²

where Ŷ_t(l, r) is the target's output with l quantized under bounds (l, r). The grid always
contains (1, 1) — no clipping — so the choice is never worse than min-max on this objective.
Symmetric weights search one ratio (l = r); asymmetric weights search the pair.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, TypeVar

DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)

T = TypeVar("T", bound=Hashable)


def clip_candidates(grid: tuple[float, ...], symmetric: bool) -> list[tuple[float, float]]:
    """The (lower, upper) ratio pairs to try; (1, 1) first."""
    ratios = sorted(set(grid) | {1.0}, reverse=True)
    if symmetric:
        return [(r, r) for r in ratios]
    return [(lo, hi) for lo in ratios for hi in ratios]


def pick_target(errors: Mapping[T, float]) -> T:
    """The downstream layer whose relative error peaks (ties: the earliest)."""
    if not errors:
        raise ValueError("no downstream layer to choose a target from")
    return max(errors, key=lambda t: errors[t])


def search_clip(objective: Callable[[tuple[float, float]], float],
                candidates: list[tuple[float, float]]) -> tuple[tuple[float, float], dict]:
    """Evaluate `objective` on every candidate; return the argmin (ties: the earlier) and all values."""
    values = {c: objective(c) for c in candidates}
    best = min(candidates, key=lambda c: values[c])
    return best, values
