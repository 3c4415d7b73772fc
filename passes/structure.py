"""Structural roles: what a linear layer does, read from the graph rather than from its name.

A layer's path depends on how the user wrapped the model and on which frame Dynamo traced, so the
kept roles (conditioning, modulation, embedding, final projection) are decided from dataflow:

- modulation ("adaln"; "adaln_token" where its rows are more than the batch, as with per-token
  timesteps): the output is split (chunk / split / unbind, after reshapes and adds of a
  parameter, e.g. PixArt's `scale_shift_table + t`) into pieces, at least one of which scales or
  shifts another tensor at least as large that does not come from this layer (shift / scale /
  gate). A fused q/k/v or gated-MLP projection splits too, but its pieces meet attention, a
  normalization or each other, never an independent stream.
- conditioning: the rows are the batch only (M = B), or the input does not depend on any token
  stream among the graph's inputs (a timestep, a pooled text vector, a learned per-token
  modulation table as in Chroma's approximator).
- embed: the input reads a token stream among the model inputs (a tensor the user passed to the
  compiled module) through no linear, convolution or attention: the patch / context embedding.
  Masks, indicators and indexes the user passed carry no tokens: a final projection reading its
  rows back at given positions is not an embedding. The next layer of an embedding MLP (two
  linears around an activation) is an embedding too: it reads that layer alone, which feeds
  nothing else.
- final: the output reaches the model's return value through no other linear (only when the graph
  ends at the compiled module's own return). Asked before embed: the residual stream it reads may
  hold a model input as given.

Token streams are followed through in-place writes too: a packed sequence built as a zero buffer
with the text and image tokens written into it at index positions carries both.

Anything else is a token GEMM; names only label it (attn_q, ff_up, ...).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

# What a linear layer is in a Dynamo graph: F.linear, as Dynamo records it or as written.
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)

# Ops a value passes through unchanged in what it means: reshapes, casts, broadcasting.
_SHAPE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "unflatten", "flatten", "to", "float",
                  "contiguous", "expand", "transpose", "permute", "type_as", "clone", "type"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.transpose,
                    torch.permute, torch.clone}
_SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
_ARITHMETIC = {operator.add, operator.mul, operator.sub, operator.iadd, operator.imul, torch.add,
               torch.mul, torch.sub, torch.addcmul, "add", "mul", "sub", "addcmul", "add_", "mul_"}
# Stop a walk back from a linear's input: these mix what they read into something new.
_BARRIERS = {torch.conv1d, torch.conv2d, torch.conv3d, torch._C._nn.scaled_dot_product_attention,
             torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.conv2d,
             torch.nn.functional.conv3d, torch.nn.functional.conv1d, torch.matmul, torch.bmm,
             torch.einsum, operator.matmul}


# In-place writes into their first argument, with the written value's position.
_WRITES_FUNCTIONS = {operator.setitem: 2}
_WRITES_METHODS = {"index_put_": 2}


def _written(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(buffer, value) of an in-place write `node` into a tensor, else None."""
    position = (_WRITES_FUNCTIONS.get(node.target) if node.op == "call_function"
                else _WRITES_METHODS.get(node.target) if node.op == "call_method" else None)
    if position is None or len(node.args) <= position:
        return None
    target, value = node.args[0], node.args[position]
    return (target, value) if isinstance(target, fx.Node) and isinstance(value, fx.Node) else None


@dataclass(frozen=True)
class GraphContext:
    """What the backend knows about a graph beyond the graph itself.

    model_inputs: ids of the tensors the user passed to the compiled module in the traced call
        (empty when unknown); returns: the graph ends at the compiled module's own return;
    batch: the batch size of that call (the smallest leading dimension of its tensors: a
        timestep is [B]), None when unknown. A graph traced inside a block after a graph break
        may hold only [tokens, C] inputs (routed MoE experts), where its own inputs cannot tell.
    """

    model_inputs: frozenset[int] = field(default_factory=frozenset)
    returns: bool = False
    batch: int | None = None


def _hint(size) -> int | None:
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    return int(hint) if hint is not None else None


