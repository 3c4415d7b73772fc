"""Per-layer input statistics gathered from calibration: channel ranges, Hessian, token samples.

Every recipe that looks at data reads one `LayerStats` per linear layer: the per-channel
maximum magnitude of its input (SmoothQuant's and OBS's outlier measure), optionally the GPTQ
Hessian 2/T·XᵀX, and a bounded, evenly spread sample of input rows for the searches that
evaluate candidate quantizations on real tokens.
"""

from __future__ import annotations

import torch


class LayerStats:
    """Accumulates statistics of one layer's input x: [..., K] over calibration calls.

    absmax: float32 [K]; hessian: float64 [K, K] (when asked for); samples: float32 [<= max_rows, K].
    A call's rows may carry weights (`add(x, weights)`, one per entry of x's first dimension:
    passes/fisher.py): the Hessian is then the weighted mean 2 · Σ w·x xᵀ / Σ w, and a call's
    sampled rows are drawn with probabilities proportional to their weights. The range (absmax)
    stays unweighted, every row must fit it, except rows of weight 0: those (another timestep
    bucket's, passes/timesteps.py) are left out of every statistic.
    """

    def __init__(self, in_features: int, hessian: bool = False, max_rows: int = 2048, seed: int = 0):
        self.absmax = torch.zeros(in_features)
        self.rows = 0
        self._weight = 0.0  # Σ of the rows' weights (their number when unweighted)
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
        self._samples: list[torch.Tensor] = []
        self.max_rows = max_rows
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add x [d0, ..., K]; weights [d0] >= 0 weigh its rows (None: all 1)."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if not torch.isfinite(x2).all():
            raise ValueError("calibration produced a non-finite (NaN or Inf) layer input")
        w = None
        if weights is not None:
            if weights.shape != x.shape[:1] or (weights < 0).any() or not torch.isfinite(weights).all():
                raise ValueError(f"row weights must be [{x.shape[0]}], finite and >= 0; got {tuple(weights.shape)}")
            w = weights.detach().double().cpu().repeat_interleave(x2.shape[0] // max(x.shape[0], 1))
            # Rows of weight 0 (another timestep bucket's) are not part of the data at all; rows of
            # weight 1 are as if unweighted (the same sums, in the same order).
            x2, w = x2[w > 0], w[w > 0]
            if bool((w == 1).all()):
                w = None
        if not x2.shape[0]:
            return
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        if self._hessian is not None:
            xd = x2.double()
            self._hessian += (xd if w is None else xd * w[:, None]).t() @ xd
        self.rows += x2.shape[0]
        self._weight += x2.shape[0] if w is None else float(w.sum())
        # Keep a fixed share of every call so the sample spans all calls (timesteps, prompts).
        take = min(x2.shape[0], max(1, self.max_rows // 8))
        if w is None:
            index = torch.randperm(x2.shape[0], generator=self._generator)[:take]
        else:
            index = torch.multinomial(w + 1e-12 * float(w.max()) * (w > 0), take, replacement=False,
                                      generator=self._generator)
        self._samples.append(x2[index])
        total = sum(s.shape[0] for s in self._samples)
        if total > 2 * self.max_rows:
            self._samples = [self.samples]

    @property
    def hessian(self) -> torch.Tensor:
        """2/T · XᵀX over every row seen (float64 [K, K]); weighted: 2 · Σ w·x xᵀ / Σ w."""
        if self._hessian is None:
            raise ValueError("this LayerStats was created without a Hessian")
        return self._hessian * (2.0 / (self._weight if self._weight > 0 else max(self.rows, 1)))

    @property
    def samples(self) -> torch.Tensor:
        """Up to max_rows input rows drawn across all calls (float32 [rows, K])."""
        if not self._samples:
            return self.absmax.new_zeros(0, self.absmax.shape[0])
        rows = torch.cat(self._samples)
        if rows.shape[0] <= self.max_rows:
            return rows
        keep = torch.linspace(0, rows.shape[0] - 1, self.max_rows).round().long()
        return rows[keep]
