"""The backend's options: a frozen, validated config built from `torch.compile(..., options={...})`."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from clq_compile.artifact import held, read_manifest
from clq_compile.choices import (ADATSQ_BASES, BITS, CONDITIONING_BITS, KERNELS, LOWRANK_RECIPES, LRQ_RECIPES,
                                 MEAN_CORRECTED_RECIPES,
                                 RECIPE_BUCKETS, RECIPE_NAMES, RECIPE_OPTIONS)
from clq_compile.kernels.formats import MODES, NumberFormat
from clq_compile.passes.configs import (ActivationConfig, AdaTSQConfig, CBCConfig, CLPSConfig, Execution, GPTQConfig,
                                        LowRankConfig, LRQConfig, MethodConfigs, OBSConfig, PolicyConfig, QuantizerConfig,
                                        SmoothQuantConfig, WeightQuantizerConfig)

GROUPS = (None, 32, 64, 128)
INDUCTOR = ("auto", "always", "never")
HADAMARD_BLOCKS = (32, 64, 128, 256)
CBC_REFERENCES = ("fp-layer", "fp-model")
OBS_STATISTICS = ("quantized-prefix", "fp")
CLPS_WINDOWS = (0, 1, 2, 3)
OBS_SWAPS = ("spread", "group")
CBC_PREFIXES = ("all", "previous")
CLPS_TARGETS = ("peak-error", "max-variance")
CLPS_NORMS = ("l2", "l1")
LRQ_WEIGHTS = ("twin-log", "uniform")
CALIBRATION_WEIGHTINGS = ("uniform", "fisher")
MAX_TIMESTEP_BUCKETS = 16
# Options that change how the model runs or calibrates, not what its quantized layers hold: free
# to differ from an artifact's.
RUNTIME_KEYS = ("kernels", "inductor", "load", "offload")
# What an option that an artifact's manifest lacks meant when it was written: the behaviour before
# the option existed, where the default has changed since.
BEFORE_OPTION = {"cbc_prefix": "all"}


@dataclass(frozen=True)
class Options:
    """What to quantize and how.

    bits:             the number formats of weights and activations (kernels/formats.py MODES):
                      "w4a4", "w4a8", "w8a8" (integers), "fp8" (float8 e4m3 weights per output
                      channel and activations per token), "w3a16", "w4a16", "w8a16" (weight-only:
                      activations stay in 16 bit), or "w16a16" (no quantization: the graph
                      passes through)
    recipe:           the pass pipeline that chooses the quantization (passes/recipes.py; "clq" by default)
    weight_group:     None (one scale per output channel) or 32/64/128 input channels per scale
    act_group:        None (one scale per token) or 32/64/128 channels per scale
    weight_symmetric: symmetric weights (True) or asymmetric with a zero point (False)
    skip:             fnmatch patterns of module paths kept in full precision, e.g. "*.attn2.*"
    kernels:          "auto", "reference" (torch ops, any device) or "triton"
    quantize_cross_kv: quantize cross-attention key/value projections (they act on text tokens)
    inductor:         hand the rewritten graph to Inductor: "auto" (when its inputs are on CUDA),
                      "always" or "never" (run the FX graph as is)
    hadamard_block:   OBS block size b of the block-diagonal Hadamard (32/64/128/256)
    fold:             fold the activation transform (OBS's rotation, SmoothQuant's 1/s) into the
                      layers that produce the activation where the graph proves it legal (v_proj ->
                      attention -> out_proj), so nothing runs online there. Off by default: for CLQ
                      it costs quality (bench/fold.py: G must then stay inside one attention head)
    obs_statistics:   under CBC, the activations OBS computes its outlier scores on:
                      "quantized-prefix" (the inputs CBC calibrates on) or "fp" (the full-precision
                      prefix's); the two measurements disagree on which is better (README)
    cbc_reference:    CLPS reference outputs: "fp-layer" (full-precision layers on the inputs the
                      quantized prefix produces) or "fp-model" (the full-precision model's activations)
    obs_swap:         how OBS's channel swapping places channels before the block Hadamard:
                      "spread" (outliers dealt evenly over the blocks) or "group" (channels of
                      similar magnitude share a block)
    cbc_prefix:       what CBC quantizes before the block it calibrates: "previous" (only the
                      previous block, on the full-precision model's input to it; better on the
                      trained digits DiT at every seed measured, README) or "all" (the whole
                      prefix, its error accumulated; the default before this option existed)
    clps_target:      CLPS's target layer among those a layer reaches: "peak-error" (where the
                      unclipped layer's error peaks) or "max-variance" (the largest output variance)
    clps_window:      how many blocks after a layer's own CLPS looks for its target (0 to 3)
    clps_norm:        the target's error CLPS scores candidates on: "l2" or "l1"
    clps_grid:        clipping ratios CLPS tries (1.0, no clipping, is always included)
    search_calls:     how many recorded calls the searches evaluate candidates on
    offload:          keep calibration recordings, and cross-block calibration's activations between
                      blocks, in CPU memory; each call visits the model's device only to run (device
                      memory then holds the search calls' window, not the whole calibration set)
    gptq_act_order:   GPTQ processes columns by decreasing Hessian diagonal
    lowrank_rank:     rank of the 16-bit low-rank branch of the recipes that keep one (svdquant,
                      and the `+lowrank` recipes of clq, clq+gptq, rtn, gptq, quarot, quarot+gptq,
                      lrq-dit and d2quant; passes/lowrank.py), capped per layer at
                      min(out, in) / 4; refused with any other recipe
    ars_threshold:    recipes lrq-dit and lrq-dit+lowrank: the activation criterion J (root mean
                      square of the scaled layer input) at or above which a layer takes the
                      outlier-aware rotation instead of the Hadamard (passes/lrq_dit.py); refused
                      with any other recipe
    lrq_weights:      recipes lrq-dit and lrq-dit+lowrank: "twin-log" weights (TLQ, 3 and 4 bits)
                      or "uniform" (the integer grid; an ablation); refused with any other recipe
    mean_correction:  after the recipe, move each quantized layer's bias by its output mean
                      deviation on the calibration tokens (the activation side of D²Quant's DAC,
                      passes/mean_correction.py); needs calibration data. None (the default):
                      the recipe's choice, on for d2quant (it is its DAC), off for the others
    calibration_weighting: how the calibration rows (one image at its timestep in one recorded
                      call) count in the layers' statistics: "uniform", or "fisher" (AdaTSQ's
                      temporal Fisher: each row by the output's sensitivity to its layer's output,
                      pooled over rows of similar timestep; passes/fisher.py). Weighs GPTQ's
                      Hessians, the rows the searches judge candidates on, and CLPS's objective
    avg_bits:         recipe adatsq: the budget on the average bit-width, (weight bits + activation
                      bits) / 2 averaged over every quantized layer and timestep bucket weighted by
                      multiply-accumulates (W4A8 is 6). None (the default): the `bits` mode's own
                      (adatsq at bits="w4a8" mixes modes at W4A8's cost)
    adatsq_modes:     recipe adatsq: the bit-width pairs a layer may take in a timestep bucket (modes
                      with quantized activations; `bits` among them), default w4a4, w4a8, w8a8
    adatsq_base:      recipe adatsq: the recipe that quantizes each candidate (default clq+gptq, the
                      best recipe without a low-rank branch on the digits DiT at W4A8)
    timestep_buckets: how many timestep buckets each layer is quantized for (1 to 16): the recorded
                      rows are cut by timestep into that many buckets of equal share, the recipe
                      runs on each bucket's rows, and the compiled graph picks each layer's bucket
                      from its `timestep` input at run time (passes/timesteps.py). None (the
                      default): the recipe's choice, 1 (one quantization for every step) except
                      for adatsq
    conditioning_bits: None (conditioning GEMMs and adaLN modulations stay in 16 bit) or a
                      weight-only mode, "w3a16", "w4a16" or "w8a16", for those layers: their
                      weights round to nearest (weight_symmetric, weight_group as for the rest),
                      their activations stay in 16 bit; the recipe quantizes the token GEMMs
    load:             path of an artifact written by clq_compile.save: its layers are used as they
                      are (no calibration); the other options default to the artifact's, and any
                      given must agree with them, except the run-time ones (RUNTIME_KEYS)
    """

    bits: str = "w4a4"
    recipe: str = "clq"
    weight_group: int | None = None
    act_group: int | None = None
    weight_symmetric: bool = True
    skip: tuple[str, ...] = ()
    kernels: str = "auto"
    quantize_cross_kv: bool = True
    inductor: str = "auto"
    hadamard_block: int = 128
    fold: bool = False
    obs_statistics: str = "quantized-prefix"
    cbc_reference: str = "fp-layer"
    obs_swap: str = "spread"
    cbc_prefix: str = "previous"
    clps_target: str = "peak-error"
    clps_window: int = 1
    clps_norm: str = "l2"
    clps_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
    search_calls: int = 4
    offload: bool = False
    gptq_act_order: bool = False
    lowrank_rank: int = 32
    ars_threshold: float = 1.0
    lrq_weights: str = "twin-log"
    mean_correction: bool | None = None
    calibration_weighting: str = "uniform"
    avg_bits: float | None = None
    adatsq_modes: tuple[str, ...] = ("w4a4", "w4a8", "w8a8")
    adatsq_base: str = "clq+gptq"
    timestep_buckets: int | None = None
    conditioning_bits: str | None = None
    load: str | None = None

    @property
    def w_format(self) -> NumberFormat | None:
        """The weights' number format (None for w16a16)."""
        return MODES[self.bits][0]

    @property
    def a_format(self) -> NumberFormat | None:
        """The activations' number format ("none" for weight-only modes, None for w16a16)."""
        return MODES[self.bits][1]

    @property
    def corrects_means(self) -> bool:
        """Whether the mean correction follows the recipe (`mean_correction`, or the recipe's choice)."""
        if self.mean_correction is None:
            return self.recipe in MEAN_CORRECTED_RECIPES
        return self.mean_correction

    @property
    def buckets(self) -> int:
        """How many timestep buckets the layers are quantized for (`timestep_buckets`, or the recipe's choice)."""
        if self.timestep_buckets is None:
            return RECIPE_BUCKETS.get(self.recipe, 1)
        return self.timestep_buckets

    @property
    def quantizes(self) -> bool:
        """False for w16a16, where the graph runs unchanged."""
        return self.w_format is not None

    def policy(self) -> PolicyConfig:
        """What the policy reads of these options (passes/configs.py)."""
        alternatives = (tuple(self._quantizer(m) for m in self.adatsq_modes if m != self.bits)
                        if self.recipe == "adatsq" else ())
        return PolicyConfig(self.bits, self._quantizer(self.bits), self.conditioning_bits,
                            self._quantizer(self.conditioning_bits), self.skip, self.quantize_cross_kv,
                            alternatives)

    def _quantizer(self, mode: str | None) -> QuantizerConfig | None:
        weights, activations = MODES[mode] if mode else (None, None)
        if weights is None:
            return None
        return QuantizerConfig(WeightQuantizerConfig(weights, self.weight_symmetric, self.weight_group),
                               ActivationConfig(activations, self.act_group if activations.quantizes else None))

    def method_configs(self) -> MethodConfigs:
        """What each quantization method reads of these options (passes/configs.py)."""
        return MethodConfigs(
            quantizer=self._quantizer(self.bits),
            gptq=GPTQConfig(self.gptq_act_order),
            smoothquant=SmoothQuantConfig(self.fold),
            obs=OBSConfig(self.hadamard_block, self.obs_statistics, self.fold, self.obs_swap),
            clps=CLPSConfig(self.clps_grid, self.clps_window, self.search_calls, self.cbc_reference,
                            self.clps_target, self.clps_norm),
            cbc=CBCConfig(self.cbc_prefix),
            lowrank=LowRankConfig(self.lowrank_rank),
            lrq=LRQConfig(self.ars_threshold, self.lrq_weights),
            calibration_weighting=self.calibration_weighting,
            adatsq=self._adatsq() if self.recipe == "adatsq" else None)

    def _adatsq(self) -> AdaTSQConfig:
        # `bits` first: the mode of a run without calibration data.
        modes = (self.bits, *(m for m in self.adatsq_modes if m != self.bits))
        quantizers = tuple(self._quantizer(m) for m in modes)
        budget = self.avg_bits if self.avg_bits is not None else quantizers[0].mean_bits
        return AdaTSQConfig(modes, quantizers, budget, self.adatsq_base, self.buckets)

    def execution(self) -> Execution:
        """The run-time knobs the recipes' searches need: kernels and offload."""
        return Execution(self.kernels, self.offload)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def quantization_dict(self) -> dict[str, Any]:
        """The options that decide the quantized layers (what an artifact records; a recipe's own
        options, RECIPE_OPTIONS, only for the recipes that read them, which is where parse_options
        accepts them)."""
        unused = RUNTIME_KEYS + tuple(k for k, recipes in RECIPE_OPTIONS.items() if self.recipe not in recipes)
        return {k: v for k, v in self.as_dict().items() if k not in unused}


_DEFAULTS = Options().as_dict()


def _allowed(key: str, value: Any, choices: tuple) -> None:
    # Exact type match: 32.0 or True must not pass for a group size of 32 or 1.
    if not any(type(value) is type(c) and value == c for c in choices):
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"options[{key!r}] must be one of {shown}; got {value!r}")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"options[{key!r}] must be True or False; got {value!r}")


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise ValueError(
        f"options['skip'] must be a list of fnmatch patterns of module paths "
        f"(e.g. ['*.attn2.*']); got {value!r}")


