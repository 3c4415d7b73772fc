"""Fisher-guided temporal calibration (AdaTSQ): how much each calibration row matters to the output.

A recorded call holds a batch of images, each at its own timestep (the calibration calls span the
trajectory). For a linear layer with output y and the model's output f, an error e in row b of y
(one image) changes f by J_b · e, J_b = ∂f/∂y[b]; for errors of equal size in every direction the
expected squared change is proportional to ‖J_b‖_F², the trace of the empirical Fisher of the
output under an isotropic Gaussian error. It is estimated with random probes (Hutchinson): for
v ~ N(0, I) shaped like f, E_v ‖∂(vᵀf)/∂y[b]‖² = ‖J_b‖_F², so each probe is one backward pass of
the full-precision graph (`row_sensitivities`, which reports the mean over y[b]'s entries).

Sensitivity changes with the timestep, and a few probes are noisy, so rows are pooled by timestep:
the rows' timesteps are cut into `TIMESTEP_BUCKETS` quantile buckets and a row's weight is its
bucket's mean sensitivity over the mean of all rows, per layer (`fisher_weights`): weights average 1
over the calibration rows, and uniform weighting is all ones. A graph without a `timestep` input, or
a layer whose rows are not the batch's, keeps one weight per row.

The weights multiply each row's share of a layer's statistics (passes/statistics.py): its GPTQ
Hessian and its chance of being among the rows the searches judge candidates on.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from .capture import LinearSite
from .configs import TimestepRows
from .observers import GraphCalibration
from .timesteps import TimestepSelection

PROBES = 4
TIMESTEP_BUCKETS = 8


class _Probe(fx.Interpreter):
    """Runs the graph with a zero added to each watched linear's output, the leaf the gradient is
    taken at: its gradient is the output's total derivative by the linear's output, through every
    later layer. `perturb` {node: tensor} is added to those outputs too (finite-difference checks)."""

    def __init__(self, gm: fx.GraphModule, sites: dict[str, LinearSite], perturb: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.sites, self.perturb = sites, perturb
        self.leaves: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.sites:
            zero = torch.zeros_like(out, requires_grad=True)
            self.leaves[n.name] = zero
            out = out + zero
            if n.name in self.perturb:
                out = out + self.perturb[n.name]
        return out


def probe_value(cal: GraphCalibration, args: list, probe: int, sites: dict[str, LinearSite],
                perturb: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(vᵀf, {node: ∂(vᵀf)/∂y}) on one call's arguments, v ~ N(0, I) from seed `probe`, f every
    floating output of the graph; y the outputs of `sites` (plus `perturb`)."""
    # Under torch.inference_mode() (where the user may calibrate) enable_grad alone records nothing:
    # inference mode is lifted too, and tensors recorded under it are cloned into normal ones there.
    interpreter = _Probe(cal.gm, sites, perturb or {})
    with torch.inference_mode(False), torch.enable_grad():
        detached = [(a.clone() if a.is_inference() else a.detach()) if isinstance(a, torch.Tensor) else a
                    for a in args]
        outputs, _ = tree_flatten(interpreter.run(*detached))
        generator = torch.Generator().manual_seed(probe)
        value = sum((torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device) * o).sum()
                    for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())
        nodes = list(interpreter.leaves)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return torch.as_tensor(float(value)), {n: torch.zeros_like(interpreter.leaves[n]) for n in nodes}
        grads = torch.autograd.grad(value, [interpreter.leaves[n] for n in nodes], allow_unused=True)
    return value.detach(), {n: torch.zeros_like(interpreter.leaves[n]) if g is None else g
                            for n, g in zip(nodes, grads)}


