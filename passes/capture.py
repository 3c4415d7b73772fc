"""Capture: read a Dynamo graph once and describe what later passes work on.

Precondition: `gm` is the FX graph Dynamo hands a backend, with every parameter and buffer of the
user's module lifted to a placeholder (`node.meta["grapharg"]`), and `example_inputs` the matching
live tensors.
Postcondition: a `GraphAnalysis` listing the placeholders (parameter, buffer or input, with the
model-absolute path of each parameter), every `F.linear` whose weight is a parameter (its module path,
role and transformer block), and a networkx view of which linear feeds which. The graph itself
is not changed.

Paths come from tensor identity, not from the frame's source names: after a graph break inside a
submodule Dynamo resumes in a frame whose `self` is that submodule, and its sources read
`L['self']._modules['attn1']...` — relative to the block, the same for every block. The caller
passes `names` ({id(tensor): path} from the user's root module); a source name is used only for
a tensor the root does not hold.
"""

from __future__ import annotations

import math

import re
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from .structure import LINEAR_TARGETS, GraphContext, Structure


# Roles of linear layers, named by the layers of diffusers' DiT, PixArt, SD3 and Flux models.
TOKEN_ROLES = ("attn_q", "attn_k", "attn_v", "attn_out", "cross_q", "cross_k", "cross_v",
               "cross_out", "context_q", "context_k", "context_v", "context_out", "ff_up",
               "ff_down", "single_mlp", "single_out", "token")
KEPT_ROLES = ("conditioning", "adaln", "adaln_token", "embed", "final")

# First match wins; patterns are matched against the module path (e.g. "transformer_blocks.0.attn1.to_q").
_ROLE_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(timestep_embedder|text_embedder|guidance_embedder|caption_projection|class_embedder"
     r"|time_text_embed|time_proj|emb)(\.|$)", "conditioning"),
    (r"(^|\.)(norm1|norm1_context|norm|norm_out|adaln_single)\.linear$", "adaln"),
    # Outside blocks (no numbered segment), at the root or under wrappers.
    (r"^([A-Za-z_]\w*\.)*(x_embedder|context_embedder|pos_embed|proj_in|patch_embed\w*|img_in|txt_in)"
     r"(\.(proj|linear(_\d+)?))?$|^([A-Za-z_]\w*\.)*x_embedders\.\w+$", "embed"),
    (r"^([A-Za-z_]\w*\.)*(proj_out|proj_out_1|proj_out_2|head\.head|final_layer\.linear)$", "final"),
    (r"\.attn2\.to_q$", "cross_q"),
    (r"\.attn2\.to_k$", "cross_k"),
    (r"\.attn2\.to_v$", "cross_v"),
    (r"\.attn2\.to_out\.0$", "cross_out"),
    (r"\.attn1?\.to_q$", "attn_q"),
    (r"\.attn1?\.to_k$", "attn_k"),
    (r"\.attn1?\.to_v$", "attn_v"),
    (r"\.attn1?\.to_out\.0$", "attn_out"),
    (r"\.attn\.add_q_proj$", "context_q"),
    (r"\.attn\.add_k_proj$", "context_k"),
    (r"\.attn\.add_v_proj$", "context_v"),
    (r"\.attn\.to_add_out$", "context_out"),
    (r"\.ff(_context)?\.net\.0\.proj$", "ff_up"),
    (r"\.ff(_context)?\.net\.2$", "ff_down"),
    (r"single_transformer_blocks\.\d+\.proj_mlp$", "single_mlp"),
    (r"single_transformer_blocks\.\d+\.proj_out$", "single_out"),
)

BLOCK_PATTERN = re.compile(r"^((?:.*?\.)?(?:[A-Za-z_]*blocks|layers)\.\d+)(\.|$)")
_SOURCE_KEY = re.compile(r"\['([^']*)'\]|\.(\w+)")
_ROOT = re.compile(r"^[LG]\['[^']*'\]")
_INPUT_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}


def dotted_path(source_name: str) -> str:
    """The module path a Dynamo source or module-stack entry names, without its root local.

    "L['self'].__dict__['_modules']['blocks'].0.attn" -> "blocks.0.attn". The root is whichever
    frame local holds the module (`L['self']` for a model's forward, `L['fn']` when Dynamo
    enters through a wrapper).
    """
    root = _ROOT.match(source_name)
    rest = source_name[root.end():] if root else source_name
    return ".".join(k for k in (a or b for a, b in _SOURCE_KEY.findall(rest)) if k not in _CONTAINERS)


def source_path(source_name: str) -> str | None:
    """Dotted path of a lifted parameter or buffer, from its Dynamo source name.

    "L['self'].__dict__['_modules']['blocks']._modules['0']._parameters['weight']" -> "blocks.0.weight".
    Returns None for sources that are not parameters or buffers of a module (the call's inputs).
    """
    if _ROOT.match(source_name) is None or not re.search(r"\b_(parameters|buffers)\b", source_name):
        return None
    return dotted_path(source_name)


