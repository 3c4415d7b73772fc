"""The kernels as Hopper (sm_90) gets them: compiled offline with Triton's bundled ptxas, no GPU needed.

Every GEMM config the kernel module ships for sm_90 (its list after its own pruning, at K = 3072 where
the widest K tiles survive) must use int8 wgmma, spill nothing and fit the 227 KB of shared memory a
block may claim; the W4A4 main loop may take at most twice the instructions per K of the W8A8 one (the
nibble unpack is to cost little next to the MMAs); the activation quantize kernel divides once per
row, not per element, and rotates on tensor cores or with a butterfly, not with an FFMA dot.

The compiles run in a subprocess (`bench/kernel_model.py --json`, tests/kernels/offline_builds.py).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.bench.bench_scripts import import_bench
from tests.kernels.offline_builds import run_build

(offline_compile,) = import_bench("offline_compile")

pytestmark = pytest.mark.skipif(not offline_compile.have_toolchain(),
                                reason="this Triton wheel carries no ptxas / cuobjdump")

SHAPE = "1024,3072,3072"
ROTATION_BLOCK = 128


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("sm90") / "build.json"
    return run_build("kernel_model.py", path, "--targets", "sm_90", "--shapes", SHAPE, "--variants",
                     "w4a4,w8a8,a4_rot128")["binaries"]


def _gemms(binaries: list[dict]) -> list[dict]:
    rows = [b for b in binaries if b["kernel"] == "gemm"]
    assert rows, "no GEMM binary was built"
    return rows


def _name(row: dict) -> str:
    return f"{row['variant']} {row['config']}"


def test_gemm_configs_use_int8_wgmma(binaries):
    wrong = [f"{_name(b)}: {b['mma']}" for b in _gemms(binaries)
             if not (b["mma"].startswith("IGMMA.") and b["mma"].endswith(".S8.S8"))]
    assert not wrong, f"sm_90 GEMM configs without IGMMA s8: {wrong}"


def test_gemm_configs_do_not_spill(binaries):
    spilling = [f"{_name(b)}: {b['spill_bytes']} B at {b['registers']} registers" for b in _gemms(binaries)
                if b["spill_bytes"]]
    assert not spilling, f"sm_90 GEMM configs that spill registers: {spilling}"


def test_gemm_configs_fit_shared_memory(binaries):
    limit = offline_compile.TARGETS["sm_90"].shared_limit
    too_big = [f"{_name(b)}: {b['shared_bytes']} B" for b in _gemms(binaries) if b["shared_bytes"] > limit]
    assert not too_big, (f"sm_90 GEMM configs shipped that need more than the {limit} B of shared memory a "
                         f"block may use (prune them before compiling): {too_big}")


def test_w4a4_main_loop_at_most_twice_w8a8(binaries):
    per_k = {(b["variant"], json.dumps(b["config"], sort_keys=True)): b["main_loop_instructions_per_k128"]
             for b in _gemms(binaries)}
    ratios = {cfg: per_k[("w4a4", cfg)] / per_k[("w8a8", cfg)] for v, cfg in per_k
              if v == "w4a4" and ("w8a8", cfg) in per_k}
    assert ratios, "no config was built for both W4A4 and W8A8"
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 2, (f"the W4A4 GEMM main loop takes {ratios[worst]:.1f}x the SASS instructions per "
                                f"K of the W8A8 one (config {worst}); at most 2x")


def _quantize(binaries: list[dict]) -> list[dict]:
    rows = [b for b in binaries if b["kernel"] == "quantize"]
    assert rows, "no quantize binary was built"
    return rows


def test_quantize_has_no_per_element_division(binaries):
    # A scale per row costs one division per row a thread holds, i.e. a small fraction of one per
    # element; a quotient per element costs at least one.
    dividing = [f"{_name(b)}: {b['divisions_per_element']} per element" for b in _quantize(binaries)
                if b["divisions_per_element"] > 0.25]
    assert not dividing, f"the quantize kernel divides per element on sm_90: {dividing}"


def test_quantize_rotation_on_tensor_cores_or_butterfly(binaries):
    # A butterfly over b channels takes log2(b) additions per element; a dot on CUDA cores b FFMAs.
    limit = math.log2(ROTATION_BLOCK)
    slow = [f"{_name(b)}: {b['ffma_per_element']} FFMA per element, MMA {b['mma']}" for b in _quantize(binaries)
            if b["mma"] == "none" and b["ffma_per_element"] > limit]
    assert not slow, (f"the 128-channel rotation runs as an FFMA dot (more than log2(128) = {limit:.0f} FFMA per "
                      f"element without tensor cores): {slow}")
