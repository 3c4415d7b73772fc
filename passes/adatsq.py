"""AdaTSQ: a bit-width for every (layer, timestep bucket), chosen by a beam search under a budget.

The recorded rows are cut into timestep buckets (passes/timesteps.py). Every candidate mode
(a weight / activation format pair: "w4a4", "w4a8", "w8a8", ...) quantizes every layer once per
bucket with the base recipe, on that bucket's rows (`candidates`). A *unit* is one layer in one
bucket (a layer whose rows' timesteps are unknown is one unit for all buckets); an assignment
gives each unit a mode.

Objective. A unit's error changes the model output f by about J·e (J = ∂f/∂y, e the layer's
output error on the unit's rows). For errors in no particular direction the expected squared
change is s·‖e‖², s the mean squared entry of J (passes/fisher.py's Hutchinson estimate, per row),
so the output's relative squared error is predicted as

    D(assignment) = Σ_units Σ_rows s_row · ‖e_row(mode)‖² / Σ_calls ‖f‖²

with e measured on the recorded calls (full-precision inputs, the unit's candidate layer). The
first-order terms add up, so D is a sum over units of a table `errors[unit][mode]`.

Budget. A unit's cost is its layer's multiply-accumulates per row (N · K) times its bucket's share
of the recorded rows; the average bit-width is Σ cost · (w_bits + a_bits) / 2 / Σ cost (W4A8 = 6).

Search (`beam_search`). From every unit at the cheapest mode, each step tries every single upgrade
of every beam member that stays within the budget, and keeps the `beam` upgrades that lower D the
most per added bit. Every state visited is kept, with the uniform assignments (every unit in one
mode) within the budget; the result is the visited state of least D within the budget, so its D
is never above the best uniform one's. The `rerank` states of least D (and the best uniform) are
then measured end to end: each is lowered into the captured graphs, run on the recorded calls, and
its output compared with the full-precision output (relative squared error). The least measured
one is chosen: never worse, on that measurement, than the best uniform choice within the budget.

Everything explored (every state's average bits and D, the Pareto front, the measured ones) is
left in `Execution.reports["adatsq"]` (clq_compile.search_report).
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from .configs import Execution, MethodConfigs, TimestepRows
from .fisher import PROBES, row_sensitivities
from .layer import QuantizedLinear
from .lowering import lower
from .observers import GraphCalibration, ReplayPosition, observe
from .timesteps import bucket_of, bucketable, bucketed, calibration_edges

# A recipe run: (weights, configs) -> layers.
BaseRecipe = Callable[[dict[str, torch.Tensor], MethodConfigs], dict[str, QuantizedLinear]]


@dataclass(frozen=True)
class SearchResult:
    """state: the chosen mode index per unit; objective / avg_bits: its D and average bits;
    explored: (avg_bits, D) of every state visited; uniform: {mode index: (avg_bits, D)} of the
    uniform states within the budget; ranked: the visited states within the budget, least D first."""

    state: tuple[int, ...]
    objective: float
    avg_bits: float
    explored: list[tuple[float, float]]
    uniform: dict[int, tuple[float, float]]
    ranked: list[tuple[int, ...]]


def average_bits(state, costs, bits) -> float:
    return sum(c * bits[m] for c, m in zip(costs, state)) / sum(costs)


def beam_search(errors: list[list[float]], costs: list[float], bits: list[float], budget: float,
                width: int = 4, keep: int = 8) -> SearchResult:
    """The assignment of least Σ errors[u][state[u]] found under average_bits(state) <= budget.

    errors[u][m]: unit u's objective at mode m; costs[u] > 0; bits[m] ascending (mode 0 the
    cheapest); width: the beam width; keep: how many of the best states `ranked` lists.
    Raises ValueError when even the cheapest assignment exceeds the budget.
    """
    units, modes = len(errors), len(bits)
    if any(b2 < b1 for b1, b2 in zip(bits, bits[1:])):
        raise ValueError(f"modes must come in ascending bits; got {bits}")
    total = sum(costs)
    slack = 1e-9 * max(1.0, abs(budget))
    start = (0,) * units
    start_bits = average_bits(start, costs, bits)
    if start_bits > budget + slack:
        raise ValueError(f"avg_bits {budget:g} is below the cheapest assignment's {start_bits:g} bits")
    visited: dict[tuple[int, ...], tuple[float, float]] = {start: (start_bits, sum(e[0] for e in errors))}
    beam = [start]
    while beam:
        found: dict[tuple[int, ...], tuple[float, float]] = {}
        candidates = []
        for s in beam:
            a_s, d_s = visited[s]
            for u in range(units):
                for m in range(s[u] + 1, modes):
                    a = a_s + costs[u] * (bits[m] - bits[s[u]]) / total
                    if a > budget + slack:
                        break
                    d = d_s + errors[u][m] - errors[u][s[u]]
                    gain = (d_s - d) / max(a - a_s, 1e-30)
                    candidates.append((-gain, d, a, s, u, m))
        best = heapq.nsmallest(width * 4, candidates, key=lambda c: (c[0], c[1]))
        beam = []
        for _, d, a, s, u, m in best:
            t = s[:u] + (m,) + s[u + 1:]
            if t in visited or t in found:
                continue
            found[t] = (a, d)
            beam.append(t)
            if len(beam) == width:
                break
        visited.update(found)
    uniform = {}
    for m in range(modes):
        state = (m,) * units
        a = average_bits(state, costs, bits)
        if a <= budget + slack:
            uniform[m] = (a, sum(e[m] for e in errors))
            visited.setdefault(state, uniform[m])
    ranked = sorted(visited, key=lambda t: (visited[t][1], visited[t][0]))
    chosen = ranked[0]
    return SearchResult(chosen, visited[chosen][1], visited[chosen][0], list(visited.values()), uniform,
                        ranked[:keep])


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, error) points no other point beats on both, by ascending bits."""
    front, best = [], float("inf")
    for a, d in sorted(points):
        if d < best:
            front.append((a, d))
            best = d
    return front


