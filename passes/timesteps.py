"""Timestep buckets: one quantization per range of timesteps, chosen inside the compiled graph.

A diffusion transformer runs at every timestep of a sampling trajectory, and its activations
change with the timestep. With option `timestep_buckets` B > 1 (and recipe adatsq), the recorded
calibration rows are cut by their timestep into B buckets of equal share (`bucket_edges`: the
edges lie halfway between recorded timesteps, so no bucket is empty), the recipe runs once per
bucket on that bucket's rows only (MethodConfigs.rows: every statistic, Hessian, sample and
search objective reads only those rows; passes/fisher.py `row_weights`), and each layer keeps one
record per bucket (`assemble`: a `QuantizedLinear` with `TimestepBuckets`). The lowered graph
maps its `timestep` input to a bucket index once (`clq::timestep_bucket`) and each bucketed
layer's `clq::quant_linear_bucketed` runs the chosen bucket's record: one graph, no guard on the
timestep, no recompile per step.

A layer is bucketed only where every recorded call tells each of its rows' timestep: its graph has
a `timestep` input, the graph calls the module once, and its input's first dimension is the
samples (or the call has one timestep). Other layers, and layers whose buckets came out
identical (weights rounded to nearest, say), keep one record.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from tqdm.auto import tqdm

from .configs import TimestepRows
from .layer import QuantizedLinear, TimestepBuckets
from .observers import GraphCalibration, ReplayPosition, observe


def bucket_edges(timesteps: torch.Tensor, buckets: int) -> tuple[float, ...]:
    """Edges cutting `timesteps` (float64 [n]) into up to `buckets` buckets of about equal counts:
    each edge halfway between two consecutive distinct values, so every bucket holds some. Fewer
    buckets when there are fewer distinct values."""
    values = torch.unique(timesteps.double())  # sorted
    edges = []
    for i in range(1, buckets):
        below = torch.quantile(timesteps.double(), i / buckets, interpolation="lower")
        above = values[values > below]
        if len(above):
            edges.append(float((below + above[0]) / 2))
    return tuple(sorted(set(edges)))


def calibration_edges(calibrations: list[GraphCalibration], buckets: int) -> tuple[float, ...]:
    """The bucket edges of every recorded row's timestep (() when no graph has a timestep input,
    or all rows share one)."""
    found = [t for cal in calibrations for t in (cal.timesteps() or [])]
    return bucket_edges(torch.cat(found), buckets) if found and buckets > 1 else ()


def bucket_of(timesteps: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """int64 like `timesteps`: the number of edges at or below each (as clq::timestep_bucket)."""
    return torch.bucketize(timesteps.double(), torch.tensor(edges, dtype=torch.float64), right=True)


class TimestepSelection:
    """The rows of one bucket, per graph and recorded call: `mask(graph, call, rows)` is float32
    [rows] of 1 (the row's timestep is in the bucket) and 0, or None where the rows' timesteps are
    unknown (no timestep input, or the layer's rows are not the samples)."""

    def __init__(self, calibrations: list[GraphCalibration], rows: TimestepRows):
        self.rows = rows
        self.buckets = [None if (t := cal.timesteps()) is None else [bucket_of(s, rows.edges) for s in t]
                        for cal in calibrations]

    def mask(self, graph: int, call: int, rows: int | None) -> torch.Tensor | None:
        buckets = self.buckets[graph] if graph < len(self.buckets) else None
        if buckets is None:
            return None
        ids = buckets[call]
        rows = len(ids) if rows is None else rows
        if len(ids) == 1:
            ids = ids.expand(rows)
        elif len(ids) != rows:
            return None
        return (ids == self.rows.bucket).float()


def bucketable(calibrations: list[GraphCalibration], paths: set[str]) -> set[str]:
    """The layers of `paths` every recorded call tells each row's timestep of (module docstring):
    one replay of the calls in full precision."""
    ok = set(paths)
    steps = [cal.timesteps() for cal in calibrations]
    for cal, t in zip(calibrations, steps):
        uses: dict[str, int] = {}
        for s in cal.analysis.sites:
            uses[s.path] = uses.get(s.path, 0) + 1
        if t is None:
            ok -= {s.path for s in cal.analysis.sites}
        ok -= {p for p, n in uses.items() if n > 1}
    where = ReplayPosition()

    def check(site, x, weight, bias, y):
        t = steps[where.graph]
        if t is not None and site.path in ok and t[where.call].numel() != 1 and (
                x.dim() < 2 or x.shape[0] != t[where.call].numel()):
            ok.discard(site.path)

    if ok:
        observe(calibrations, ok, check, desc="timestep buckets", position=where)
    return ok


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b)))


