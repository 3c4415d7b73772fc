"""Folding: which activation transforms can move into the layer that produces the activation.

A consumer linear y = x·Wᵀ whose input x comes from producer linears p (x = f(a·W_pᵀ + b_p))
can receive x·G without any work at run time when f commutes with right-multiplication by G:
f(v)·G = f(v·G). The producers then store W_p' = Gᵀ·W_p and b_p' = b_p·G (their output rows
transformed), the consumer stores W·G as usual, and nothing is applied online.

`find_folds` proves that f commutes, on the graph itself. It follows the tensor from the
producers to the consumers and tracks, at every node, which axes of the value hold the channel
index (row-major, in channel order) and the *granule*: the length of the runs of consecutive
channels that G may mix. f may consist only of:

- reshapes (`view`, `reshape`, `flatten`, `unflatten`) that keep the channel axes together,
  transposes and permutes, dtype/device casts, `contiguous`, multiplication by a Python number,
  dropout that is off;
- slicing, `split`/`chunk`/`unbind`, and `cat` of values with the same layout, along axes that are
  not channel axes (the token axis of joint attention);
- the *value* argument of `scaled_dot_product_attention`: out = P·V per batch index, so G may mix
  channels only inside the last axis (one head): the granule becomes gcd(granule, head_dim).

Every user of every value on the way must be on the way too (or a consumer reading it as its
input), the query and key of attention must not be, and every consumer must see the channels
flat on its last axis. So v_proj -> attention -> out_proj folds with G inside each head, joint
attention (SD3, Flux) folds both value projections into both output projections with one G, and a
linear feeding another through reshapes only folds with any G; anything else keeps its transform
online. Folding changes nothing in exact arithmetic; it moves the rotation off the critical path.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import fx

from .capture import GraphAnalysis

_IDENTITY_METHODS = {"contiguous", "to", "float", "half", "bfloat16", "clone", "detach", "type_as"}
_IDENTITY_FUNCTIONS = {torch.clone}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}
_TRANSPOSES = {"transpose", "permute", "swapaxes"}
_SPLIT_METHODS = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
_SCALAR_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_ATTENTION = torch.nn.functional.scaled_dot_product_attention


@dataclass(frozen=True)
class FoldDecision:
    """One layer's part in a folded transform, by module paths.

    On a consumer, `producers`: the layers whose output rows carry its input's transform; on a
    producer, `consumers`: the layers whose input transform its output rows carry. One of the two
    is set; lowering checks the graph connects them so (`check_folds`).
    """

    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[str]]:
        """The artifact's form: {"producers": [paths]} or {"consumers": [paths]}."""
        return {"producers": list(self.producers)} if self.producers else {"consumers": list(self.consumers)}

    @classmethod
    def from_json(cls, value: Mapping[str, list[str]]) -> FoldDecision:
        return cls(tuple(value.get("producers", ())), tuple(value.get("consumers", ())))


