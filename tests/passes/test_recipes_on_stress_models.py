"""The comparison CLQ is built for: W4A4 on stress models, averaged over seeds.

Stress models (clq_compile/stress.py): tiny DiT / PixArt / SD3 / Flux of width 256 with
trained-like (Student-t) weights and x50 outlier channels injected function-preservingly. The
final latents of a 10-step sampling loop are compared with full precision from the same noise.

Orderings that did not hold when measured are marked xfail with what was found, so they are
neither hidden nor tuned away. The marks are not strict: on models this small the rankings of
close recipes flip with the calibration data (DESIGN.md section 5), and pytest's summary lists
every xfail and xpass so the state stays visible.
"""

from functools import lru_cache

import pytest

from clq_compile.stress import compare_recipes
from clq_compile.tiny_models import FAMILIES

RECIPES = ("rtn", "quarot", "smoothquant", "clq", "clq-no-cbc", "clq-no-obs", "clq-no-clps")

SMOOTHQUANT_INVERTS_THE_INJECTION = (
    "the injected outliers are an exact per-channel rescale (value rows x s, output columns / s), "
    "which SmoothQuant's per-channel smoothing undoes almost exactly; rotations only spread it")
KNOWN_FAILURES = {
    **{(f, "clq < smoothquant"): SMOOTHQUANT_INVERTS_THE_INJECTION for f in FAMILIES},
    **{(f, "clq < quarot"): "measured: on the joint-attention models CLQ ties QuaRot (3 seeds: SD3 "
       "0.155 vs 0.154, Flux 0.154 vs 0.137; 10 seeds, bench/results/w4a4-10-seeds: SD3 0.136 vs "
       "0.138, Flux 0.105 vs 0.103, CLQ better on 5 and 6 of 10 seeds)" for f in ("sd3", "flux")},
    **{(f, "clq < clq-no-cbc"): "measured: calibrating on the quantized prefix did not help here "
       "(3 seeds: DiT 0.234 vs 0.213, SD3 0.155 vs 0.153, Flux 0.154 vs 0.153; 10 seeds: DiT 0.255 "
       "vs 0.227, worse on 9 of 10 seeds; SD3 and Flux within the seed spread). The cause is OBS "
       "scoring channels on the quantized prefix: obs_statistics='fp' makes CBC help on every "
       "family (DiT 0.224), but costs the trained digits DiT 1.4 dB, so it is not the default"
       for f in ("dit", "sd3", "flux")},
}


@lru_cache(maxsize=None)
def mean_errors(family: str, bits: str = "w4a4", recipes: tuple[str, ...] = RECIPES,
                seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, float]:
    results = compare_recipes(family, list(recipes), bits, seeds=seeds)
    return {r: sum(v["error"]) / len(v["error"]) for r, v in results.items()}


ORDERINGS = [("clq", "quarot"), ("quarot", "rtn"), ("clq", "smoothquant"), ("clq", "clq-no-cbc"),
             ("clq", "clq-no-obs"), ("clq", "clq-no-clps")]


def _cases():
    for family in FAMILIES:
        for better, worse in ORDERINGS:
            name = f"{better} < {worse}"
            reason = KNOWN_FAILURES.get((family, name))
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            yield pytest.param(family, better, worse, id=f"{family}: {name}", marks=marks)


@pytest.mark.parametrize("family, better, worse", list(_cases()))
def test_w4a4_ordering(family, better, worse):
    errors = mean_errors(family)
    assert errors[better] < errors[worse], errors


@pytest.mark.xfail(strict=False, reason=(
    "measured (bench/results/w8a8): clq 0.7-1.6% mean, half of RTN's 2.2-3.8%; what remains is the "
    "8-bit rounding of the heavy-tailed weights: clq-no-clps is as good, and GPTQ rounding brings "
    "it to 0.4-0.7% (test_w8a8_clq_gptq_within_one_percent)"))
@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_clq_within_one_percent(family):
    assert mean_errors(family, "w8a8", ("clq", "rtn"), (0,))["clq"] < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_clq_gptq_within_one_percent(family):
    assert mean_errors(family, "w8a8", ("clq+gptq",), (0,))["clq+gptq"] < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_clq_beats_rtn(family):
    errors = mean_errors(family, "w8a8", ("clq", "rtn"), (0,))
    assert errors["clq"] < errors["rtn"]
