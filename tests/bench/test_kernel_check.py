"""Tests for bench/kernel_check.py: its checks pass on the kernels, and fail on broken ones.

The checks run under Triton's interpreter on tiny shapes (conftest sets TRITON_INTERPRET=1).
"""

import pytest
import torch

pytest.importorskip("triton")

from clq_compile.kernels import triton_gemm, triton_linear, triton_quantize  # noqa: E402
from clq_compile.kernels.reference import quant_linear_reference  # noqa: E402

from tests.bench.bench_scripts import import_bench  # noqa: E402

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1", allow_module_level=True)

(kernel_check,) = import_bench("kernel_check")
TINY = {v.name: v for v in kernel_check.TINY_VARIANTS}


def results(case, seed=0):
    return {r["check"]: r for r in kernel_check.check_case(case, seed, "cpu")}


@pytest.mark.parametrize("name", ["w4a4", "w4a4_g32", "w8a8", "w4a4_rot32", "w4a4_asym_g32"])
def test_the_kernels_pass(name):
    found = results(kernel_check.Case(TINY[name], 7, 48, 64), seed=3)
    for check in ("layer", "quantize", "integer", "nan"):
        assert found[check]["ok"], found[check]


@pytest.mark.parametrize("name", ["fp8", "w4a16", "w8a16", "w3a16"])
def test_the_modes_without_an_integer_gemm_pass_their_checks(name):
    found = results(kernel_check.Case(TINY[name], 7, 48, 64), seed=3)
    assert set(found) == {"layer", "nan"}
    assert found["layer"]["ok"] and found["nan"]["ok"], found


def test_a_wrong_weight_only_kernel_fails_the_layer_check(monkeypatch):
    from clq_compile.kernels import triton_weight_only

    original = triton_weight_only.weight_only_matmul

    def one_row_off(*args, **kwargs):
        out = original(*args, **kwargs)
        out[:, 0] *= 2
        return out

    monkeypatch.setattr(triton_linear, "weight_only_matmul", one_row_off)
    assert not results(kernel_check.Case(TINY["w4a16"], 7, 48, 64))["layer"]["ok"]


def test_a_wrong_accumulator_fails_the_integer_check(monkeypatch):
    original = triton_gemm.quant_matmul

    def off_by_one(*args):
        out = original(*args)
        out[-1, -1] += 1
        return out

    monkeypatch.setattr(triton_gemm, "quant_matmul", off_by_one)
    found = results(kernel_check.Case(TINY["w4a4"], 7, 48, 64))
    assert not found["integer"]["ok"]


def test_an_unwritten_output_fails_the_layer_check(monkeypatch):
    original = triton_linear.quant_linear_triton

    def forgets_a_row(x, *args):
        out = original(x, *args)
        out[0] = float("nan")
        return out

    monkeypatch.setattr(triton_linear, "quant_linear_triton", forgets_a_row)
    found = results(kernel_check.Case(TINY["w4a4"], 7, 48, 64))
    assert not found["layer"]["ok"] and not found["layer"]["finite"]


def test_a_wrong_layer_fails_the_layer_check(monkeypatch):
    original = triton_linear.quant_linear_triton
    monkeypatch.setattr(triton_linear, "quant_linear_triton", lambda x, *args: original(x, *args) * 1.05)
    assert not results(kernel_check.Case(TINY["w4a4"], 7, 48, 64))["layer"]["ok"]


def test_the_nan_check_passes_on_an_op_that_propagates_nan(monkeypatch):
    monkeypatch.setattr(triton_linear, "quant_linear_triton", quant_linear_reference)
    assert results(kernel_check.Case(TINY["w4a4"], 7, 48, 64))["nan"]["ok"]


def test_the_nan_check_fails_on_an_op_that_clamps_nan(monkeypatch):
    monkeypatch.setattr(triton_linear, "quant_linear_triton",
                        lambda x, *args: quant_linear_reference(torch.nan_to_num(x), *args))
    assert not results(kernel_check.Case(TINY["w4a4"], 7, 48, 64))["nan"]["ok"]


def test_main_streams_rows_and_fails_when_a_check_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_check, "plan", lambda tiny: [kernel_check.Case(TINY["w4a4"], 7, 48, 64)])
    monkeypatch.setattr(triton_linear, "quant_linear_triton", quant_linear_reference)
    assert kernel_check.main(["--interpret", "--out", str(tmp_path)]) == 0
    original = triton_gemm.quant_matmul
    monkeypatch.setattr(triton_gemm, "quant_matmul", lambda *a: original(*a) + 1)
    assert kernel_check.main(["--interpret", "--out", str(tmp_path)]) == 1
    text = (tmp_path / "kernel_check.jsonl").read_text()
    assert '"checks": "passed"' in text and '"checks": "FAILED"' in text
