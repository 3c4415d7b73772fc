"""The names the options and the command line accept, in a module that imports nothing.

The command line parses its arguments, and answers ``--help`` or a typo, before it loads torch
and diffusers (seconds): it reads its choices from here. ``clq_compile.options`` validates
options against the same tuples; ``RECIPE_NAMES`` are the keys of the recipe registry
``clq_compile.passes.recipes.RECIPES`` in its order, ``BITS`` those of the number-format pairs
``clq_compile.kernels.formats.MODES`` (tests keep each pair equal).
"""

BITS = ("w4a4", "w4a8", "w8a8", "fp8", "w3a16", "w4a16", "w8a16", "w16a16")
KERNELS = ("auto", "reference", "triton")
# The modes `conditioning_bits` accepts (weight-only: activations stay in 16 bit), and the layer
# roles it applies to (passes/structure.py): conditioning GEMMs and adaLN modulations.
CONDITIONING_BITS = (None, "w3a16", "w4a16", "w8a16")
CONDITIONING_ROLES = ("conditioning", "adaln", "adaln_token")
RECIPE_NAMES = ("rtn", "smoothquant", "quarot", "gptq", "quarot+gptq", "clq", "clq-no-cbc", "clq-no-obs",
                "clq-no-clps", "clq+gptq", "svdquant", "clq+lowrank", "clq+gptq+lowrank", "rtn+lowrank",
                "gptq+lowrank", "quarot+lowrank", "quarot+gptq+lowrank", "lrq-dit", "lrq-dit+lowrank", "d2quant",
                "d2quant+lowrank", "adatsq")
# The recipes that give layers a 16-bit low-rank branch (option lowrank_rank): SVDQuant's, and each
# "<base>+lowrank" (the base recipe on the residual of the branch).
LOWRANK_RECIPES = tuple(n for n in RECIPE_NAMES if n == "svdquant" or n.endswith("+lowrank"))


def _with_base(base: str) -> tuple[str, ...]:
    """`base` and its +lowrank recipe: they read the same options and write the same formats."""
    return tuple(n for n in RECIPE_NAMES if n.removesuffix("+lowrank") == base)


# LRQ-DiT's recipes: twin-log weights, its options.
LRQ_RECIPES = _with_base("lrq-dit")
# The options only some recipes read: {option: the recipes}. Refused with the others, and not
# recorded in their artifacts.
# The recipes whose layers always take the mean correction after the recipe (D²Quant's DAC).
MEAN_CORRECTED_RECIPES = _with_base("d2quant")
RECIPE_OPTIONS = {"lowrank_rank": LOWRANK_RECIPES, "ars_threshold": LRQ_RECIPES, "lrq_weights": LRQ_RECIPES,
                  "avg_bits": ("adatsq",), "adatsq_modes": ("adatsq",), "adatsq_base": ("adatsq",)}
# The base recipes adatsq may quantize its candidates with: those that decide each layer alone or
# block by block, with no low-rank branch and no non-uniform weights.
ADATSQ_BASES = ("rtn", "smoothquant", "quarot", "gptq", "quarot+gptq", "clq", "clq+gptq")
# The recipes that quantize per timestep bucket by default (option timestep_buckets): {recipe: buckets}.
RECIPE_BUCKETS: dict[str, int] = {"adatsq": 4}
# DDIM steps of the digits sampler, the command line and the quality benchmark unless told otherwise.
DEFAULT_SAMPLING_STEPS = 25