def _value(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _numel(node) -> int | None:
    value = _value(node)
    if value is None:
        return None
    n = 1
    for size in value.shape:
        size = _hint(size)
        if size is None:
            return None
        n *= size
    return n


def _is_size(node: fx.Node) -> bool:
    """The node computes sizes (a SymInt, an int, a shape), which carry no token values."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(value, (int, torch.SymInt, torch.Size)) or (
        isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, (int, torch.SymInt)) for v in value))


def rows(node) -> int | None:
    """M of a linear input [..., K]: the product of its leading dimensions."""
    value = _value(node)
    numel, width = _numel(node), _hint(value.shape[-1]) if value is not None and value.dim() else None
    return numel // width if numel is not None and width else None


# Ops whose tensor arguments after the first give only a dtype, device or shape (`x.type_as(y)`),
# and ops that read nothing but a dtype and shape from any argument (`torch.zeros_like(x)`).
_LIKE_METHODS = {"type_as", "to", "expand_as", "view_as", "reshape_as"}
_NO_VALUE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.randn_like,
             torch.rand_like, "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values flow into `node`'s value (not those read for a dtype or shape)."""
    if node.target in _NO_VALUE:
        return []
    if node.op == "call_method" and node.target in _LIKE_METHODS and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


def _is(node: fx.Node, methods: set, functions: set) -> bool:
    return (node.op == "call_method" and node.target in methods) or \
        (node.op == "call_function" and node.target in functions)


def _passes_through(node: fx.Node, source: fx.Node, constant) -> bool:
    """`node` carries `source` on: a reshape or cast, or an add / multiply with a constant or a
    parameter (`constant(arg)` says which)."""
    if _is(node, _SHAPE_METHODS, _SHAPE_FUNCTIONS):
        return bool(node.args) and node.args[0] is source
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is source:
        return not isinstance(node.args[1], int)  # slicing / indexing for broadcast, not a split piece
    if (node.target in _ARITHMETIC) and node.op in ("call_function", "call_method"):
        others = [a for a in node.args if a is not source]
        return len(others) == len(node.args) - 1 and all(constant(a) for a in others)
    return False


class Structure:
    """Dataflow facts about one graph, computed once, queried per linear site."""

    def __init__(self, gm: fx.GraphModule, parameter_nodes: set[str], token_inputs: set[str],
                 batch: int | None, returns: bool, model_input_nodes: set[str]):
        self.nodes = list(gm.graph.nodes)
        self.batch = batch
        self.returns = returns
        self.model_inputs = model_input_nodes
        # Token-derived: depends on a token-stream input through tensor values (sizes do not count).
        # Constant: computed from parameters, buffers and literals only.
        self.token_derived: set[fx.Node] = set()
        self.constants: set[fx.Node] = set()
        self._embeddings: set[fx.Node] = set()  # linears role() found to be embeddings so far
        for node in self.nodes:
            inputs = value_inputs(node)
            if node.name in token_inputs or (
                    not _is_size(node) and any(a in self.token_derived for a in inputs)):
                self.token_derived.add(node)
            if node.op == "get_attr" or node.name in parameter_nodes or (
                    node.op in ("call_function", "call_method") and all(a in self.constants for a in inputs)):
                self.constants.add(node)
            written = _written(node)
            if written is not None:
                # An in-place write (`buffer[index] = value`) gives the buffer the value's meaning
                # for every later reader: a packed sequence made by `new_zeros` and index writes.
                target, value = written
                if value in self.token_derived:
                    self.token_derived.add(target)
                if not self._constant(value):
                    self.constants.discard(target)

    def _constant(self, arg) -> bool:
        return not isinstance(arg, fx.Node) or arg in self.constants

    def _descendants(self, node: fx.Node) -> set[fx.Node]:
        seen, todo = set(), [node]
        while todo:
            for user in todo.pop().users:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        return seen

    def _forward(self, node: fx.Node) -> list[fx.Node]:
        """The first nodes after `node` that are not reshapes, casts or constant arithmetic."""
        found, todo, seen = [], [node], set()
        while todo:
            current = todo.pop()
            for user in current.users:
                if user in seen:
                    continue
                seen.add(user)
                (todo if _passes_through(user, current, self._constant) else found).append(user)
        return found

    def is_modulation(self, linear: fx.Node) -> bool:
        """The output is split into pieces, one of which scales or shifts an independent tensor."""
        splits = [n for n in self._forward(linear) if _is(n, _SPLIT_METHODS, _SPLIT_FUNCTIONS)]
        if not splits:
            return False
        mine = self._descendants(linear)
        for piece in (u for split in splits for u in split.users
                      if u.op == "call_function" and u.target is operator.getitem):
            size = _numel(piece)
            for use in self._forward(piece):
                if use.target not in _ARITHMETIC or use.op not in ("call_function", "call_method"):
                    continue
                if any(isinstance(other, fx.Node) and other not in mine and not self._constant(other)
                       and size is not None and (_numel(other) or 0) >= size for other in use.args):
                    return True
        return False

    def _upstream(self, node: fx.Node) -> tuple[bool, set[fx.Node], bool]:
        """Walking back from `node` through token values: (a model input is reached through no
        linear, convolution or attention; the linears where the walk stopped; it met a
        convolution or attention)."""
        todo, seen, linears, barrier = [node], set(), set(), False
        while todo:
            current = todo.pop()
            if current.name in self.model_inputs:
                return True, linears, barrier
            if current in seen or current.op not in ("call_function", "call_method", "placeholder"):
                continue
            seen.add(current)
            if current is not node and current.target in LINEAR_TARGETS:
                linears.add(current)
                continue
            if current is not node and current.target in _BARRIERS:
                barrier = True
                continue
            # Masks, indicators and indexes read from the inputs carry no token values.
            todo.extend(a for a in value_inputs(current) if a in self.token_derived)
        return False, linears, barrier

    def _downstream(self, linear: fx.Node) -> set[fx.Node]:
        """The linears and the output node that `linear`'s output reaches through no other linear."""
        todo, seen, found = [linear], set(), set()
        while todo:
            for user in todo.pop().users:
                if user.op == "output" or user.target in LINEAR_TARGETS:
                    found.add(user)
                elif user not in seen:
                    seen.add(user)
                    todo.append(user)
        return found

    def is_embedding(self, linear: fx.Node) -> bool:
        """`linear` reads a model input through no linear, convolution or attention, or it is the
        next layer of an embedding MLP: it reads one embedding layer only, which feeds nothing
        else (a refiner reading the patch embedding shares it with its residual and q/k/v)."""
        reads, linears, barrier = self._upstream(linear.args[0])
        if reads:
            return True
        first = next(iter(linears)) if len(linears) == 1 and not barrier else None
        return first in self._embeddings and self._downstream(first) == {linear}

    def role(self, linear: fx.Node, outside_blocks: bool) -> str | None:
        """The kept role of `linear` ("adaln", "adaln_token", "conditioning", "embed", "final"), or None for a
        token GEMM. Embedding and final projection are recognized only outside the transformer
        blocks of a model that has some: a small model's first and last layers are token GEMMs.
        Ask in graph order: an embedding MLP's later layers are known by its earlier ones."""
        x = linear.args[0]
        m = rows(x)
        if self.is_modulation(linear):
            # Per-token timesteps give a modulation one row per token (M = B * T), not per image.
            return "adaln_token" if m is not None and self.batch is not None and m > self.batch else "adaln"
        # An empty call (batch 0) gives every linear 0 rows: its row counts tell nothing.
        if (m is not None and m > 0 and m == self.batch) or x not in self.token_derived:
            return "conditioning"
        # The final projection first: the residual stream it reads may hold a model input as given
        # (text tokens joining the stream with no projection).
        if outside_blocks and self.returns and any(n.op == "output" for n in self._downstream(linear)):
            return "final"
        if outside_blocks and self.model_inputs and self.is_embedding(linear):
            self._embeddings.add(linear)
            return "embed"
        return None

