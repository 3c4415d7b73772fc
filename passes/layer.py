"""QuantizedLinear: what a recipe decided for one linear layer, in the form the op consumes.

Recipes produce these (keyed by module path, so every recompiled graph of the same model reuses
them); the lowering pass turns each into a `clq::quant_linear` call, and the observers call
`forward` to measure the layer's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from clq_compile.kernels import ops  # noqa: F401  (registers torch.ops.clq.quant_linear)
from clq_compile.kernels.formats import NumberFormat
from clq_compile.kernels.packing import PackedWeight
from clq_compile.kernels.reference import transform_activation

from .folding import FoldDecision

# Names of the tensors a QuantizedLinear hands to the op, in the op's argument order.
TENSOR_ARGS = ("qweight", "w_scale", "w_zero", "bias", "act_mul", "act_perm", "act_rotation")
# Names of a low-rank branch's tensors (not the op's: lowering adds the branch beside it).
LOWRANK_ARGS = ("lr_down", "lr_up")


@dataclass(frozen=True)
class ActivationTransform:
    """x -> (x · mul)[..., perm] · blockdiag(rotation, ...): an activation transform, each part
    optional (kernels/reference.py transform_activation).

    mul [K]: per-channel multiplier (SmoothQuant's 1/s); perm int64 [K]: gather index (OBS's
    channel swap S); rotation [b, b]: applied to each of the K // b blocks (a Hadamard, OBS's H).
    A layer holds one online (the op applies it) and, where a transform is folded across layers,
    the ones its input arrives with and its output leaves with (`QuantizedLinear.fold_in/out`).
    """

    mul: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    rotation: torch.Tensor | None = None

    @property
    def identity(self) -> bool:
        return self.mul is None and self.perm is None and self.rotation is None

    def parts(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(mul, perm, rotation), in the op's and transform_activation's argument order."""
        return self.mul, self.perm, self.rotation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] transformed along its last dimension."""
        if self.identity:
            return x
        return transform_activation(x.reshape(-1, x.shape[-1]), *self.parts()).reshape(x.shape)


IDENTITY = ActivationTransform()


@dataclass(frozen=True)
class LowRank:
    """SVDQuant's 16-bit branch beside a quantized layer: y = op(x) + (x · downᵀ) · upᵀ.

    down [r, K], up [N, r], with x as the op receives it (before its online transform; a
    transform applied before the low-rank split is folded into `down`). Kept in the layer
    weight's dtype: a 16-bit model stores a 16-bit branch.
    """

    down: torch.Tensor
    up: torch.Tensor

    def __post_init__(self):
        # Dense, as an artifact stores them: a transposed view (an SVD factor) multiplies through
        # another BLAS path and rounds differently, so a loaded branch would not compute bit for bit.
        object.__setattr__(self, "down", self.down.contiguous())
        object.__setattr__(self, "up", self.up.contiguous())
        r, k = self.down.shape
        if self.up.dim() != 2 or self.up.shape[1] != r or r < 1:
            raise ValueError(f"a low-rank branch needs down [r, K] and up [N, r]; got {list(self.down.shape)} "
                             f"and {list(self.up.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        f = torch.nn.functional.linear
        return f(f(x, self.down.to(x.dtype)), self.up.to(x.dtype))


@dataclass(frozen=True)
class TimestepBuckets:
    """A layer quantized per timestep bucket: `layers[b]` serves the timesteps t with
    edges[b - 1] <= t < edges[b] (bucket 0 everything below edges[0], the last everything from
    edges[-1] on). edges: ascending finite floats, one fewer than the layers; the layers: records
    of one shape, without buckets, low-rank branches or folded transforms of their own."""

    edges: tuple[float, ...]
    layers: tuple["QuantizedLinear", ...]

    def __post_init__(self):
        edges = tuple(float(e) for e in self.edges)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != len(edges) + 1 or len(edges) < 1:
            raise ValueError(f"timestep buckets need one layer more than edges, and at least one edge; got "
                             f"{len(self.layers)} layers and {len(edges)} edges")
        if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"timestep bucket edges must be finite and strictly ascending; got {list(edges)}")
        shapes = {(layer.weight.qweight.shape[0], layer.weight.in_features) for layer in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"the buckets of one layer must share its shape; got {sorted(shapes)}")
        if any(layer.buckets is not None or layer.lowrank is not None or layer.fold is not None
               for layer in self.layers):
            raise ValueError("a bucket's layer cannot itself have buckets, a low-rank branch or a folded transform")

    def edges_tensor(self) -> torch.Tensor:
        return torch.tensor(self.edges, dtype=torch.float64)


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized layer.

    weight: the packed weight (already multiplied by the inverse of the activation transform)
    a_format: the activations' number format ("none": weight only); a_group: channels per
        activation scale, None = per token
    online: the activation transform the op applies (act_mul, act_perm, act_rotation read its parts)
    bias [N]: the layer's own bias, used instead of the graph's when set (a producer whose output
    rows carry a consumer's folded transform stores b·G)
    method: a short description for explain(), e.g. "rtn"; notes: anything else worth showing
        (a tuple); details: what a search measured (e.g. CLPS's objective per candidate), for
        reports and tests (a read-only mapping)
    fold: the layer's part in a transform folded across layers (None: nothing folded), which
        lowering checks the graph still connects; the artifact stores it as details["fold"]
    fold_in / fold_out: a transform G folded across layers: the input arrives as x·G / the output
        leaves as y·G. Not used by the op (the neighbours carry it); kept while quantizing to
        measure the layer on its own, not saved.
    lowrank: a 16-bit low-rank branch added to the op's output (SVDQuant), else None; the
        packed weight then holds the residual W - up · down
    buckets: the layer quantized per timestep bucket (option timestep_buckets, recipe adatsq;
        passes/timesteps.py), else None. The record's own fields are then its first bucket's, for
        what every bucket shares (shapes, role); what runs is each bucket's own record, chosen by
        the call's timestep (`forward`, `clq::quant_linear_bucketed`)
    """

    weight: PackedWeight
    a_format: NumberFormat
    a_group: int | None
    online: ActivationTransform = IDENTITY
    bias: torch.Tensor | None = None
    method: str = "rtn"
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    fold: FoldDecision | None = None
    fold_in: ActivationTransform | None = None
    fold_out: ActivationTransform | None = None
    lowrank: LowRank | None = None
    buckets: TimestepBuckets | None = None

    def __post_init__(self):
        # Built once, never edited: the notes as a tuple, the details as a read-only view of a copy.
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @property
    def act_mul(self) -> torch.Tensor | None:
        return self.online.mul

    @property
    def act_perm(self) -> torch.Tensor | None:
        return self.online.perm

    @property
    def act_rotation(self) -> torch.Tensor | None:
        return self.online.rotation

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The op's tensor arguments by name (see TENSOR_ARGS)."""
        w = self.weight
        return {"qweight": w.qweight, "w_scale": w.scale, "w_zero": w.zero, "bias": self.bias,
                "act_mul": self.act_mul, "act_perm": self.act_perm, "act_rotation": self.act_rotation}

    def saved_tensors(self) -> dict[str, torch.Tensor | None]:
        """What an artifact stores of this layer: the op's tensors and the low-rank branch's."""
        lowrank = self.lowrank
        return {**self.tensors(), "lr_down": None if lowrank is None else lowrank.down,
                "lr_up": None if lowrank is None else lowrank.up}

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as stored: the packed codes and scales, and the low-rank branch
        (every bucket's, a tensor that buckets share counted once)."""
        if self.buckets is not None:
            unique = {id(t): t for layer in self.buckets.layers
                      for t in (layer.weight.qweight, layer.weight.scale, layer.weight.zero) if t is not None}
            return sum(t.numel() * t.element_size() for t in unique.values())
        return self.weight.nbytes + (0 if self.lowrank is None else self.lowrank.nbytes)

    def scalars(self, kernels: str) -> tuple:
        """The op's trailing scalar arguments."""
        w = self.weight
        return (w.in_features, w.format.name, self.a_format.name, w.group or 0, self.a_group or 0, kernels)

    def bucketed_args(self, kernels: str) -> tuple:
        """The arguments of `clq::quant_linear_bucketed` after (x, bucket, bias), for a layer with buckets."""
        layers = self.buckets.layers
        lists = [[layer.tensors()[name] for layer in layers] for name in TENSOR_ARGS]
        scalars = [layer.scalars(kernels) for layer in layers]
        return (*lists, self.weight.in_features, ",".join(s[1] for s in scalars), ",".join(s[2] for s in scalars),
                [s[3] for s in scalars], [s[4] for s in scalars], kernels)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kernels: str,
                timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features], through the op; `bias` is the graph's.
        A layer with buckets needs the call's `timesteps` (one per sample, or one for all)."""
        if self.buckets is not None:
            if timesteps is None:
                raise ValueError("a layer quantized per timestep bucket needs the call's timesteps")
            bucket = torch.ops.clq.timestep_bucket(timesteps, self.buckets.edges_tensor())
            qweight, w_scale, w_zero, own_bias, *rest = self.bucketed_args(kernels)
            return torch.ops.clq.quant_linear_bucketed(x, bucket, bias, qweight, w_scale, w_zero, own_bias, *rest)
        t = self.tensors()
        if t["bias"] is None:
            t["bias"] = bias
        out = torch.ops.clq.quant_linear(x, *(t[name] for name in TENSOR_ARGS), *self.scalars(kernels))
        return out if self.lowrank is None else out + self.lowrank.apply(x)
