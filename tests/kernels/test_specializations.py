"""Every specialization of the integer kernels builds for sm_90, with this machine's Triton and with
the lent GPU's, and runs its products on tensor cores.

`bench/specializations.py` compiles a covering set of the constexpr combinations the backend can
launch (bit widths, groups, zero points, bias, output dtype; for the quantize kernel also the
multiplier, the channel permutation, the fused rotation, the input dtype and strides), each with
the first config the kernel module ships for it. A combination that only one layer kind reaches would
otherwise first be compiled on a GPU, inside a lease. Spills are reported in the rows, not held
here: the GEMM rows are each launch's first config, which the autotuner may pass over, and where a
quantize build spills is in bench/kernel-notes.md.
"""

from __future__ import annotations

import pytest

from tests.bench.bench_scripts import import_bench
from tests.kernels.offline_builds import DEVICE_TRITON, device_triton_missing, run_build

(offline_compile,) = import_bench("offline_compile")

pytestmark = pytest.mark.skipif(not offline_compile.have_toolchain(),
                                reason="this Triton wheel carries no ptxas / cuobjdump")


@pytest.fixture(scope="module", params=["installed", "device"])
def build(request, tmp_path_factory) -> dict:
    triton = None
    if request.param == "device":
        if device_triton_missing():
            pytest.skip(device_triton_missing())
        triton = DEVICE_TRITON
    out = tmp_path_factory.mktemp("specializations") / f"{request.param}.json"
    result = run_build("specializations.py", out, "--targets", "sm_90", triton=triton)
    result["which"] = request.param
    return result


def _name(row: dict) -> str:
    return f"{row['kernel']} {row['case']}"


def test_every_specialization_builds(build):
    failed = [f"{_name(r)}: {r['error']}" for r in build["rows"] if not r["ok"]]
    assert not failed, f"Triton {build['triton']}: {failed}"
    assert {r["kernel"] for r in build["rows"]} == {"gemm", "int_matmul", "quantize"}


def test_integer_products_run_on_int8_tensor_cores(build):
    wrong = [f"{_name(r)}: {r['mma']}" for r in build["rows"] if r["ok"] and r["kernel"] in ("gemm", "int_matmul")
             and not (r["mma"].startswith(("IGMMA.", "IMMA.")) and ".S8.S8" in r["mma"])]
    assert not wrong


def test_fused_rotations_run_on_tensor_cores(build):
    rotating = [r for r in build["rows"] if r["ok"] and r["kernel"] == "quantize" and r["case"]["rotation"]]
    assert rotating
    wrong = [f"{_name(r)}: {r['mma']}" for r in rotating if not r["mma"].startswith(("HMMA.", "HGMMA."))]
    assert not wrong

