"""Observers: run a captured graph on recorded calibration calls and watch its linear layers.

A `GraphCalibration` pairs one captured graph with the calls recorded for it while the user ran
`calibrating()`. `observe` replays those calls in full precision and hands every watched linear's
input and output to a callback; the recipes build their statistics on it, and `layer_errors`
measures each quantized layer's relative output error on exactly the data it was calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import fx
from tqdm.auto import tqdm


from .capture import GraphAnalysis, LinearSite
from .layer import QuantizedLinear

# callback(site, x [..., in_features], weight, bias, y [..., out_features])
LinearCallback = Callable[[LinearSite, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]


@dataclass
class GraphCalibration:
    """A captured graph, the live parameters/buffers it reads, and its recorded calls.

    state: {graph input position: parameter or buffer}; calls: one list per call, holding the
    non-state inputs in the order of `analysis.input_indices`.
    """

    gm: fx.GraphModule
    analysis: GraphAnalysis
    state: dict[int, torch.Tensor]
    calls: list[list] = field(default_factory=list)

    def arguments(self, home: bool = True) -> Iterator[list]:
        """Full positional arguments of the graph, one list per recorded call.

        home: inputs recorded to CPU memory (`Offloaded`) go back to the device they came from;
        False leaves them in CPU memory, for callers that move them as they use them.
        """
        positions = self.analysis.input_indices
        for call in self.calls:
            args = [None] * (len(self.state) + len(positions))
            for i, t in self.state.items():
                args[i] = t
            for i, value in zip(positions, call):
                if isinstance(value, Offloaded):
                    value = value.tensor.to(value.device) if home else value.tensor
                args[i] = value
            yield args

    def timestep_position(self) -> int | None:
        """The position of the graph input the user passed as `timestep` among a recorded call's
        values, or None when the graph has none."""
        positions = self.analysis.input_indices
        return next((positions.index(p.index) for p in self.analysis.placeholders
                     if p.kind == "input" and p.source == "timestep" and p.index in positions), None)

    def timesteps(self) -> list[torch.Tensor] | None:
        """Each recorded call's timestep per sample (float64 [B], or [1] for one timestep for all),
        in CPU memory; None when the graph has no `timestep` input or a call passed no tensor."""
        index = self.timestep_position()
        if index is None:
            return None
        out = []
        for call in self.calls:
            t = call[index]
            t = t.tensor if isinstance(t, Offloaded) else t
            if not isinstance(t, torch.Tensor):
                return None
            out.append(t.detach().double().reshape(-1).cpu())
        return out


@dataclass(frozen=True)
class Offloaded:
    """A recorded input kept in CPU memory (option `offload`), and the device it came from."""

    tensor: torch.Tensor
    device: torch.device


class NonFiniteActivation(FloatingPointError):
    """A linear layer's input holds NaN or Inf on a recorded call. path: the layer; call: from 0."""

    def __init__(self, path: str, call: int, nan: int, inf: int, total: int):
        self.path, self.call = path, call
        super().__init__(
            f"the input of layer {path} is not finite on recorded calibration call {call} (counting "
            f"from 0): {nan} NaN and {inf} Inf of {total} values, and no quantization scale can be "
            f"computed from them. The model produces them before this layer (in float16, values "
            f"above 65504 overflow to Inf): run it in bfloat16 or float32, or calibrate on inputs "
            f"it handles.")


