"""Merging: quantized layers that read one activation quantize it once and share one GEMM.

The q, k and v projections of an attention read the same tensor x; so do SD3's and Flux's
add_q/k/v_proj (on the text stream) and a Flux single block's proj_mlp beside its q/k/v. Each
quantized layer i computes, with T_i its online transform (multiplier, channel permutation,
block rotation), Q dynamic quantization (integers q, one scale per token or group) and Ŵ_i its
stored weight,

    y_i = Q(T_i(x)) · Ŵ_iᵀ  (scaled by a_scale[m] · w_scale_i[n], chunk by chunk)  + b_i.

When T_i, the activation bits and the activation group are the same for every i, so is
Q(T_i(x)): its integers and scales are computed once, and

    [y_1 | y_2 | ...] = Q(T(x)) · [Ŵ_1; Ŵ_2; ...]ᵀ  (scaled by a_scale[m] · [w_scale_1 | ...][n])  + [b_1 | ...].

Every output column of the merged call is computed from its own weight row, scales, zero point
and bias in the same operations as in its own layer's call, so the merged outputs equal the
members' bit for bit. Weights, per-output-channel or per-group scales and zero points concatenate
along N (the members must share their weight bits, group and symmetry for the rows to be one
tensor). Weight-only layers (16-bit activations) are left alone: their float matmul may sum in
another order when N changes.

`plan_merges` finds the groups on the graph (same input node, quantized, transforms equal) and
says for every other reader of a shared input why it was kept apart; `merged_weight` builds the
concatenated weight once, and the members then hold views of it, so merging costs no memory and
every graph lowered from the same layers shares it. The layers stay separate records (artifacts
save them one by one); merging happens only at lowering (passes/lowering.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from clq_compile.kernels.packing import PackedWeight

from .capture import GraphAnalysis
from .layer import QuantizedLinear


@dataclass(frozen=True)
class Merge:
    """Linear sites computed by one quantize + one GEMM. nodes / paths: graph order."""

    nodes: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    """merges: the groups; kept_apart: {path: why it does not share its input's quantization}."""

    merges: tuple[Merge, ...]
    kept_apart: dict[str, str]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def difference(a: QuantizedLinear, b: QuantizedLinear) -> str | None:
    """Why layers a and b, reading the same input, cannot share one quantize and one GEMM; None if
    they can."""
    if not (a.a_format.quantizes and b.a_format.quantizes):
        return "weight-only layers (16-bit activations) are not merged"
    if a.buckets is not None or b.buckets is not None:
        return "layers quantized per timestep bucket are not merged"
    checks = (
        (a.a_format == b.a_format, f"their activation formats differ ({a.a_format.name} vs {b.a_format.name})"),
        (a.a_group == b.a_group, f"their activation groups differ ({a.a_group or 'per token'} vs "
                                 f"{b.a_group or 'per token'})"),
        (_same(a.act_mul, b.act_mul), "their online channel multipliers differ"),
        (_same(a.act_perm, b.act_perm), "their channel permutations differ"),
        (_same(a.act_rotation, b.act_rotation), "their online rotations differ"),
        (a.weight.format == b.weight.format,
         f"their weight formats differ ({a.weight.format.name} vs {b.weight.format.name})"),
        (a.weight.group == b.weight.group, "their weight groups differ"),
        ((a.weight.zero is None) == (b.weight.zero is None), "one has asymmetric weights, the other not"),
    )
    return next((why for ok, why in checks if not ok), None)


def plan_merges(gm: fx.GraphModule, analysis: GraphAnalysis, layers: dict[str, QuantizedLinear],
                quantize: set[str]) -> MergePlan:
    """The merge groups of `gm`: quantized sites (node names in `quantize`) whose `F.linear` reads
    the same node, in classes of agreeing layers (`difference` is None within a class)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    readers: dict[fx.Node, list] = {}
    for site in analysis.sites:
        if site.node in quantize:
            readers.setdefault(nodes[site.node].args[0], []).append(site)
    merges, kept_apart = [], {}
    for sites in readers.values():
        classes: list[list] = []
        for site in sites:
            home = next((c for c in classes if difference(layers[c[0].path], layers[site.path]) is None), None)
            if home is None:
                classes.append(home := [])
            home.append(site)
        first = classes[0][0]
        for c in classes[1:]:
            why = difference(layers[first.path], layers[c[0].path])
            for site in c:
                kept_apart[site.path] = f"reads the same input as {first.path}, but {why}"
        if len(classes) > 1 and len(classes[0]) == 1:
            other = classes[1][0].path
            kept_apart[first.path] = (f"reads the same input as {other}, but "
                                      f"{difference(layers[first.path], layers[other])}")
        merges += [Merge(tuple(s.node for s in c), tuple(s.path for s in c)) for c in classes if len(c) > 1]
    return MergePlan(tuple(merges), kept_apart)


def _rows(parts: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the parts stacked along dim 0, whether that is a new tensor).

    Parts that already are consecutive row ranges of one tensor (views an earlier merge left)
    give that tensor back without a copy.
    """
    base = parts[0]._base
    if base is not None and base.is_contiguous() and all(p._base is base for p in parts):
        pointer = base.data_ptr()
        for p in parts:
            if p.data_ptr() != pointer or not p.is_contiguous():
                break
            pointer += p.numel() * p.element_size()
        else:
            if sum(p.shape[0] for p in parts) == base.shape[0]:
                return base, False
    return torch.cat(parts), True


def merged_weight(members: list[QuantizedLinear]) -> tuple[PackedWeight, list[PackedWeight]]:
    """The members' weights as one: qweight, scales and zero points stacked along N; and each
    member's weight as row views of the merged tensors.

    The caller gives the members those views in place of their own weights (so the merge costs no
    memory, and a second lowering finds the same tensors). Members must agree (`difference` is None).
    """
    first = members[0].weight
    joined = {}
    views = [m.weight for m in members]
    for name in ("qweight", "scale", "zero"):
        parts = [getattr(m.weight, name) for m in members]
        if parts[0] is None:
            joined[name] = None
            continue
        joined[name], new = _rows(parts)
        if new:
            start = 0
            for i, part in enumerate(parts):
                views[i] = dataclasses.replace(views[i], **{name: joined[name][start:start + part.shape[0]]})
                start += part.shape[0]
    merged = PackedWeight(joined["qweight"], joined["scale"], joined["zero"], first.format, first.in_features,
                          first.group)
    return merged, views