def _shared(layer: QuantizedLinear, first: QuantizedLinear) -> QuantizedLinear:
    """`layer` holding `first`'s tensor objects wherever its own are equal (stored once)."""
    w, w0 = layer.weight, first.weight
    weight = dataclasses.replace(w, **{k: getattr(w0, k) for k in ("qweight", "scale", "zero")
                                       if _same(getattr(w, k), getattr(w0, k))})
    online = dataclasses.replace(layer.online, **{k: getattr(first.online, k) for k in ("mul", "perm", "rotation")
                                                  if _same(getattr(layer.online, k), getattr(first.online, k))})
    bias = first.bias if _same(layer.bias, first.bias) else layer.bias
    return dataclasses.replace(layer, weight=weight, online=online, bias=bias)


def _identical(a: QuantizedLinear, b: QuantizedLinear) -> bool:
    return (a.scalars("auto") == b.scalars("auto")
            and all(_same(x, y) for x, y in zip(a.tensors().values(), b.tensors().values())))


def bucketed(edges: tuple[float, ...], layers: list[QuantizedLinear]) -> QuantizedLinear:
    """One record of a layer quantized per bucket (`layers[b]` for bucket b); equal tensors of
    different buckets are stored once."""
    first = layers[0]
    kept = tuple([first, *(_shared(layer, first) for layer in layers[1:])])
    methods = [layer.method for layer in kept]
    common = methods[0] if len(set(methods)) == 1 else os.path.commonprefix(methods).rsplit(" ", 1)[0] or "mixed"
    # The buckets' own notes once each, then what differs between them.
    notes = list(dict.fromkeys(n for layer in kept for n in layer.notes))
    notes += ([f"bucket {b} ({bucket_range(edges, b)}): {layer.method}" for b, layer in enumerate(kept)]
              if len(set(methods)) > 1 else [f"timestep buckets: {', '.join(bucket_range(edges, b) for b in range(len(kept)))}"])
    return dataclasses.replace(first, buckets=TimestepBuckets(edges, kept), details={},
                               method=f"{common} per timestep bucket ({len(kept)})", notes=notes)


def bucket_range(edges: tuple[float, ...], b: int) -> str:
    """"t < 500", "500 <= t < 750", "t >= 750": the timesteps of bucket b."""
    if b == 0:
        return f"t < {edges[0]:g}"
    if b == len(edges):
        return f"t >= {edges[-1]:g}"
    return f"{edges[b - 1]:g} <= t < {edges[b]:g}"


def assemble(runs: list[dict[str, QuantizedLinear]], edges: tuple[float, ...],
             bucketed_paths: set[str]) -> dict[str, QuantizedLinear]:
    """The layers of one recipe run per bucket (`runs[b]`) as one record per path: bucketed for
    `bucketed_paths` whose buckets differ, else bucket 0's run's record (noted)."""
    layers = {}
    for path, first in runs[0].items():
        per_bucket = [run[path] for run in runs]
        if path not in bucketed_paths:
            layers[path] = dataclasses.replace(first, notes=[*first.notes, "one timestep bucket: the calls do not "
                                                             "tell the timestep of this layer's rows"])
        elif all(_identical(first, other) for other in per_bucket[1:]):
            layers[path] = dataclasses.replace(first, notes=[*first.notes, "one timestep bucket: every "
                                                             "bucket's calibration gave the same layer"])
        else:
            layers[path] = bucketed(edges, per_bucket)
    return layers


def per_bucket(run, weights: dict[str, torch.Tensor], configs, calibration: list[GraphCalibration] | None,
               buckets: int) -> tuple[dict[str, QuantizedLinear], str | None]:
    """(layers, a note or None): `run(weights, configs)` (a recipe) once per timestep bucket of the
    recorded rows, each on its bucket's rows (`configs.rows`), assembled per layer; once on all
    rows when `buckets` is 1, there is no calibration, or the rows share one timestep."""
    edges = calibration_edges(calibration, buckets) if calibration and weights else ()
    if not edges:
        note = None
        if buckets > 1:
            note = ("one timestep bucket: no calibration data" if not calibration else
                    "one timestep bucket: the recorded calls have no timestep input, or one timestep")
        return run(weights, configs), note
    runs = [run(weights, dataclasses.replace(configs, rows=TimestepRows(edges, b)))
            for b in tqdm(range(len(edges) + 1), desc="timestep buckets", leave=False)]
    return assemble(runs, edges, bucketable(calibration, set(weights))), None
