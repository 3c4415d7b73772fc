"""Method configs: what each quantization method reads, as small frozen records.

The passes never see the user's options (clq_compile/options.py): the front end builds one
`MethodConfigs` from them (`Options.method_configs`) and hands each method its part. Run-time
knobs (which kernels run, whether activations wait in CPU memory) are not part of any method's
config: the recipes take them as the separate `Execution`, and they change how long a search
takes or where its tensors live, never what it decides. The defaults live in `Options` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from clq_compile.choices import CONDITIONING_ROLES
from clq_compile.kernels.formats import NumberFormat

@dataclass(frozen=True)
class WeightQuantizerConfig:
    """format: the weights' number format; symmetric: no zero point; group: input channels per
    scale (None: one scale per output channel)."""

    format: NumberFormat
    symmetric: bool
    group: int | None


@dataclass(frozen=True)
class ActivationConfig:
    """format: the activations' number format ("none": weight only); group: channels per scale
    (None: one scale per token)."""

    format: NumberFormat
    group: int | None


@dataclass(frozen=True)
class QuantizerConfig:
    """How every layer's weights and activations are quantized, whatever the method."""

    weight: WeightQuantizerConfig
    activation: ActivationConfig

    @property
    def mean_bits(self) -> float:
        """(weight bits + activation bits) / 2, activations left in 16 bit counting 16: W4A8 -> 6."""
        a = self.activation.format
        return (self.weight.format.bits + (a.bits if a.quantizes else 16)) / 2


@dataclass(frozen=True)
class GPTQConfig:
    """act_order: process columns by decreasing Hessian diagonal."""

    act_order: bool


@dataclass(frozen=True)
class SmoothQuantConfig:
    """fold: fold 1/s into the producers where the graph proves it legal (passes/folding.py)."""

    fold: bool


@dataclass(frozen=True)
class QuaRotConfig:
    """seed: seed of the random Hadamard signs (layers of one width share one rotation)."""

    seed: int = 0


@dataclass(frozen=True)
class OBSConfig:
    """hadamard_block: block size b of the block-diagonal Hadamard; statistics: under CBC, the
    activations the outlier scores come from ("quantized-prefix" or "fp"); fold: fold G into the
    producers where the graph proves it legal; swap: how channel swapping places the channels
    ("spread" outliers over the blocks, or "group" channels of similar score)."""

    hadamard_block: int
    statistics: str
    fold: bool
    swap: str


@dataclass(frozen=True)
class CBCConfig:
    """prefix: which blocks before the one being calibrated are quantized when its inputs are
    made: "all" (the whole quantized prefix, its error accumulated) or "previous" (the
    full-precision model up to the previous block, that block quantized)."""

    prefix: str


@dataclass(frozen=True)
class CLPSConfig:
    """grid: clipping ratios tried; window: blocks after a layer's own in which its target is
    looked for; search_calls: recorded calls the candidates are judged on; reference: "fp-layer"
    (full-precision layers on the quantized prefix's inputs) or "fp-model" (the full-precision
    model's activations); target: how the target layer is picked among the reached ones,
    "peak-error" (where the unclipped layer's error peaks) or "max-variance" (the largest output
    variance); norm: the error the candidates are scored on, "l2" or "l1"."""

    grid: tuple[float, ...]
    window: int
    search_calls: int
    reference: str
    target: str
    norm: str


@dataclass(frozen=True)
class LowRankConfig:
    """rank: the rank of the 16-bit low-rank branch (SVDQuant; capped per layer at min(N, K) / 4,
    passes/lowrank.py) of the recipes that give layers one."""

    rank: int


@dataclass(frozen=True)
class LRQConfig:
    """threshold: LRQ-DiT's ARS criterion J at or above which a layer takes the outlier-aware
    rotation (passes/lrq_dit.py); weights: "twin-log" (TLQ) or "uniform" (the integer grid, an
    ablation); seed: the random Hadamard signs."""

    threshold: float = 1.0
    weights: str = "twin-log"
    seed: int = 0