def check_finite_input(site: LinearSite, x: torch.Tensor, call: int) -> None:
    """Raise NonFiniteActivation when x, the input of `site` on recorded call `call`, holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteActivation(site.path, call, int(torch.isnan(x).sum()), int(torch.isinf(x).sum()),
                                  x.numel())


class _Watcher(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sites: dict[str, LinearSite], callback: LinearCallback):
        super().__init__(gm)
        self.sites, self.callback = sites, callback
        self.call = 0

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        site = self.sites.get(n.name)
        if site is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = list(args) + [kwargs.get("bias")] * (3 - len(args))
            check_finite_input(site, args[0], self.call)
            self.callback(site, args[0], args[1], args[2], out)
        return out


@dataclass
class ReplayPosition:
    """Where `observe` is: `graph`, the position in its calibrations, and `call`, among their calls."""

    graph: int = 0
    call: int = 0


def observe(calibrations: list[GraphCalibration], paths: set[str], callback: LinearCallback,
            desc: str = "observing", position: ReplayPosition | None = None) -> None:
    """Replay every recorded call in full precision, calling `callback` at each linear in `paths`
    (and keeping `position` at the graph and call being replayed).

    Raises NonFiniteActivation, naming the layer and the call, at the first watched layer whose
    input holds NaN or Inf.
    """
    total = sum(len(c.calls) for c in calibrations)
    with torch.no_grad(), tqdm(total=total, desc=desc, leave=False, disable=total < 2) as bar:
        for g, cal in enumerate(calibrations):
            sites = {s.node: s for s in cal.analysis.sites if s.path in paths}
            watcher = _Watcher(cal.gm, sites, callback)
            for call, args in enumerate(cal.arguments()):
                watcher.call = call
                if position is not None:
                    position.graph, position.call = g, call
                watcher.run(*args)
                bar.update()


class RelativeError:
    """Accumulates ||Y - Ŷ||² and ||Y||² per key over many tensors; `result()` gives ||Y - Ŷ|| / ||Y||.

    norm "l1": sums of absolute values instead, and `result()` gives ||Y - Ŷ||₁ / ||Y||₁. Each
    tensor's sum is taken in float32 (values below ~1e-19 square to zero), the running totals in
    Python floats.
    """

    def __init__(self, norm: str = "l2"):
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1'; got {norm!r}")
        self.norm = norm
        self.err: dict = {}
        self.ref: dict = {}

    def add(self, key, reference: torch.Tensor, estimate: torch.Tensor,
            weights: torch.Tensor | None = None) -> None:
        """Add a tensor pair; `weights` [d0] weigh the rows of their first dimension (None: all 1)."""
        y = reference.float()
        size = torch.Tensor.abs if self.norm == "l1" else torch.Tensor.square
        err, ref = size(estimate.float() - y), size(y)
        if weights is not None:
            w = weights.to(device=y.device, dtype=torch.float32)
            err, ref = err.reshape(len(w), -1).sum(dim=1) * w, ref.reshape(len(w), -1).sum(dim=1) * w
        self.err[key] = self.err.get(key, 0.0) + float(err.sum())
        self.ref[key] = self.ref.get(key, 0.0) + float(ref.sum())

    def result(self) -> dict:
        power = 1.0 if self.norm == "l1" else 0.5
        return {k: (self.err[k] / r) ** power if r > 0 else 0.0 for k, r in self.ref.items()}


def layer_errors(calibrations: list[GraphCalibration], layers: dict[str, QuantizedLinear],
                 kernels: str) -> dict[str, float]:
    """Relative L2 error ||Y - Ŷ|| / ||Y|| of each quantized layer's own output, per module path.

    Y is the full-precision layer on its full-precision input; Ŷ the quantized layer on the
    same input (a layer with timestep buckets: each row on its timestep's bucket), so each number isolates one layer (a layer with a transform folded across its
    neighbours gets its input, and is compared with its output, in the transformed coordinates).
    """
    meter = RelativeError()
    timesteps = [cal.timesteps() for cal in calibrations]
    where = ReplayPosition()

    def folded(t, transform):
        return t if transform is None else transform.apply(t)

    def measure(site, x, weight, bias, y):
        layer = layers[site.path]
        steps = timesteps[where.graph]
        out = layer.forward(folded(x, layer.fold_in), bias, kernels, None if steps is None else steps[where.call])
        meter.add(site.path, folded(y, layer.fold_out), out)

    observe(calibrations, set(layers), measure, desc="measuring layer errors", position=where)
    return meter.result()
