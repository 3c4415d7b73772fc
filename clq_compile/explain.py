"""What the compiler did: a per-layer table, the rewritten graphs, and the weights' memory."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass

from torch import fx

from clq_compile.kernels.formats import get_format, mode_name

from .artifact import layer_manifest, ordered_decisions, read_manifest
from .calibration import model_state
from .checks import not_compiled, uncaptured_linears
from .state import QUANTIZED

HEADER = ("layer", "role", "out x in", "bits", "granularity", "method", "decision", "rel. error")


@dataclass(frozen=True)
class LayerRow:
    """What the table shows of one linear layer. layer: None when it is kept in 16 bit."""

    path: str
    role: str
    out_features: int
    in_features: int
    quantize: bool
    reason: str
    layer: dict | None
    error: float | None
    merge: str = ""


def _granularity(group: int | None, unit: str) -> str:
    return f"g{group}" if group else unit


def _cells(row: LayerRow) -> tuple[str, ...]:
    if row.layer is not None:
        info = row.layer
        # A layer with timestep buckets: each bucket's mode, in bucket order ("w4a4/w8a8").
        units = info.get("buckets", [info])
        bits = "/".join(dict.fromkeys(mode_name(get_format(u["w_format"]), get_format(u["a_format"])) for u in units))
        activations = (f"a:{_granularity(info['a_group'], 'token')}" if get_format(info["a_format"]).quantizes
                       else "a:16 bit")
        gran = f"w:{_granularity(info['w_group'], 'channel')} {activations}"
        method, status = info["method"], "; ".join(["quantized", *info["notes"], *([row.merge] if row.merge else [])])
    else:
        bits, gran, method = "16", "-", "-"
        status = "quantized at first call" if row.quantize else f"kept: {row.reason}"
    error = "" if row.error is None else f"{row.error:.4f}"
    return (row.path, row.role, f"{row.out_features} x {row.in_features}", bits, gran, method, status, error)


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as text lines, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


LEGEND = (
    ("S + H", "S + H<b>: OBS's G = S·H; S deals the input channels, by decreasing outlier score "
              "score_c = max_t|x_tc| / mean_c' max_t|x_tc'|, to the Hadamard blocks in snake order; "
              "H<b>: block-diagonal normalized Hadamard of block b"),
    ("clip ", "clip l/r: CLPS's clipping bounds (ratios of the weight range), chosen where the "
              "error peaks downstream (the CLPS target)"),
)


def table(title: str, rows: list[LayerRow], columns: int | None = None) -> str:
    """The title line, one aligned line per layer, then what the method column's terms mean.

    columns: None prints one line per layer, every cell in full. A number (at least 20) wraps to
    that many characters: each layer's short cells (path, role, shape, bits, granularity, error)
    on one line, which is wider where a path is long, its method and decision wrapped on the
    lines below it, title and legend wrapped.
    """
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int)):
        raise TypeError(f"columns must be None or an int (characters per line); got {columns!r}")
    if columns is not None and columns < 20:
        raise ValueError(f"columns must be at least 20 characters; got {columns}")
    cells = [_cells(r) for r in rows]
    methods = [c[5] for c in cells]
    legend = [text for key, text in LEGEND if any(key in m for m in methods)]
    if columns is None:
        rule = tuple("-" * max(len(c[i]) for c in [HEADER, *cells]) for i in range(len(HEADER)))
        return "\n".join([title, *aligned([HEADER, rule, *cells]), *legend])
    short = (0, 1, 2, 3, 4, 7)
    header = tuple(HEADER[i] for i in short)
    lines = aligned([header, tuple("-" * len(h) for h in header), *(tuple(c[i] for i in short) for c in cells)])
    out = [*textwrap.wrap(title, columns, subsequent_indent="    "), lines[0], "    method; decision", lines[1]]
    for line, c in zip(lines[2:], cells):
        more = c[6] if c[5] == "-" else f"{c[5]}; {c[6]}"
        out += [line, *textwrap.wrap(more, columns, initial_indent="    ", subsequent_indent="    ")]
    for text in legend:
        out += textwrap.wrap(text, columns, subsequent_indent="    ")
    return "\n".join(out)


MERGED_SHOWN = 3


def merge_notes(plans) -> dict[str, str]:
    """{layer path: what merging did with it} from the lowered graphs' merge plans (passes/merging.py).

    Graphs of one model (recompiles) merge the same layers; each note is said once.
    """
    merged: dict[str, list[str]] = {}
    apart: dict[str, str] = {}
    for plan in plans:
        for m in plan.merges:
            for path in m.paths:
                merged.setdefault(path, [p for p in m.paths if p != path])
        for path, why in plan.kept_apart.items():
            apart.setdefault(path, why)
    notes = {}
    for path in {**merged, **apart}:
        others = merged.get(path, [])
        shown = ", ".join(others[:MERGED_SHOWN]) + (f" and {len(others) - MERGED_SHOWN} more"
                                                    if len(others) > MERGED_SHOWN else "")
        parts = [f"merged with {shown}: input quantized once, one GEMM" if others else "",
                 f"not merged: {apart[path]}" if path in apart else ""]
        notes[path] = "; ".join(p for p in parts if p)
    return notes


UNCAPTURED = ("not in a compiled graph: unused by the calls traced, or run by Dynamo outside the graphs, eagerly "
              "and in full precision (after a graph break inside a loop it runs the rest of the frame uncompiled)")


def _uncaptured(state, rows: dict[str, LayerRow]) -> dict[str, LayerRow]:
    """Rows for the model's linear layers that no captured graph holds, once some graph is."""
    return {path: LayerRow(path, "uncaptured", m.out_features, m.in_features, False, UNCAPTURED, None, None)
            for path, m in uncaptured_linears(state).items() if path not in rows}