@dataclass(frozen=True)
class TimestepRows:
    """Calibrate on one timestep bucket's rows only (option timestep_buckets, passes/timesteps.py):
    the rows whose timestep t has `bucket` = the number of `edges` at or below t."""

    edges: tuple[float, ...]
    bucket: int


@dataclass(frozen=True)
class AdaTSQConfig:
    """Recipe adatsq (passes/adatsq.py): modes: the bit-width pairs a (layer, timestep bucket) may
    take, with their quantizers (same order); avg_bits: the budget on the mean of (weight bits +
    activation bits) / 2 over every layer and bucket, weighted by multiply-accumulates; base: the
    recipe that quantizes each candidate; buckets: the timestep buckets; beam: the beam width;
    rerank: how many of the best candidates are measured end to end."""

    modes: tuple[str, ...]
    quantizers: tuple[QuantizerConfig, ...]
    avg_bits: float
    base: str
    buckets: int
    beam: int = 4
    rerank: int = 4


@dataclass(frozen=True)
class MethodConfigs:
    """Every method's config, built from the user's options in one place."""

    quantizer: QuantizerConfig
    gptq: GPTQConfig
    smoothquant: SmoothQuantConfig
    obs: OBSConfig
    clps: CLPSConfig
    cbc: CBCConfig
    lowrank: LowRankConfig
    lrq: LRQConfig = LRQConfig()
    quarot: QuaRotConfig = QuaRotConfig()
    # How calibration rows are weighted: "uniform", or "fisher" (passes/fisher.py).
    calibration_weighting: str = "uniform"
    # Which rows are calibrated on: all (None), or one timestep bucket's (passes/timesteps.py).
    rows: TimestepRows | None = None
    adatsq: AdaTSQConfig | None = None


@dataclass(frozen=True)
class PolicyConfig:
    """Which linear layers the policy quantizes, and in which formats (passes/policy.py).

    bits: the mode's name, for the reasons; quantizer: the token GEMMs' (None: bits w16a16, nothing
    is quantized); conditioning_bits / conditioning: the weight-only mode and quantizer of the
    conditioning GEMMs and modulations (None: kept in 16 bit); skip: fnmatch patterns of paths kept;
    quantize_cross_kv: quantize cross-attention keys and values.
    """

    bits: str
    quantizer: QuantizerConfig | None
    conditioning_bits: str | None
    conditioning: QuantizerConfig | None
    skip: tuple[str, ...]
    quantize_cross_kv: bool
    # The other quantizers a recipe's layer may hold (adatsq's modes), beside `quantizer`.
    alternatives: tuple[QuantizerConfig, ...] = ()

    def layer_quantizers(self, role: str | None) -> tuple[QuantizerConfig, ...]:
        """Every quantizer a layer of `role` may hold (the first: `layer_quantizer`'s)."""
        return (self.layer_quantizer(role),) if self._conditioning(role) else (self.quantizer, *self.alternatives)

    def layer_mode(self, role: str | None) -> str:
        """The mode a layer of `role` is quantized in, if the policy quantizes it."""
        return self.conditioning_bits if self._conditioning(role) else self.bits

    def layer_quantizer(self, role: str | None) -> QuantizerConfig | None:
        """How a layer of `role` is quantized: the recipe's quantizer, or conditioning_bits'."""
        return self.conditioning if self._conditioning(role) else self.quantizer

    def _conditioning(self, role: str | None) -> bool:
        return self.conditioning is not None and role in CONDITIONING_ROLES


@dataclass(frozen=True)
class Execution:
    """How a search runs, not what it decides: kernels: the op's kernels for the search's forward
    passes; offload: activations and recordings wait in CPU memory between runs; reports: where a
    recipe leaves what its search explored, by recipe name, for the user to look at
    (clq_compile.search_report), or None."""

    kernels: str
    offload: bool
    reports: dict | None = None