def _ratios(value: Any) -> tuple[float, ...]:
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in value)):
        return tuple(float(r) for r in value)
    raise ValueError(f"options['clps_grid'] must be a non-empty list of clipping ratios in (0, 1]; got {value!r}")


def parse_options(options: Mapping[str, Any] | None) -> Options:
    """Validate `options` (the dict given to torch.compile) and build an `Options`.

    Raises ValueError naming the key, the value and what is allowed for an unknown key or a bad
    value, and TypeError when `options` is not a mapping.
    """
    if options is None:
        return Options()
    if isinstance(options, Options):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict such as {{'bits': 'w4a4'}}; got {type(options).__name__}")
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"the options are {', '.join(sorted(known))}")
    given = dict(options)
    values = {**_DEFAULTS, **given}
    _allowed("bits", values["bits"], BITS)
    _allowed("recipe", values["recipe"], RECIPE_NAMES)
    _allowed("kernels", values["kernels"], KERNELS)
    _allowed("inductor", values["inductor"], INDUCTOR)
    for key in ("weight_group", "act_group"):
        _allowed(key, values[key], GROUPS)
    _allowed("hadamard_block", values["hadamard_block"], HADAMARD_BLOCKS)
    _allowed("cbc_reference", values["cbc_reference"], CBC_REFERENCES)
    _allowed("obs_statistics", values["obs_statistics"], OBS_STATISTICS)
    _allowed("clps_window", values["clps_window"], CLPS_WINDOWS)
    for key, choices in (("obs_swap", OBS_SWAPS), ("cbc_prefix", CBC_PREFIXES), ("clps_target", CLPS_TARGETS),
                         ("clps_norm", CLPS_NORMS), ("lrq_weights", LRQ_WEIGHTS),
                         ("calibration_weighting", CALIBRATION_WEIGHTINGS)):
        _allowed(key, values[key], choices)
    _allowed("conditioning_bits", values["conditioning_bits"], CONDITIONING_BITS)
    values["clps_grid"] = _ratios(values["clps_grid"])
    for key in ("search_calls", "lowrank_rank"):
        if type(values[key]) is not int or values[key] < 1:
            raise ValueError(f"options[{key!r}] must be a positive integer; got {values[key]!r}")
    threshold = values["ars_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < float("inf"):
        raise ValueError(f"options['ars_threshold'] must be a positive finite number; got {threshold!r}")
    values["ars_threshold"] = float(threshold)
    # With 'load' and no 'recipe', the recipe is the artifact's: its options are compared there.
    recipe_known = "load" not in given or "recipe" in given
    for key, recipes in RECIPE_OPTIONS.items():
        if key in given and recipe_known and values["recipe"] not in recipes:
            raise ValueError(f"options[{key!r}] is for recipe{'s' if len(recipes) > 1 else ''} "
                             f"{', '.join(recipes)}; recipe {values['recipe']!r} does not read it. Drop it, "
                             f"or choose {'one of those recipes' if len(recipes) > 1 else 'that recipe'}")
    if values["recipe"] == "svdquant" and values["fold"]:
        raise ValueError("options['fold']=True: recipe 'svdquant' applies its smoothing online (its low-rank "
                         "branch is split after smoothing); drop 'fold'")
    for key in ("weight_symmetric", "quantize_cross_kv", "gptq_act_order", "fold", "offload"):
        _boolean(key, values[key])
    if values["mean_correction"] is not None:
        _boolean("mean_correction", values["mean_correction"])
    _timestep_buckets_allow(values)
    _adatsq_allow(values)
    values["skip"] = _patterns(values["skip"])
    _formats_allow(values)
    if "load" in given:
        return _with_artifact({k: values[k] for k in given})
    return Options(**values)


def _adatsq_allow(values: dict[str, Any]) -> None:
    """Refuse adatsq options that cannot make a search: unknown or unquantized modes, `bits` not
    among them, a budget outside what the modes can spend, an unsupported base recipe."""
    modes = values["adatsq_modes"]
    if isinstance(modes, str) or not isinstance(modes, (list, tuple)):
        raise ValueError(f"options['adatsq_modes'] must be a list of bits modes, e.g. ['w4a4', 'w8a8']; got {modes!r}")
    modes = values["adatsq_modes"] = tuple(modes)
    usable = tuple(b for b in BITS if MODES[b][1] is not None and MODES[b][1].quantizes)
    for mode in modes:
        _allowed("adatsq_modes", mode, usable)
    if len(set(modes)) < 2:
        raise ValueError(f"options['adatsq_modes'] must name at least two different modes; got {list(modes)}")
    _allowed("adatsq_base", values["adatsq_base"], ADATSQ_BASES)
    if values["recipe"] != "adatsq":
        return
    if values["bits"] not in modes:
        raise ValueError(f"recipe 'adatsq' with bits={values['bits']!r}: bits must be one of adatsq_modes "
                         f"({', '.join(modes)}); it is the mode of a run without calibration data")
    for mode in modes:
        _formats_allow({**values, "bits": mode, "recipe": values["adatsq_base"]})
    budget = values["avg_bits"]
    spent = [QuantizerConfig(WeightQuantizerConfig(MODES[m][0], True, None), ActivationConfig(MODES[m][1], None)).mean_bits
             for m in modes]
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not min(spent) <= budget <= max(spent):
            raise ValueError(f"options['avg_bits'] must be a number from {min(spent):g} (every layer at the "
                             f"cheapest mode) to {max(spent):g} (at the dearest); got {budget!r}")
        values["avg_bits"] = float(budget)


def _timestep_buckets_allow(values: dict[str, Any]) -> None:
    """Refuse a bad bucket count, and the options one quantization per bucket cannot combine with."""
    buckets = values["timestep_buckets"]
    if buckets is not None and (type(buckets) is not int or not 1 <= buckets <= MAX_TIMESTEP_BUCKETS):
        raise ValueError(f"options['timestep_buckets'] must be an integer from 1 to {MAX_TIMESTEP_BUCKETS} "
                         f"(or None, the recipe's choice); got {buckets!r}")
    if (RECIPE_BUCKETS.get(values["recipe"], 1) if buckets is None else buckets) == 1:
        return
    why = None
    if values["fold"]:
        why = "options['fold']=True folds one transform into neighbouring layers, which a per-bucket transform cannot share"
    elif values["recipe"] in LOWRANK_RECIPES:
        why = f"recipe {values['recipe']!r} adds a low-rank branch, which is not kept per bucket"
    elif (values["mean_correction"] if values["mean_correction"] is not None
          else values["recipe"] in MEAN_CORRECTED_RECIPES):
        why = "the mean correction moves one bias per layer, not one per bucket"
    if why:
        raise ValueError(f"options['timestep_buckets']: several timestep buckets do not combine here: {why}. "
                         f"Use timestep_buckets=1, or drop the other option")


def _formats_allow(values: dict[str, Any]) -> None:
    """Refuse options the chosen number formats cannot honour (rather than ignore them)."""
    weights, activations = MODES[values["bits"]]
    if weights is None:
        if values["conditioning_bits"] is not None:
            raise ValueError(f"options['conditioning_bits']={values['conditioning_bits']!r}: bits="
                             f"{values['bits']!r} quantizes nothing; choose quantizing bits or drop it")
        return
    if not weights.asymmetric and values["weight_symmetric"] is False:
        raise ValueError(f"options['weight_symmetric']=False: bits={values['bits']!r} stores {weights.name} "
                         f"weights, which have no zero point; drop the option or choose integer bits")
    for key in ("weight_group", "act_group"):
        if weights.kernels == ("scaled_mm",) and values[key] is not None:
            raise ValueError(f"options[{key!r}]={values[key]!r}: bits={values['bits']!r} uses one scale per "
                             f"output channel and per token (torch._scaled_mm's rowwise scaling); drop {key!r}")
    if values["recipe"] in LRQ_RECIPES and (values["weight_group"] is not None or values["weight_symmetric"] is False):
        raise ValueError(f"recipe {values['recipe']!r} keeps one twin-log grid pair per output channel (symmetric, no "
                         "zero point): drop 'weight_group' and 'weight_symmetric'")
    if values["recipe"] in LRQ_RECIPES and activations.quantizes and not activations.integer:
        raise ValueError(f"recipe {values['recipe']!r} multiplies twin-log weights with integer activations; bits="
                         f"{values['bits']!r} has {activations.name} ones: choose w4a4, w4a8, w8a8 or a weight-only mode")
    if not activations.quantizes and values["act_group"] is not None:
        raise ValueError(f"options['act_group']={values['act_group']!r}: bits={values['bits']!r} leaves "
                         f"activations unquantized, so they have no groups; drop 'act_group'")


def _with_artifact(values: dict[str, Any]) -> Options:
    """Options for loading an artifact: its own options, checked against the ones given."""
    path = values["load"]
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"options['load'] must be the path of a saved artifact; got {path!r}")
    path = values["load"] = os.fspath(path)
    if not path:
        raise ValueError("options['load'] is an empty path; give the path of a saved artifact")
    # A loaded model's artifact was read once and is held; only a new one is read from disk.
    artifact = held(path)
    manifest = artifact.manifest if artifact is not None else read_manifest(path)
    recorded = {**BEFORE_OPTION, **manifest["options"]}
    saved = Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    given = Options(**values)
    conflicts = [f"{key}: {getattr(given, key)!r} given, {getattr(saved, key)!r} in the artifact"
                 for key in values if key not in RUNTIME_KEYS and getattr(given, key) != getattr(saved, key)]
    if conflicts:
        raise ValueError(
            f"options conflict with the artifact {path} ({'; '.join(conflicts)}). Drop those options "
            f"to use the artifact as saved, or quantize again with the new ones (without 'load').")
    return replace(saved, **{k: getattr(given, k) for k in RUNTIME_KEYS})