def explain(qt, columns: int | None = None) -> str:
    """One row per linear layer of `qt`: path, role, shape, bits, granularity, decision, error.

    The error column is the layer's relative output error ||Y - Ŷ|| / ||Y|| on the calibration
    data (empty before calibration or for layers kept in full precision). columns: see `table`.
    """
    state = model_state(qt)
    state.refuse_changed_weights(contents=True)
    options = state.options
    merges = merge_notes(g.lowered.meta["clq_merges"] for g in state.graphs if g.lowered is not None)
    rows = {path: LayerRow(path, **d, error=state.errors.get(path), merge=merges.get(path, ""),
                           layer=layer_manifest(state.layers[path]) if path in state.layers else None)
            for path, d in state.site_decisions().items()}
    rows.update(_uncaptured(state, rows))
    quantized = sum(1 for r in rows.values() if r.layer is not None)
    source = f" loaded from {options.load}" if options.load else ""
    title = (f"clq: bits={options.bits} recipe={options.recipe} state={state.phase}{source} "
             f"graphs={len(state.graphs)} layers={len(rows)} quantized={quantized}")
    lines = [table(title, list(rows.values()), columns)]
    reason = not_compiled(state)
    if reason is not None:
        lines.append(f"not compiled: {reason}")
    if state.phase != QUANTIZED and options.quantizes:
        lines.append("(not quantized yet: call the model, or calibrate it with clq_compile.calibrating(qt))")
    elif options.quantizes:
        report = memory_report(qt)
        any_branch = any(layer.lowrank is not None for layer in state.layers.values())
        lines.append(f"weights of quantized layers: {report['fp_bytes'] / 2**20:.2f} MiB as stored by the model "
                     f"-> {report['quantized_bytes'] / 2**20:.2f} MiB packed"
                     f"{' (with the 16-bit low-rank branches)' if any_branch else ''} "
                     f"({report['quantized_bytes'] / max(report['fp_bytes'], 1):.3f}x); "
                     f"as bf16: {report['bf16_bytes'] / 2**20:.2f} MiB; full-precision copies "
                     f"{'released' if report['released'] else 'kept'} "
                     f"({report['resident_fp_bytes'] / 2**20:.2f} MiB resident)")
    if columns is not None:
        lines = [lines[0], *(textwrap.fill(line, columns, subsequent_indent="    ") for line in lines[1:])]
    return "\n".join(lines)