def row_sensitivities(cal: GraphCalibration, paths: Iterable[str], probes: int = PROBES) -> dict[str, torch.Tensor]:
    """{path: float64 [calls, rows]}: per recorded call and row (the first dimension of the layer's
    output), the mean over the row's entries of ∂(vᵀf)/∂y squared, averaged over `probes` probes.
    Modules the graph calls more than once are left out (their rows keep weight 1)."""
    wanted = set(paths)
    uses: dict[str, int] = {}
    for s in cal.analysis.sites:
        uses[s.path] = uses.get(s.path, 0) + 1
    # A module the graph calls twice (a shared embedder) has no one row weight per call: left out.
    sites = {s.node: s for s in cal.analysis.sites if s.path in wanted and uses[s.path] == 1}
    per_call: dict[str, list[torch.Tensor]] = {s.path: [] for s in sites.values()}
    for args in cal.arguments():
        total: dict[str, torch.Tensor] = {}
        for probe in range(probes):
            _, grads = probe_value(cal, args, probe, sites)
            for node, g in grads.items():
                rows = g.detach().double().reshape(g.shape[0], -1).square().mean(dim=1)
                total[node] = total.get(node, 0) + rows / probes
        for node, site in sites.items():
            per_call[site.path].append(total[node].cpu())
    return {p: torch.stack(v) for p, v in per_call.items() if v and len({t.shape for t in v}) == 1}


def bucket_means(values: torch.Tensor, keys: torch.Tensor, buckets: int) -> torch.Tensor:
    """Each entry of `values` replaced by the mean of those whose `keys` fall in the same of
    `buckets` quantile buckets of the keys (values, keys: float64 [n])."""
    edges = torch.quantile(keys, torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]).unique()
    ids = torch.bucketize(keys, edges)
    sums = torch.zeros(len(edges) + 1, dtype=torch.float64).index_add_(0, ids, values)
    counts = torch.zeros(len(edges) + 1, dtype=torch.float64).index_add_(0, ids, torch.ones_like(values))
    return (sums / counts.clamp(min=1))[ids]


class RowWeights:
    """Per graph, layer and recorded call: the weight of each row ([rows] float32), or None (all 1).

    weights: {(graph, path): float32 [calls, rows]} (Fisher); selection: the rows of one timestep
    bucket (passes/timesteps.py), whose mask multiplies the weights (rows outside it weigh 0).
    """

    def __init__(self, weights: dict[tuple[int, str], torch.Tensor], selection: TimestepSelection | None = None):
        self._weights = weights
        self.selection = selection

    def get(self, graph: int, path: str, call: int, rows: int | None = None) -> torch.Tensor | None:
        """The weights of call `call`'s rows at layer `path`; `rows`: how many the layer's input has
        (weights for another row count are None)."""
        w = self._weights.get((graph, path))
        w = None if w is None or (rows is not None and w.shape[1] != rows) else w[call]
        if self.selection is not None:
            mask = self.selection.mask(graph, call, rows if rows is not None or w is None else len(w))
            if mask is not None:
                w = mask if w is None else w * mask
        return w


def row_weights(calibrations: list[GraphCalibration], paths: Iterable[str], weighting: str,
                rows: TimestepRows | None) -> RowWeights | None:
    """How each calibration row counts at each layer of `paths`: by its Fisher sensitivity
    (`weighting` "fisher"), within one timestep bucket (`rows`), both, or uniformly (None)."""
    if weighting != "fisher" and rows is None:
        return None
    weights = fisher_weights(calibrations, paths) if weighting == "fisher" else RowWeights({})
    weights.selection = None if rows is None else TimestepSelection(calibrations, rows)
    return weights


def fisher_weights(calibrations: list[GraphCalibration], paths: Iterable[str], probes: int = PROBES,
                   buckets: int = TIMESTEP_BUCKETS) -> RowWeights:
    """Row weights of every layer in `paths` on every graph's recorded calls (see the module docstring)."""
    paths = set(paths)
    weights: dict[tuple[int, str], torch.Tensor] = {}
    for g, cal in enumerate(calibrations):
        timesteps = cal.timesteps()
        for path, s in row_sensitivities(cal, paths, probes).items():
            flat = s.reshape(-1)
            if timesteps is not None and all(t.numel() in (1, s.shape[1]) for t in timesteps):
                keys = torch.stack([t.expand(s.shape[1]) for t in timesteps]).reshape(-1)
                flat = bucket_means(flat, keys, buckets)
            mean = flat.mean()
            w = flat / mean if mean > 0 else torch.ones_like(flat)
            weights[(g, path)] = w.reshape(s.shape).float()
    return RowWeights(weights)
