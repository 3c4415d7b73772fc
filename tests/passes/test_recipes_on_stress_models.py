"""The comparison CLQ is built for: W4A4 on stress models, averaged over seeds.

Stress models (clq_compile/stress.py): tiny DiT / PixArt / SD3 / Flux of width 256 with
trained-like (Student-t) weights and x50 outlier channels injected function-preservingly. The
final latents of a 10-step sampling loop are compared with full precision from the same noise.

On models this small, the rankings of close recipes flip with the seed, so an ordering that
flips is not a test: orderings are measured over ten seeds by ``python bench/recipes.py --bits
w4a4 --recipes rtn,smoothquant,quarot,clq,clq-no-cbc,clq-no-obs,clq-no-clps --seeds 10 --out
bench/results/w4a4-10-seeds-all`` and reported there and in the README. Only those that held
with margin there are tests: the better recipe better on at least 9 of the 10 seeds, its mean
error at most 0.9 of the other's over the ten seeds (the ratio is in each comment) and over the
first two, which the tests average. Not tests, because they flip with the seed: clq against
quarot (better on 7 and 8 of 10 seeds on DiT and PixArt, 5 on SD3 and Flux), against clq-no-cbc
and clq-no-clps anywhere (4 to 8 of 10), against smoothquant anywhere; clq against clq-no-obs
on SD3 and Flux (8 and 9 of 10; on Flux a mean ratio of 0.92 over the first two seeds). No
known failure holds with that margin today: the one kept before (clq worse than clq-no-cbc on
DiT, 9 of 10 seeds with ``cbc_prefix="all"``) is a tie with the default
``cbc_prefix="previous"`` (5 of 10, mean ratio 1.03), so it is reported, not tested.
"""

from functools import lru_cache

import pytest

from clq_compile.stress import compare_recipes

SEEDS = (0, 1)

# (family, better, worse): mean error ratio better / worse over the ten seeds, seeds better of 10
HOLDS = [
    ("dit", "quarot", "rtn"),          # 0.54, 10
    ("dit", "clq", "clq-no-obs"),      # 0.51, 10
    ("pixart", "quarot", "rtn"),       # 0.61, 10
    ("pixart", "clq", "clq-no-obs"),   # 0.48, 10
    ("sd3", "quarot", "rtn"),          # 0.69, 9
    ("flux", "quarot", "rtn"),         # 0.66, 10
]
# (family, better, worse) -> why it fails: kept as strict xfails, so that a fix is noticed.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


@lru_cache(maxsize=None)
def mean_errors(family: str, bits: str, recipes: tuple[str, ...], seeds: tuple[int, ...]) -> dict[str, float]:
    results = compare_recipes(family, list(recipes), bits, seeds=seeds)
    return {r: sum(v["error"]) / len(v["error"]) for r, v in results.items()}


def _w4a4_errors(family: str) -> dict[str, float]:
    """Every recipe a W4A4 case of `family` compares, measured once for all of them."""
    recipes = sorted({r for f, *pair in [*HOLDS, *KNOWN_FAILURES] if f == family for r in pair})
    return mean_errors(family, "w4a4", tuple(recipes), SEEDS)


def _cases():
    for family, better, worse in HOLDS:
        yield pytest.param(family, better, worse, id=f"{family}: {better} < {worse}")
    for (family, better, worse), reason in KNOWN_FAILURES.items():
        yield pytest.param(family, better, worse, id=f"{family}: {better} < {worse}",
                           marks=pytest.mark.xfail(strict=True, reason=reason))


@pytest.mark.parametrize("family, better, worse", list(_cases()))
def test_w4a4_ordering(family, better, worse):
    errors = _w4a4_errors(family)
    assert errors[better] < errors[worse], errors


W8A8_FAMILIES = ("dit", "pixart", "sd3", "flux")


@pytest.mark.parametrize("family", W8A8_FAMILIES)
def test_w8a8_clq_gptq_within_one_percent(family):
    assert mean_errors(family, "w8a8", ("clq+gptq",), (0,))["clq+gptq"] < 0.01


@pytest.mark.parametrize("family", W8A8_FAMILIES)
def test_w8a8_clq_beats_rtn(family):
    errors = mean_errors(family, "w8a8", ("clq", "rtn"), (0,))
    assert errors["clq"] < errors["rtn"]
