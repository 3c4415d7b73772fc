"""Tests for bench/lease.py (rows, budget, config lists, the project import) and the lease plans of
bench/kernel_check.py and bench/kernels.py, walked without CUDA."""

import json
import subprocess
import sys

import pytest

from tests.bench.bench_scripts import BENCH, import_bench

# One call of bench/gpu_lease.sh must end within 8 minutes; installing takes some of it.
LEASE_SECONDS = 8 * 60
INSTALL_SECONDS = 60


@pytest.fixture(scope="module")
def modules():
    return import_bench("lease", "kernel_check", "kernels")


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_on_disk_as_soon_as_written(modules, tmp_path):
    lease, _, _ = modules
    rows = lease.Rows(tmp_path, "x", echo=None)
    rows.write("row", value=1)
    assert rows_of(tmp_path / "x.jsonl") == [{"kind": "row", "value": 1}]  # before close
    rows.write("row", value=2)
    rows.close()
    assert [r["value"] for r in rows_of(tmp_path / "x.jsonl")] == [1, 2]


def test_rows_go_to_OUT_without_out(modules, tmp_path, monkeypatch):
    lease, _, _ = modules
    monkeypatch.setenv("OUT", str(tmp_path / "lease-out"))
    assert lease.out_dir(None) == tmp_path / "lease-out"
    assert lease.out_dir(str(tmp_path / "given")) == tmp_path / "given"


def test_a_line_cut_off_by_the_end_of_a_lease_is_skipped(modules, tmp_path):
    lease, _, _ = modules
    (tmp_path / "kernels.jsonl").write_text('{"kind": "peaks", "int8_tops": 1, "bf16_tflops": 2, '
                                            '"copy_gbps": 3}\n{"kind": "ro')
    assert [r["kind"] for r in lease.read_rows(tmp_path / "kernels.jsonl")] == ["peaks"]
    assert any(line.startswith("peaks:") for line in lease.summary(tmp_path))


def test_budget(modules):
    lease, _, _ = modules
    assert lease.Budget(None).allows(1e9)
    assert lease.Budget(10).allows(5) and not lease.Budget(10).allows(11)


def test_limit_configs_shortens_the_lists_the_autotuners_hold(modules):
    lease, _, _ = modules

    class Kernels:
        A = [1, 2, 3]
        B = [4]

    held = Kernels.A
    assert lease.limit_configs(Kernels, ("A", "B", "missing"), 2) == {"A": 2, "B": 1}
    assert held == [1, 2]
    assert lease.limit_configs(Kernels, ("A",), None) == {"A": 2}


def test_the_project_imports_without_an_install(tmp_path):
    # -S skips site.py, so the editable install's finder is not there; torch & co. are on the
    # path given by hand.
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    code = (f"import sys; sys.path[:0] = {[str(BENCH), *site_packages]!r}; "
            "import lease; lease.import_project(); "
            "import clq_compile.kernels.packing as p, clq_compile.passes.capture as c; "
            "print(p.__file__); print(c.__file__)")
    found = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    root = str(BENCH.parent)
    assert all(line.startswith(root) for line in found.stdout.split())


# ---------------------------------------------------------------------------------------------
# the plans


def test_kernel_check_plan_covers_the_issue(modules):
    _, kernel_check, _ = modules
    cases = kernel_check.plan()
    assert {c.m for c in cases} == {1, 7, 1000, 4096}
    names = {c.variant.name for c in cases}
    assert {"w4a4", "w4a8", "w8a8", "w4a4_g128", "w4a4_rot128"} <= names
    assert {(c.n, c.k) for c in cases} >= {(1152, 1152), (4608, 1152), (1152, 4608)}


def test_kernels_lease_plan(modules, tmp_path):
    _, _, kernels = modules
    assert kernels.main(["--lease", "--dry-run", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path / "kernels.jsonl")
    plan = rows[0]
    assert plan["kind"] == "plan" and plan["lease"]
    assert all(n <= kernels.LEASE_CONFIGS for n in plan["configs"].values())
    shapes = {(r["M"], r["N"], r["K"]) for r in rows[1:]}
    assert shapes == {(m, n, k) for m in (4096, 16384) for n, k in ((1152, 1152), (3072, 3072), (12288, 3072))}
    for r in rows[1:]:
        assert {"bf16", "int8_mm", "fp8_rowwise", "w4a4", "w4a4_quantize", "w4a4_gemm"} <= set(r["variants"])


def test_the_lease_fits_in_eight_minutes(modules, tmp_path):
    _, kernel_check, kernels = modules
    assert kernel_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert kernels.main(["--lease", "--dry-run", "--out", str(tmp_path)]) == 0
    check = rows_of(tmp_path / "kernel_check.jsonl")[0]["estimate"]
    speed = rows_of(tmp_path / "kernels.jsonl")[0]["estimate"]
    assert check["compiles"] > 0 and speed["compiles"] > 0
    assert INSTALL_SECONDS + check["seconds"] + speed["seconds"] <= LEASE_SECONDS


def test_the_full_plan_would_not_fit(modules):
    # The estimate can fail: every shape with every config is what could not finish before.
    _, kernel_check, kernels = modules
    full = kernels.estimate(kernels.plan(False), 9)
    assert full["seconds"] > LEASE_SECONDS


def test_without_cuda_the_scripts_say_so(modules, tmp_path, capsys):
    _, kernel_check, kernels = modules
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is here")
    assert kernels.main(["--lease", "--out", str(tmp_path)]) == 2
    assert kernel_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_kernels_row_runs_its_variants_and_its_check(modules, monkeypatch):
    # Under Triton's interpreter on a tiny shape, with each timer replaced by one plain call: every
    # variant's arguments and the row's check run as they will on the GPU.
    _, _, kernels = modules
    pytest.importorskip("triton")
    from clq_compile.kernels import triton_quantize

    if not triton_quantize.interpreted():
        pytest.skip("the kernels were defined without TRITON_INTERPRET=1")

    def once(fn):
        fn()
        return 1.0

    monkeypatch.setattr(kernels, "median_ms", once)
    monkeypatch.setattr(kernels, "graph_ms", once)
    monkeypatch.setattr(kernels, "ROTATION_BLOCK", 32)
    row = kernels.time_row(33, 32, 64, {"int8_tops": 1.0, "copy_gbps": 1.0}, device="cpu")
    assert set(row["ms"]) | set(row["errors"]) == set(kernels.VARIANTS)
    # The CPU build of torch may lack FP8 products; everything else must have run.
    assert set(row["errors"]) <= {"fp8_rowwise"}, row["errors"]
    assert row["check"]["finite"] and row["check"]["rel_error"] <= 1e-2


def test_gpu_lease_refuses_an_unknown_argument_before_any_work(tmp_path):
    # A mistyped flag (say --dryrun) must not start a real lease run on the GPU.
    done = subprocess.run(["bash", str(BENCH / "gpu_lease.sh"), "--dryrun"], capture_output=True, text=True,
                          env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 2
    assert "unknown argument '--dryrun'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no log, no rows: nothing ran
