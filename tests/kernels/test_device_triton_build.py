"""The kernels as the lent H200 builds them: its Triton (3.6), not this machine's, compiling for sm_90.

A GPU lease is fifteen minutes a session; a kernel that this machine's Triton compiles and the
device's refuses would spend all of them on a traceback (Triton 3.6 checks an int8 dot's
accumulator against `out_dtype`, where 3.9 takes the accumulator's own type). So every GEMM,
activation-quantize and weight-only config is compiled here with the device's Triton, offline:
each must build, run its products on tensor cores (IGMMA s8 for the integer GEMM, HGMMA / HMMA on
bf16 for the others) and fit the shared memory a block may claim. Spills are not asserted: Triton
3.6 allocates registers differently and spills in a few configs that 3.9 does not
(bench/kernel-notes.md); the autotuner times every config on the device, so a spilling one costs
time, not correctness.

Every other specialization of the kernels is built the same way by tests/kernels/test_specializations.py.
How the device's Triton is found: tests/kernels/offline_builds.py.
"""

from __future__ import annotations

import pytest

from tests.bench.bench_scripts import import_bench
from tests.kernels.offline_builds import DEVICE_TRITON, DEVICE_TRITON_VERSION, device_triton_missing, run_build

(offline_compile,) = import_bench("offline_compile")

pytestmark = pytest.mark.skipif(device_triton_missing() is not None, reason=device_triton_missing() or "")


@pytest.fixture(scope="module")
def model_build(tmp_path_factory) -> dict:
    return run_build("kernel_model.py", tmp_path_factory.mktemp("device") / "model.json", "--targets", "sm_90",
                     "--shapes", "1024,3072,3072", "--variants", "w4a4,w8a8,a4_rot128", triton=DEVICE_TRITON)


@pytest.fixture(scope="module")
def weight_only_build(tmp_path_factory) -> dict:
    return run_build("weight_only_build.py", tmp_path_factory.mktemp("device") / "weight_only.json", "--targets",
                     "sm_90", "--variants", "w4a16,w3a16_g128_zero,tlq4", "--tokens", "32,4096", triton=DEVICE_TRITON)


def test_the_build_used_the_device_triton(model_build):
    assert model_build["triton"] == DEVICE_TRITON_VERSION


def test_every_gemm_config_builds_on_int8_wgmma(model_build):
    gemms = [b for b in model_build["binaries"] if b["kernel"] == "gemm"]
    assert {b["variant"] for b in gemms} == {"w4a4", "w8a8"}
    wrong = [f"{b['variant']} {b['config']}: {b['mma']}" for b in gemms
             if not (b["mma"].startswith("IGMMA.") and b["mma"].endswith(".S8.S8"))]
    assert not wrong, f"GEMM configs without IGMMA s8 under Triton {DEVICE_TRITON_VERSION}: {wrong}"


def test_the_rotating_quantize_kernel_rotates_on_tensor_cores(model_build):
    quantize = [b for b in model_build["binaries"] if b["kernel"] == "quantize"]
    assert quantize
    assert all(b["mma"].startswith(("HMMA.", "HGMMA.")) for b in quantize), [b["mma"] for b in quantize]


def test_weight_only_configs_build_on_tensor_cores(weight_only_build):
    rows = weight_only_build["binaries"]
    assert {r["variant"] for r in rows} == {"w4a16", "w3a16_g128_zero", "tlq4"}
    wrong = [f"{r['variant']} M={r['M']} {r['config']}: {r['mma']}" for r in rows
             if not r["mma"].startswith(("HMMA.", "HGMMA."))]
    assert not wrong


def test_every_config_fits_shared_memory(model_build, weight_only_build):
    limit = offline_compile.TARGETS["sm_90"].shared_limit
    too_big = [f"{b.get('variant')} {b['config']}: {b['shared_bytes']} B"
               for b in model_build["binaries"] + weight_only_build["binaries"] if b["shared_bytes"] > limit]
    assert not too_big