def input_name(source_name: str) -> str:
    """The argument a graph input was read from, from its Dynamo source name.

    "L['hidden_states']" -> "hidden_states"; "L['kwargs']['hidden_states']" -> "hidden_states"
    (a wrapper's **kwargs); "L['args'][0]" -> "args.0".
    """
    rest = source_name[1:] if _ROOT.match(source_name) else source_name
    keys = ["".join(k) for k in _INPUT_KEY.findall(rest)]
    if len(keys) > 1 and keys[0] == "kwargs":
        keys = keys[1:]
    return ".".join(keys)


def name_hint(path: str) -> str | None:
    """The role the module path suggests (first matching name rule), or None."""
    return next((role for pattern, role in _ROLE_RULES if re.search(pattern, path)), None)


def _role(structural: str | None, path: str) -> str:
    """Kept if the structure or the name says so (keeping costs speed, never quality); the name
    labels token GEMMs."""
    return structural or name_hint(path) or "token"


@dataclass
class Placeholder:
    """One input of the captured graph. kind: "parameter", "buffer" or "input".

    source: what the user knows it by: the argument name for the call's inputs ("hidden_states"),
    the module path for parameters and buffers.
    """

    name: str
    index: int
    kind: str
    path: str | None
    source: str = ""


@dataclass
class LinearSite:
    """One `F.linear(x, weight, bias)` whose weight is a parameter of the user's module.

    path: module path ("transformer_blocks.0.attn1.to_q"); weight_index / bias_index: positions
    in the graph's inputs; block: ordinal of the transformer block in graph order (None outside
    blocks); block_name: "transformer_blocks.0".
    """

    node: str
    path: str
    weight_index: int
    bias_index: int | None
    in_features: int
    out_features: int
    input_rank: int
    role: str
    block: int | None
    block_name: str | None


@dataclass
class GraphAnalysis:
    """What capture found in one graph; later passes read this rather than re-walking the graph."""

    placeholders: list[Placeholder]
    sites: list[LinearSite]
    blocks: list[str]
    dataflow: nx.DiGraph = field(repr=False)
    model_inputs: frozenset[str] = frozenset()  # placeholders the user passed to the compiled module
    returns: bool = False  # the graph ends at the compiled module's return
    batch: int | None = None  # the model call's batch size, when known
    # The dataflow facts the roles came from; a rebinding of the same graph reuses them.
    structure: Structure | None = field(default=None, repr=False, compare=False)

    @property
    def input_indices(self) -> list[int]:
        """Positions of the graph inputs that are not parameters or buffers."""
        return [p.index for p in self.placeholders if p.kind == "input"]

    def site(self, node: str) -> LinearSite:
        return next(s for s in self.sites if s.node == node)


def module_names(module: torch.nn.Module) -> dict[int, str]:
    """{id(tensor): dotted path} of every parameter and buffer of `module` (first name of a tied one)."""
    names: dict[int, str] = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        names.setdefault(id(t), name)
    return names


def _placeholders(gm: fx.GraphModule, example_inputs: list, names: dict[int, str]) -> list[Placeholder]:
    found = []
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else ""
        example = example_inputs[index] if index < len(example_inputs) else None
        path = names.get(id(example), source_path(source)) if isinstance(example, torch.Tensor) else None
        if isinstance(example, torch.nn.Parameter) and path is not None:
            kind = "parameter"
        elif path is not None and (id(example) in names or "_buffers" in source):
            kind = "buffer"
        else:
            kind, path = "input", None
        found.append(Placeholder(node.name, index, kind, path, path or input_name(source) or node.name))
    return found


def _input_rank(node: fx.Node) -> int:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _dataflow(gm: fx.GraphModule, site_nodes: dict[str, LinearSite]) -> nx.DiGraph:
    """Edge a -> b when linear b's input depends on linear a's output through no other linear."""
    graph = nx.DiGraph()
    graph.add_nodes_from(site_nodes)
    feeding: dict[fx.Node, frozenset[str]] = {}
    for node in gm.graph.nodes:
        producers: set[str] = set()
        for arg in node.all_input_nodes:
            producers |= {arg.name} if arg.name in site_nodes else feeding.get(arg, frozenset())
        feeding[node] = frozenset(producers)
        if node.name in site_nodes:
            graph.add_edges_from((p, node.name) for p in feeding.get(node.args[0], frozenset()))
    return graph


