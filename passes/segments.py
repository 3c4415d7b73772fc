"""Segments: a captured graph cut at transformer-block boundaries, runnable piece by piece.

Cross-block calibration (CBC) runs block b on what blocks 0..b-1 produce *after* they were
quantized, and cross-layer parameter search (CLPS) re-runs only the part of the graph between a
layer and its target. Both need to execute a slice of the graph's nodes from a saved
environment (node -> value) rather than the whole graph from its inputs; this module provides
that, with the linear layers computed by a caller-supplied function.

Segment s runs from the first node of block s to the node before block s+1 starts (the first
segment also holds everything before block 0, the last one everything after the last block).
A node belongs to a block when the block's module is on its `nn_module_stack`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx

from .capture import BLOCK_PATTERN, GraphAnalysis, LinearSite, dotted_path

# linear(site, x, weight, bias) -> output; decides per layer whether it runs quantized.
LinearFn = Callable[[LinearSite, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

# Calls that open and close a region of interpreter state. A torch.vmap level (Dynamo inlines
# vmap, e.g. in flex attention's block masks, as level increments around batch-dim adds and
# removes): values made inside are bound to the level, so a partial re-run takes the region
# whole. Autocast: ops inside compute under its dtype, so a re-run of any of them also runs the
# region's enter and exit calls.
VMAP = ("_vmap_increment_nesting", "_vmap_decrement_nesting")
AUTOCAST = ("_enter_autocast", "_exit_autocast")


def state_regions(nodes: list[fx.Node]) -> list[tuple[int, int, bool]]:
    """[(enter, exit, whole)]: node indices of every state region's two calls (nested ones too);
    whole: a vmap level, which a re-run must take whole."""
    regions, open_ = [], []
    for i, node in enumerate(nodes):
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name in (VMAP[0], AUTOCAST[0]):
            open_.append((i, name == VMAP[0]))
        elif name in (VMAP[1], AUTOCAST[1]) and open_:
            enter, whole = open_.pop()
            regions.append((enter, i, whole))
    return regions


def fp_linear(site: LinearSite, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


class SegmentedGraph:
    """The nodes of `gm` in order, cut into segments at block ends (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, analysis: GraphAnalysis):
        self.gm = gm
        self.analysis = analysis
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._by_name = {n.name: n for n in self.nodes}
        self.sites = {s.node: s for s in analysis.sites}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.state_nodes = {self.placeholders[p.index] for p in analysis.placeholders if p.kind != "input"}
        first: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                continue
            for entry, _ in (node.meta.get("nn_module_stack") or {}).values():
                match = BLOCK_PATTERN.match(dotted_path(entry))
                if match:
                    first.setdefault(match.group(1), i)
        # Cut right before each block starts: a block's module may be called again later
        # (DiT's final layer reuses block 0's timestep embedder), so "last node" is not an end.
        starts = sorted(i for b, i in first.items() if b in analysis.blocks)[1:]
        self.bounds: list[tuple[int, int]] = []
        lo = 0
        for hi in starts + [len(self.nodes)]:
            self.bounds.append((lo, hi))
            lo = hi
        self.regions = state_regions(self.nodes)
        # Each node's last reader, so environments can drop what no later node needs.
        self.last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                self.last_use[arg] = i

    def __len__(self) -> int:
        return len(self.bounds)

    def segment_sites(self, s: int) -> list[LinearSite]:
        """The linear sites of segment s, in graph order."""
        lo, hi = self.bounds[s]
        return [self.sites[n.name] for n in self.nodes[lo:hi] if n.name in self.sites]

    def start_env(self, args: list) -> dict[fx.Node, Any]:
        """The environment before segment 0: the graph's inputs."""
        return dict(zip(self.placeholders, args))

    def run(self, nodes: Iterable[fx.Node], env: dict[fx.Node, Any], linear: LinearFn,
            local: dict[fx.Node, Any] | None = None, device: torch.device | None = None) -> dict[fx.Node, Any]:
        """Execute `nodes` (in graph order) reading inputs from `local`, then `env`.

        device: where the nodes run; tensors of `env` kept elsewhere (offloaded to CPU) are
        copied there as they are read. Returns `local` with every executed node's value; `env`
        is not modified.
        """
        local = {} if local is None else local

        def value(a):
            if a in local:
                return local[a]
            v = env[a]
            if device is not None and isinstance(v, torch.Tensor) and v.device != device:
                v = local[a] = v.to(device)
            return v

        for node in nodes:
            if node.op == "placeholder":
                continue
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            site = self.sites.get(node.name)
            if site is not None:
                full = list(args) + [kwargs.get("bias")] * (3 - len(args))
                local[node] = linear(site, *full[:3])
            elif node.op == "call_function":
                local[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                local[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                local[node] = getattr(self.gm, node.target)
            elif node.op == "call_module":
                local[node] = self.gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "output":
                local[node] = args[0]
        return local

    def advance(self, s: int, env: dict[fx.Node, Any], linear: LinearFn,
                device: torch.device | None = None) -> dict[fx.Node, Any]:
        """Run segment s from `env` and return the environment after it, pruned to live values.

        device: `env` is offloaded; the segment runs on `device` and the returned activations go
        back to CPU memory (graph inputs that are parameters or buffers stay where they are).
        """
        lo, hi = self.bounds[s]
        merged = dict(env)
        merged.update(self.run(self.nodes[lo:hi], env, linear, device=device))
        live = {n: v for n, v in merged.items() if self.last_use.get(n, -1) >= hi or n.op == "output"}
        if device is not None:
            live = {n: v.to("cpu") if isinstance(v, torch.Tensor) and n not in self.state_nodes else v
                    for n, v in live.items()}
        return live

    def output(self, env: dict[fx.Node, Any]) -> Any:
        """The graph's output from the environment after the last segment."""
        return env[self.nodes[-1]]

    def node(self, name: str) -> fx.Node:
        return self._by_name[name]

    def descendants(self, name: str, hi: int) -> list[fx.Node]:
        """Node `name` and the nodes before index `hi` that depend on it, in graph order; a state
        region (`state_regions`) that any of them lies in is included whole."""
        start = self._by_name[name]
        seen = {start}
        for node in self.nodes[self.index[start] + 1:hi]:
            if any(a in seen for a in node.all_input_nodes):
                seen.add(node)
        return self._whole_regions(seen, self.index[start], hi)

    def cone(self, source: str, target: str) -> list[fx.Node]:
        """Nodes on a path from `source` to `target` (both included), in graph order; state regions
        whole, as in `descendants`."""
        tgt = self._by_name[target]
        down = self.descendants(source, self.index[tgt] + 1)
        on_path = {tgt}
        for node in reversed(down):
            if node in on_path:
                on_path.update(node.all_input_nodes)
        return self._whole_regions(on_path.intersection(down), self.index[self._by_name[source]],
                                   self.index[tgt] + 1)

    def _whole_regions(self, chosen: set[fx.Node], lo: int, hi: int) -> list[fx.Node]:
        """`chosen` with the state regions (`state_regions`) it runs in, in graph order: every node
        of a vmap level, the enter and exit calls of an autocast region. A level may run on past
        `hi` (its nodes read only values from before it or made inside it); one that began before
        `lo` cannot be re-run from an environment at `lo`, which is said as such.
        """
        indices = {self.index[n] for n in chosen}
        grown = True
        while grown:
            grown = False
            for enter, exit_, whole in self.regions:
                if not any(enter < i < exit_ for i in indices):
                    continue
                needed = set(range(enter, exit_ + 1)) if whole else {enter, exit_}
                if whole and enter < lo:
                    raise NotImplementedError(
                        f"a re-run from node {self.nodes[lo].name} would start inside the vmap level "
                        f"{self.nodes[enter].name}..{self.nodes[exit_].name}")
                if not needed <= indices:
                    indices |= needed
                    grown = True
        return [self.nodes[i] for i in sorted(indices)]