@dataclass(frozen=True)
class FoldGroup:
    """Producers whose outputs reach consumers only through channel-preserving operations.

    producers / consumers: node names of linear sites, in graph order; width: channels C; granule:
    G may only mix channels inside consecutive runs of this many (C when attention is not on the way).
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    width: int
    granule: int

    def decisions(self, path_of: Mapping[str, str]) -> dict[str, FoldDecision]:
        """What each member records of the fold, by node name (`path_of`: node name -> module path)."""
        producers = tuple(path_of[p] for p in self.producers)
        consumers = tuple(path_of[c] for c in self.consumers)
        return {**{c: FoldDecision(producers=producers) for c in self.consumers},
                **{p: FoldDecision(consumers=consumers) for p in self.producers}}


@dataclass(frozen=True)
class PlannedFold:
    """A fold group ready to quantize: absmax: [width] max |x| per channel over every consumer's
    input (what the one shared transform is computed from); decisions: `FoldGroup.decisions`."""

    group: FoldGroup
    absmax: torch.Tensor
    decisions: dict[str, FoldDecision]


def plan_folds(groups: list[FoldGroup], absmax: Mapping[str, torch.Tensor],
               path_of: Mapping[str, str]) -> list[PlannedFold]:
    """The groups all of whose members have statistics (`absmax`: node name -> [width]), planned.

    path_of: node name -> module path, for the decisions.
    """
    return [PlannedFold(group, torch.stack([absmax[c] for c in group.consumers]).amax(dim=0),
                        group.decisions(path_of))
            for group in groups if all(m in absmax for m in group.producers + group.consumers)]


class _NotFoldable(Exception):
    pass


@dataclass(frozen=True)
class _Layout:
    axes: tuple[int, ...]
    granule: int


def _value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = _value(node)
    if not isinstance(v, torch.Tensor):
        raise _NotFoldable(f"{node.name} has no tensor value")
    return tuple(int(s) for s in v.shape)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise _NotFoldable(why)


def _reshaped(layout: _Layout, before: tuple[int, ...], after: tuple[int, ...]) -> _Layout:
    """The channel axes after a row-major reshape: the same flat positions must hold the channels."""
    axes = layout.axes
    _require(list(axes) == list(range(axes[0], axes[-1] + 1)), "reshape of non-adjacent channel axes")
    prefix = math.prod(before[:axes[0]])
    width = math.prod(before[axes[0]:axes[-1] + 1])
    suffix = math.prod(before[axes[-1] + 1:])
    for lo in range(len(after), -1, -1):
        if math.prod(after[:lo]) != prefix:
            continue
        for hi in range(lo, len(after)):
            if math.prod(after[lo:hi + 1]) == width and math.prod(after[hi + 1:]) == suffix:
                return _Layout(tuple(range(lo, hi + 1)), layout.granule)
    raise _NotFoldable("reshape mixes channels with other axes")


def _indexed(layout: _Layout, index: Any, ndim: int) -> _Layout:
    """Layout after basic indexing x[index]; channel axes must be taken whole."""
    items = list(index) if isinstance(index, tuple) else [index]
    _require(all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items),
             "advanced indexing")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    items += [slice(None)] * (ndim - sum(1 for i in items if i is not None))
    mapping, out, src = {}, 0, 0
    for i in items:
        if i is None:
            out += 1
            continue
        if isinstance(i, slice):
            mapping[src] = out
            out += 1
        src += 1
    for a in layout.axes:
        _require(a in mapping, "indexing drops a channel axis")
        i = [x for x in items if x is not None][a]
        _require(i == slice(None), "indexing slices a channel axis")
    return _Layout(tuple(mapping[a] for a in layout.axes), layout.granule)


def _arg(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _tracked_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of `node` whose channels flow into its output."""
    if node.op == "call_function" and node.target is _ATTENTION:
        value = _arg(node, 2, "value")
        return [value] if isinstance(value, fx.Node) else []
    if node.op == "call_function" and node.target is torch.cat:
        return [t for t in _arg(node, 0, "tensors") if isinstance(t, fx.Node)]
    return [a for a in node.args[:1] if isinstance(a, fx.Node)]