def capture(gm: fx.GraphModule, example_inputs: list, names: dict[int, str] | None = None,
            context: GraphContext | None = None) -> GraphAnalysis:
    """Describe `gm` (see the module docstring). Pure: `gm` is not modified.

    names: {id(tensor): path} of the user's root module (`module_names`); without it, paths are
    read from the sources, which is right only when Dynamo traced the root's own forward.
    context: which inputs the user passed and whether the graph returns the model's output (see
    passes/structure.py); without it, embeddings and final projections are known by name only.
    """
    context = context or GraphContext()
    placeholders = _placeholders(gm, example_inputs, names or {})
    model_inputs = frozenset(p.name for p in placeholders if p.kind == "input"
                             and id(example_inputs[p.index]) in context.model_inputs)
    return _analyse(gm, placeholders, example_inputs, model_inputs, context.returns, context.batch,
                    _has_blocks(names or {}))


def _has_blocks(names: dict[int, str]) -> bool:
    """The model has transformer blocks: a graph holding none (the embeddings before a graph
    break) still lies outside them."""
    return any(BLOCK_PATTERN.match(path) for path in names.values())


def rebind(gm: fx.GraphModule, analysis: GraphAnalysis, tensors: list, names: dict[int, str]) -> GraphAnalysis:
    """The analysis of `gm` called with other parameters and buffers (`tensors`, in graph input order).

    Dynamo passes parameters as graph inputs and guards on shapes, not on identity, so one graph
    traced in block 0's frame also runs block 1 with block 1's parameters. Each binding is a
    different set of layers: the paths are read again, by identity, from `names`. Dynamo's
    source metadata is gone by now, which identity does not need. The structural analysis is the
    graph's, not the binding's (the same nodes, and inputs of the shapes Dynamo guarded), so it is
    reused.
    """
    placeholders = [p if p.kind == "input" else Placeholder(p.name, p.index, p.kind, path, path)
                    for p in analysis.placeholders
                    for path in [names.get(id(tensors[p.index]), p.path)]]
    return _analyse(gm, placeholders, tensors, analysis.model_inputs, analysis.returns, analysis.batch,
                    _has_blocks(names), analysis.structure)


def _structure(gm: fx.GraphModule, placeholders: list[Placeholder], tensors: list,
               model_inputs: frozenset[str], returns: bool, batch: int | None) -> Structure:
    """Batch size: the model call's, else the smallest leading dimension among the graph's tensor
    inputs (a timestep is [B]); token streams: inputs with more rows than that, or with more than
    one row per sample ([B, T, C] with T > 1), which an empty call (B = 0) still shows."""
    inputs = [(p.name, tensors[p.index]) for p in placeholders if p.kind == "input"
              and isinstance(tensors[p.index], torch.Tensor) and tensors[p.index].dim() >= 1]
    if batch is None:
        batch = min((t.shape[0] for _, t in inputs), default=None)
    tokens = {name for name, t in inputs if t.dim() >= 2 and (
        (batch and t.numel() // max(t.shape[-1], 1) > batch) or math.prod(t.shape[1:-1]) > 1)}
    return Structure(gm, {p.name for p in placeholders if p.kind != "input"}, tokens, batch,
                     returns, set(model_inputs))


def _analyse(gm: fx.GraphModule, placeholders: list[Placeholder], example_inputs: list,
             model_inputs: frozenset[str], returns: bool, batch: int | None,
             model_has_blocks: bool, structure: Structure | None = None) -> GraphAnalysis:
    by_name = {p.name: p for p in placeholders}
    found: list[tuple[fx.Node, Placeholder, Placeholder | None, str, str | None]] = []
    blocks: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
        x, weight, bias = args[:3]
        w_ph = by_name.get(getattr(weight, "name", None))
        if w_ph is None or w_ph.kind != "parameter":
            continue
        b_ph = by_name.get(getattr(bias, "name", None)) if bias is not None else None
        if bias is not None and (b_ph is None or b_ph.kind != "parameter"):
            continue
        path = w_ph.path.rpartition(".")[0]
        match = BLOCK_PATTERN.match(path)
        block_name = match.group(1) if match else None
        if block_name is not None and block_name not in blocks:
            blocks.append(block_name)
        found.append((node, w_ph, b_ph, path, block_name))
    structure = structure or _structure(gm, placeholders, example_inputs, model_inputs, returns, batch)
    sites: list[LinearSite] = []
    for node, w_ph, b_ph, path, block_name in found:
        out_features, in_features = example_inputs[w_ph.index].shape
        structural = structure.role(node, outside_blocks=(bool(blocks) or model_has_blocks) and block_name is None)
        sites.append(LinearSite(
            node=node.name, path=path, weight_index=w_ph.index,
            bias_index=b_ph.index if b_ph is not None else None,
            in_features=int(in_features), out_features=int(out_features), input_rank=_input_rank(node.args[0]),
            role=_role(structural, path), block=blocks.index(block_name) if block_name else None,
            block_name=block_name))
    dataflow = _dataflow(gm, {s.node: s for s in sites})
    return GraphAnalysis(placeholders, sites, blocks, dataflow, model_inputs, returns, structure.batch, structure)
