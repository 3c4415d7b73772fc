"""The weight-only GEMM as sm_90 and sm_80 get it: compiled offline with Triton's bundled ptxas, no GPU.

Every configuration kernels/triton_weight_only.py ships for a launch (its list after its own pruning,
at M = 32 and M = 4096, K = N = 1152, bf16 x) must spill nothing, fit the shared memory a block may
claim and stay within the module's own estimate of it (the pruning relies on the estimate), and run
its 16-bit dots on tensor cores in the main loop: HGMMA (wgmma) or HMMA (mma.sync) on bf16, not FFMA.

The compiles run in a subprocess (`bench/weight_only_build.py --json`, tests/kernels/offline_builds.py).
"""

from __future__ import annotations

import pytest

from tests.bench.bench_scripts import import_bench
from tests.kernels.offline_builds import run_build

(offline_compile,) = import_bench("offline_compile")

pytestmark = pytest.mark.skipif(not offline_compile.have_toolchain(),
                                reason="this Triton wheel carries no ptxas / cuobjdump")

# A subset of bench/weight_only_build.py's full table, to keep the test short: per-channel 4- and
# 8-bit, grouped 3-bit weights with zero points and twin-log 4-bit weights on Hopper, grouped 4-bit
# ones on Ampere; M = 32 keeps every config that M = 1 keeps and one more.
BUILDS = (("sm_90", "w4a16,w8a16,w3a16_g128_zero,tlq4"), ("sm_80", "w4a16_g128_zero"))
TOKENS = "32,4096"


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> list[dict]:
    rows = []
    for target, variants in BUILDS:
        path = tmp_path_factory.mktemp("weight_only") / f"{target}.json"
        rows += run_build("weight_only_build.py", path, "--targets", target, "--variants", variants, "--tokens",
                          TOKENS)["binaries"]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    return rows


def _name(row: dict) -> str:
    return f"{row['target']} {row['variant']} M={row['M']} {row['config']}"


def test_no_config_spills(binaries):
    spilling = [f"{_name(b)}: {b['spill_bytes']} B at {b['registers']} registers" for b in binaries
                if b["spill_bytes"]]
    assert not spilling, f"weight-only GEMM configs that spill registers: {spilling}"


def test_configs_fit_shared_memory_within_their_estimate(binaries):
    too_big = [f"{_name(b)}: {b['shared_bytes']} B (limit {b['shared_limit']}, estimate {b['shared_estimate']})"
               for b in binaries if b["shared_bytes"] > min(b["shared_limit"], b["shared_estimate"])]
    assert not too_big, ("weight-only GEMM configs that need more shared memory than a block may use or than "
                         f"shared_memory_bytes estimates (the pruning would let them through): {too_big}")


def test_main_loop_runs_the_16_bit_dot_on_tensor_cores(binaries):
    wrong = [f"{_name(b)}: {b['mma']}, {b['main_loop_mma']} in the main loop" for b in binaries
             if not (b["mma"].split(".")[0] in ("HGMMA", "HMMA") and ".BF16" in b["mma"] and b["main_loop_mma"])]
    assert not wrong, f"weight-only GEMM configs whose main loop has no bf16 tensor-core MMA: {wrong}"


def test_hopper_uses_wgmma_where_a_warp_group_holds_64_weight_rows(binaries):
    # BLOCK_N = 64 weight rows per warp group (4 warps) is one wgmma M; those configs must not fall
    # back to mma.sync.
    fallback = [_name(b) for b in binaries if b["target"] == "sm_90" and b["num_warps"] % 4 == 0
                and b["BLOCK_N"] == 16 * b["num_warps"] and not b["mma"].startswith("HGMMA")]
    assert not fallback, f"sm_90 configs with 64 weight rows per warp group that run mma.sync: {fallback}"
