"""bench/wgmma_waits.py: the wait_group reading, and the finding the README and kernel notes rest on."""

from __future__ import annotations

import pytest

from tests.bench.bench_scripts import import_bench
from tests.kernels.offline_builds import run_build

offline_compile, wgmma_waits = import_bench("offline_compile", "wgmma_waits")


def test_waits_counts_each_pending_count():
    ptx = ("wgmma.wait_group.sync.aligned 1;\n  wgmma.wait_group.sync.aligned  0;\n"
           "wgmma.wait_group.sync.aligned 1;\n wgmma.fence.sync.aligned;")
    assert wgmma_waits.waits(ptx) == {"0": 1, "1": 2}


@pytest.mark.skipif(not offline_compile.have_toolchain(), reason="this Triton wheel carries no ptxas / cuobjdump")
def test_triton_pipelines_bf16_and_e4m3_dots_but_not_int8(tmp_path):
    # If a Triton release starts pipelining int8 wgmma, this fails: then the integer GEMM's loop
    # can be pipelined too, and the README's Kernels section and bench/kernel-notes.md are stale.
    found = run_build("wgmma_waits.py", tmp_path / "waits.json", "--bare-only")
    rows = {r["operands"]: r["wait_group"] for r in found["rows"]}
    assert "1" in rows["bf16"] and "1" in rows["fp8e4nv"]
    assert rows["i8"] and set(rows["i8"]) == {"0"}