def _other_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of `node` read in any other position (attention's query and key, a factor)."""
    if node.op == "call_function" and node.target is _ATTENTION:
        kwargs = dict(node.kwargs)
        kwargs.pop("value", None)
        rest = (list(node.args[:2]) + list(node.args[3:]), kwargs)
    elif node.op == "call_function" and node.target is torch.cat:
        rest = (list(node.args[1:]), {k: v for k, v in node.kwargs.items() if k != "tensors"})
    else:
        rest = (list(node.args[1:]), dict(node.kwargs))
    found: list[fx.Node] = []
    fx.node.map_arg(rest, found.append)
    return found

def _layout(node: fx.Node, layouts: dict[fx.Node, Any]) -> Any:
    """Layout propagation (see the module docstring): the layout of `node`'s value from its tracked inputs' layouts; raises when not foldable."""
    op, target = node.op, node.target
    ins = _tracked_inputs(node)
    if any(a in layouts for a in _other_inputs(node)):
        raise _NotFoldable(f"{node.name} reads a transformed value in a position that mixes channels")
    src = layouts[ins[0]] if ins else None
    if op == "call_method" and target in _IDENTITY_METHODS or op == "call_function" and target in _IDENTITY_FUNCTIONS:
        return src
    if op == "call_function" and target in _SCALAR_FUNCTIONS:
        _require(len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not node.kwargs,
                 "only multiplication by a number commutes")
        return src
    if op == "call_function" and target is torch.nn.functional.dropout:
        _require(_arg(node, 2, "training", True) is False or _arg(node, 1, "p", 0.5) == 0, "dropout is on")
        return src
    if op == "call_method" and target in _RESHAPE_METHODS or op == "call_function" and target in _RESHAPE_FUNCTIONS:
        return _reshaped(src, _shape(ins[0]), _shape(node))
    if op == "call_method" and target in _TRANSPOSES or op == "call_function" and target in (torch.transpose, torch.permute):
        before, ndim = _shape(ins[0]), len(_shape(ins[0]))
        if target in ("transpose", "swapaxes", torch.transpose):
            d0, d1 = (_dim(int(d), ndim) for d in node.args[1:3])
            order = list(range(ndim))
            order[d0], order[d1] = d1, d0
        else:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            order = [_dim(int(d), ndim) for d in dims]
        _require(len(order) == len(before), "permute of the wrong rank")
        return _Layout(tuple(order.index(a) for a in src.axes), src.granule)
    if op == "call_function" and target is operator.getitem:
        if isinstance(src, tuple):
            return src[node.args[1]]
        return _indexed(src, node.args[1], len(_shape(ins[0])))
    if op == "call_method" and target in _SPLIT_METHODS or op == "call_function" and target in _SPLIT_FUNCTIONS:
        ndim = len(_shape(ins[0]))
        dim = _dim(int(_arg(node, 2, "dim", 0) if target not in ("unbind", torch.unbind)
                       else _arg(node, 1, "dim", 0)), ndim)
        _require(dim not in src.axes, "split along a channel axis")
        if target in ("unbind", torch.unbind):
            parts = len(_value(node))
            moved = _Layout(tuple(a - (a > dim) for a in src.axes), src.granule)
            return tuple(moved for _ in range(parts))
        return tuple(src for _ in range(len(_value(node))))
    if op == "call_function" and target is torch.cat:
        tensors = _arg(node, 0, "tensors")
        _require(all(isinstance(t, fx.Node) and t in layouts for t in tensors), "cat with an untransformed value")
        first = layouts[tensors[0]]
        _require(all(layouts[t].axes == first.axes for t in tensors), "cat of different layouts")
        dim = _dim(int(_arg(node, 1, "dim", 0)), len(_shape(node)))
        _require(dim not in first.axes, "cat along a channel axis")
        return _Layout(first.axes, math.gcd(*(layouts[t].granule for t in tensors)))
    if op == "call_function" and target is _ATTENTION:
        shape = _shape(node)
        ndim = len(shape)
        _require(src.axes[-1] == ndim - 1 and ndim - 2 not in src.axes,
                 "attention's value must hold the channels on its last axis, not the token axis")
        return _Layout(src.axes, math.gcd(src.granule, shape[-1]))
    raise _NotFoldable(f"{node.name} ({target}) is not known to commute with a channel transform")


def _region(start: fx.Node, sites: dict[str, Any]):
    """Grow a region from consumer input `start` until closed: (producers, consumers, inner nodes)."""
    producers: set[fx.Node] = set()
    consumers: set[fx.Node] = set()
    inner: set[fx.Node] = set()
    todo_back = [start]
    todo_forward: list[fx.Node] = []
    while todo_back or todo_forward:
        while todo_back:
            n = todo_back.pop()
            if n in producers or n in inner:
                continue
            if n.name in sites:
                producers.add(n)
            else:
                _require(n.op in ("call_function", "call_method"), f"{n.name} is not an operation")
                inner.add(n)
                ins = _tracked_inputs(n)
                _require(bool(ins), f"{n.name} has no input to follow")
                todo_back.extend(ins)
            todo_forward.append(n)
        while todo_forward:
            n = todo_forward.pop()
            for user in n.users:
                if user.name in sites and user.args[0] is n and n not in user.args[1:]:
                    consumers.add(user)
                elif user.name in sites or user.op == "output":
                    raise _NotFoldable(f"{n.name} is used as a weight, a bias or a graph output")
                elif user not in inner:
                    todo_back.append(user)
    return producers, consumers, inner


def find_folds(gm: fx.GraphModule, analysis: GraphAnalysis, candidates: set[str]) -> list[FoldGroup]:
    """The fold groups among the linear sites named in `candidates` (node names).

    A group is returned only when every producer and consumer is a candidate (all of them will be
    quantized by the same pass) and the layout walk proves the path commutes with G.
    """
    sites = {s.node: s for s in analysis.sites}
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    groups: list[FoldGroup] = []
    seen: set[str] = set()
    for site in analysis.sites:
        if site.node not in candidates or site.node in seen:
            continue
        start = by_name[site.node].args[0]
        if not isinstance(start, fx.Node):
            continue
        try:
            producers, consumers, inner = _region(start, sites)
        except _NotFoldable:
            continue
        names = {n.name for n in producers | consumers}
        seen |= {n.name for n in consumers}
        if not producers or not names <= candidates or producers & consumers:
            continue
        widths = {sites[n.name].out_features for n in producers} | {sites[n.name].in_features for n in consumers}
        if len(widths) != 1:
            continue
        (width,) = widths
        layouts: dict[fx.Node, Any] = {}
        try:
            for n in sorted(producers | inner, key=order.__getitem__):
                if n in producers:
                    layouts[n] = _Layout((len(_shape(n)) - 1,), width)
                else:
                    layouts[n] = _layout(n, layouts)
            for c in consumers:
                x = layouts[c.args[0]]
                _require(isinstance(x, _Layout) and x.axes == (len(_shape(c.args[0])) - 1,),
                         "a consumer does not see the channels on its last axis")
        except (_NotFoldable, KeyError, IndexError, TypeError):
            continue
        granule = math.gcd(*(layouts[c.args[0]].granule for c in consumers))
        groups.append(FoldGroup(tuple(sorted((n.name for n in producers), key=lambda m: order[by_name[m]])),
                                tuple(sorted((n.name for n in consumers), key=lambda m: order[by_name[m]])),
                                width, granule))
    return groups


def check_folds(gm: fx.GraphModule, analysis: GraphAnalysis, folds: dict[str, FoldDecision],
                quantize: set[str]) -> None:
    """Refuse to run layers whose folded transforms this graph does not connect the same way.

    folds: {module path: the layer's fold decision} for the layers about to run in `gm`;
    quantize: node names of the sites that run quantized.
    A consumer whose producers run elsewhere (or unquantized) would read untransformed inputs.
    """
    if not folds:
        return
    by_node = {s.node: s.path for s in analysis.sites}
    found = {by_node[n]: decision for group in find_folds(gm, analysis, quantize)
             for n, decision in group.decisions(by_node).items()}
    for path, fold in folds.items():
        if found.get(path) != fold:
            connected = found[path].to_json() if path in found else "a layer with nothing folded"
            raise ValueError(
                f"layer {path} was quantized with its rotation folded across {fold.to_json()}, but in this graph "
                f"it is connected as {connected}; the model's "
                f"code differs from the one quantized. Quantize it again (without 'load'), or pass "
                f"options={{'fold': False}} when quantizing.")
