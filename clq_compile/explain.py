"""What the compiler did: a per-layer table and the rewritten graphs."""

from __future__ import annotations

from torch import fx

from .calibration import model_state
from .state import QUANTIZED


def _granularity(group: int | None, unit: str) -> str:
    return f"g{group}" if group else unit


def explain(qt) -> str:
    """One row per linear layer of `qt`: path, role, shape, bits, granularity, decision, error.

    The error column is the layer's relative output error ||Y - Ŷ|| / ||Y|| on the calibration
    data (empty before calibration or for layers kept in full precision).
    """
    state = model_state(qt)
    options = state.options
    header = ("layer", "role", "out x in", "bits", "granularity", "method", "decision", "rel. error")
    rows = []
    seen = set()
    for graph in state.graphs:
        for site in graph.analysis.sites:
            if site.path in seen:
                continue
            seen.add(site.path)
            decision = graph.decisions[site.node]
            layer = state.layers.get(site.path) if decision.quantize else None
            if layer is not None:
                bits = f"w{layer.weight.bits}a{layer.a_bits}"
                gran = (f"w:{_granularity(layer.weight.group, 'channel')} "
                        f"a:{_granularity(layer.a_group, 'token')}")
                method = layer.method
                status = "; ".join(["quantized", *layer.notes])
            else:
                bits, gran, method = "16", "-", "-"
                status = ("quantized at first call" if decision.quantize else f"kept: {decision.reason}")
            error = state.errors.get(site.path)
            rows.append((site.path, site.role, f"{site.out_features} x {site.in_features}", bits,
                         gran, method, status, "" if error is None else f"{error:.4f}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"clq: bits={options.bits} recipe={options.recipe} state={state.phase} "
             f"graphs={len(state.graphs)} layers={len(rows)} "
             f"quantized={sum(1 for r in rows if r[6].startswith('quantized'))}"]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    if state.phase != QUANTIZED and options.quantizes:
        lines.append("(not quantized yet: call the model, or calibrate it with clq_compile.calibrating(qt))")
    else:
        report = memory_report(qt)
        lines.append(f"weights of quantized layers: {report['fp_bytes'] / 2**20:.2f} MiB as stored by the model "
                     f"-> {report['quantized_bytes'] / 2**20:.2f} MiB packed "
                     f"({report['quantized_bytes'] / max(report['fp_bytes'], 1):.3f}x); "
                     f"as bf16: {report['bf16_bytes'] / 2**20:.2f} MiB")
    return "\n".join(lines)


def memory_report(qt) -> dict:
    """Weight bytes of the quantized layers before and after quantization.

    fp_bytes: the user's parameters as stored (their dtype); bf16_bytes: the same weights in
    bf16; quantized_bytes: packed integers, scales and zero points, plus every online transform
    tensor (permutations, rotation blocks) counted once however many layers share it.
    per_layer: {path: (fp_bytes, packed bytes)}.
    """
    state = model_state(qt)
    fp = bf16 = packed = 0
    per_layer = {}
    shared: dict[int, int] = {}
    for graph in state.graphs:
        for site in graph.analysis.sites:
            layer = state.layers.get(site.path)
            if layer is None or site.path in per_layer or not graph.decisions[site.node].quantize:
                continue
            weight = graph.weight(site.path)
            fp_bytes = weight.numel() * weight.element_size()
            per_layer[site.path] = (fp_bytes, layer.weight.nbytes)
            fp += fp_bytes
            bf16 += weight.numel() * 2
            packed += layer.weight.nbytes
            for t in (layer.act_mul, layer.act_perm, layer.act_rotation):
                if t is not None:
                    shared[id(t)] = t.numel() * t.element_size()
    return {"fp_bytes": fp, "bf16_bytes": bf16, "quantized_bytes": packed + sum(shared.values()),
            "per_layer": per_layer}


def graphs(qt) -> list[fx.GraphModule]:
    """The graphs of `qt` as they run now: rewritten after quantization, as captured before."""
    return [g.lowered if g.lowered is not None else g.gm for g in model_state(qt).graphs]