@dataclass(frozen=True)
class Unit:
    """One layer in one timestep bucket (bucket None: every bucket, the layer's rows' timesteps
    being unknown); cost: multiply-accumulates per row times the bucket's share of the rows."""

    path: str
    bucket: int | None
    cost: float


def adatsq(weights: dict[str, torch.Tensor], configs: MethodConfigs, calibration: list[GraphCalibration] | None,
           execution: Execution, run_base: BaseRecipe) -> dict[str, QuantizedLinear]:
    """The layers AdaTSQ chooses (module docstring); without calibration, the base recipe at the
    first mode (the `bits` option's)."""
    config = configs.adatsq
    if not calibration or not weights:
        layers = run_base(weights, dataclasses.replace(configs, quantizer=config.quantizers[0]))
        return {p: dataclasses.replace(layer, notes=[*layer.notes, "adatsq: no calibration data, "
                                                   f"one mode ({config.modes[0]})"]) for p, layer in layers.items()}
    edges = calibration_edges(calibration, config.buckets)
    count = len(edges) + 1
    order = sorted(range(len(config.modes)), key=lambda i: config.quantizers[i].mean_bits)
    modes = [config.modes[i] for i in order]
    quantizers = [config.quantizers[i] for i in order]
    bits = [q.mean_bits for q in quantizers]
    with tqdm(total=len(modes) * count, desc="adatsq candidates", leave=False) as bar:
        candidates = []
        for q in quantizers:
            per_bucket = []
            for b in range(count):
                rows = TimestepRows(edges, b) if edges else None
                per_bucket.append(run_base(weights, dataclasses.replace(configs, quantizer=q, rows=rows)))
                bar.update()
            candidates.append(per_bucket)
    split = bucketable(calibration, set(weights)) if edges else set()
    shares = _bucket_shares(calibration, edges)
    units = [Unit(p, b, weights[p].numel() * (1.0 if b is None else shares[b])) for p in sorted(weights)
             for b in (range(count) if p in split else [None])]
    index = {(u.path, u.bucket): i for i, u in enumerate(units)}

    def assemble(state: tuple[int, ...]) -> dict[str, QuantizedLinear]:
        """The layers of an assignment: one record per bucket where the layer's rows have timesteps."""
        layers = {}
        for path in weights:
            if path in split:
                chosen = [candidates[state[index[(path, b)]]][b][path] for b in range(count)]
                layers[path] = bucketed(edges, chosen)
            else:
                layers[path] = candidates[state[index[(path, None)]]][0][path]
        return layers

    per_mode = [assemble((m,) * len(units)) for m in range(len(modes))]
    table, energy = _error_table(calibration, per_mode, index, edges, split, execution.kernels)
    errors = [[table[i][m] / energy for m in range(len(modes))] for i in range(len(units))]
    result = beam_search(errors, [u.cost for u in units], bits, config.avg_bits, config.beam)

    measured_states = list(dict.fromkeys(
        [*result.ranked[:config.rerank],
         *([(min(result.uniform, key=lambda m: result.uniform[m][1]),) * len(units)] if result.uniform else [])]))
    measured = {}
    for state in tqdm(measured_states, desc="adatsq end-to-end", leave=False):
        measured[state] = end_to_end_error(calibration, assemble(state), execution.kernels)
    chosen = min(measured_states, key=lambda s: (measured[s], result.ranked.index(s) if s in result.ranked else 0))
    explored = {s: (average_bits(s, [u.cost for u in units], bits), sum(errors[i][m] for i, m in enumerate(s)))
                for s in measured_states}
    layers = assemble(chosen)
    names = {path: [modes[chosen[index[(path, b)]]] for b in (range(count) if path in split else [None])]
             for path in weights}
    out = {}
    for path, layer in layers.items():
        note = "adatsq: " + (", ".join(f"{m} at {r}" for m, r in zip(names[path], _ranges(edges)))
                             if path in split else f"{names[path][0]} at every timestep")
        out[path] = dataclasses.replace(layer, notes=[*layer.notes, note])
    if execution.reports is not None:
        execution.reports["adatsq"] = {
            "modes": modes, "mode_bits": bits, "avg_bits_budget": config.avg_bits, "base": config.base,
            "timestep_edges": list(edges), "units": len(units),
            "objective": "predicted relative squared error of the model output (first order, Fisher-weighted)",
            "explored": [list(p) for p in result.explored],
            "pareto": [list(p) for p in pareto_front(result.explored)],
            "uniform": [{"mode": modes[m], "avg_bits": a, "predicted": d,
                         "measured": measured.get((m,) * len(units))} for m, (a, d) in result.uniform.items()],
            "measured": [{"avg_bits": explored[s][0], "predicted": explored[s][1], "measured": measured[s],
                          "chosen": s == chosen} for s in measured_states],
            "chosen": {"avg_bits": explored[chosen][0], "predicted": explored[chosen][1],
                       "measured": measured[chosen]},
            "choice": names,
        }
    return out