def _artifact_rows(manifest: dict) -> list[LayerRow]:
    """One row per linear layer, in the model's order (`layer_order`; sorted in artifacts without it)."""
    layers, errors = manifest["layers"], manifest["errors"]
    return [LayerRow(path, **d, layer=layers.get(path), error=errors.get(path))
            for path, d in ordered_decisions(manifest).items()]


def explain_artifact(path: str | os.PathLike, columns: int | None = None) -> str:
    """The per-layer table of a saved artifact, from its manifest alone (no model needed); columns: see `table`."""
    manifest = read_manifest(path)
    options = manifest["options"]
    rows = _artifact_rows(manifest)
    title = (f"clq artifact {os.fspath(path)}: format {manifest['format_version']}, clq-compile "
             f"{manifest['package_version']}, bits={options['bits']} recipe={manifest['recipe']} "
             f"{'calibrated' if manifest['calibrated'] else 'data-free'}, layers={len(rows)} "
             f"quantized={len(manifest['layers'])}, model parameters={len(manifest['fingerprint'])}")
    return table(title, rows, columns)


def memory_report(qt) -> dict:
    """Weight bytes of the quantized layers before and after quantization.

    fp_bytes: the user's weights of those layers at their dtype; bf16_bytes: the same weights in
    bf16; quantized_bytes: packed integers, scales and zero points, 16-bit low-rank branches, plus
    every online transform tensor (permutations, rotation blocks) and folded bias counted once
    however many layers (or timestep buckets) share it;
    resident_fp_bytes: the bytes the user's weights of those layers still hold in memory (fp_bytes
    until `release_weights`, next to nothing after; a loaded model's, until its first call has
    checked the artifact); released: whether they were released.
    per_layer: {path: (fp_bytes, packed bytes with the branch)}.
    """
    state = model_state(qt)
    module = qt._orig_mod
    fp = bf16 = packed = 0
    per_layer = {}
    shared: dict[int, int] = {}
    storages: dict[int, int] = {}
    for path in sorted(state.layers):
        layer = state.layers[path]
        weight = module.get_submodule(path).weight
        fp_bytes = weight.numel() * weight.element_size()
        per_layer[path] = (fp_bytes, layer.nbytes)
        fp += fp_bytes
        bf16 += weight.numel() * 2
        packed += layer.nbytes
        storage = weight.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        for record in (layer,) if layer.buckets is None else layer.buckets.layers:
            for t in (record.act_mul, record.act_perm, record.act_rotation, record.bias):
                if t is not None:
                    shared[id(t)] = t.numel() * t.element_size()
    for _, values in state.withheld.values():  # released, but kept until the artifact is trusted
        storage = values.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    resident = sum(storages.values())
    return {"fp_bytes": fp, "bf16_bytes": bf16, "quantized_bytes": packed + sum(shared.values()),
            "resident_fp_bytes": resident, "released": bool(state.released), "per_layer": per_layer}


def graphs(qt) -> list[fx.GraphModule]:
    """The graphs of `qt` as they run now: rewritten after quantization, as captured before."""
    return [g.lowered if g.lowered is not None else g.gm for g in model_state(qt).graphs]


def search_report(qt) -> dict:
    """What the recipe's search explored when `qt` was last quantized, by recipe name: for adatsq
    the bit allocation's Pareto front, the candidates measured end to end and the choice per layer
    (passes/adatsq.py); {} for recipes without one, and for models loaded from an artifact."""
    return model_state(qt).reports