def _ranges(edges: tuple[float, ...]) -> list[str]:
    from .timesteps import bucket_range

    return [bucket_range(edges, b) for b in range(len(edges) + 1)]


def _bucket_shares(calibration: list[GraphCalibration], edges: tuple[float, ...]) -> list[float]:
    """Each bucket's share of the recorded rows' timesteps."""
    if not edges:
        return [1.0]
    steps = torch.cat([t for cal in calibration for t in (cal.timesteps() or [])])
    counts = torch.bincount(bucket_of(steps, edges), minlength=len(edges) + 1).double()
    return (counts / counts.sum()).tolist()


def _error_table(calibration: list[GraphCalibration], per_mode: list[dict[str, QuantizedLinear]],
                 index: dict[tuple[str, int | None], int], edges: tuple[float, ...], split: set[str],
                 kernels: str) -> tuple[list[list[float]], float]:
    """(table[unit][mode]: Σ over the unit's rows of s_row · ‖e_row‖², Σ over calls of ‖f‖²)."""
    paths = set(per_mode[0])
    table = [[0.0] * len(per_mode) for _ in index]
    energy = 0.0
    steps = [cal.timesteps() for cal in calibration]
    sensitivities = [row_sensitivities(cal, paths, PROBES) for cal in calibration]
    # Where a layer's rows are not the probed rows: the graph's mean sensitivity (1 without probes).
    fallback = [float(torch.cat([v.reshape(-1) for v in s.values()]).mean()) if s else 1.0 for s in sensitivities]
    where = ReplayPosition()

    def measure(site, x, weight, bias, y):
        g, c = where.graph, where.call
        t = None if steps[g] is None else steps[g][c]
        s = sensitivities[g].get(site.path)
        rows = y.shape[0]
        sens = (s[c].to(torch.float64) if s is not None and s.shape[1] == rows else
                torch.full((rows,), fallback[g], dtype=torch.float64))
        if site.path in split:
            ids = bucket_of(t.expand(rows) if t.numel() == 1 else t, edges).tolist()
        else:
            ids = [None] * rows
        masks = {b: torch.tensor([i == b for i in ids]) for b in set(ids)}  # the rows of each unit
        for m, layers in enumerate(per_mode):
            out = layers[site.path].forward(x, bias, kernels, t)
            err = (out.double() - y.double()).reshape(rows, -1).square().sum(dim=1) * sens
            for b, mask in masks.items():
                table[index[(site.path, b)]][m] += float(err[mask].sum())

    observe(calibration, paths, measure, desc="adatsq errors", position=where)
    for cal in calibration:
        with torch.no_grad():
            for args in cal.arguments():
                energy += sum(float(o.double().square().sum()) for o in _floats(cal.gm(*args)))
    return table, energy if energy > 0 else 1.0


def _floats(outputs) -> list[torch.Tensor]:
    flat, _ = tree_flatten(outputs)
    return [o for o in flat if isinstance(o, torch.Tensor) and o.is_floating_point()]


def end_to_end_error(calibration: list[GraphCalibration], layers: dict[str, QuantizedLinear], kernels: str) -> float:
    """Σ ‖f̂ − f‖² / Σ ‖f‖² over the recorded calls: f the full-precision graphs' outputs, f̂ the
    graphs lowered with `layers` (the other linears in full precision)."""
    err = ref = 0.0
    with torch.no_grad():
        for cal in calibration:
            quantize = {s.node for s in cal.analysis.sites if s.path in layers}
            lowered = lower(cal.gm, cal.analysis, dict(layers), quantize, kernels, merge=False)
            for args in cal.arguments():
                for f, q in zip(_floats(cal.gm(*args)), _floats(lowered(*args))):
                    err += float((q.double() - f.double()).square().sum())
                    ref += float(f.double().square().sum())
    return err / ref if ref > 0 else 0.0
