"""Compile the specializations of the integer kernels for one GPU target, offline, and say which build.

    python bench/specializations.py [--targets sm_90] [--json PATH]

A Triton kernel is compiled once per specialization: each combination of its constexpr arguments
(bit widths, groups, zero points, bias, output and input dtypes, the activation transform) is its
own program, and a front end that refuses one of them does so only when that layer first runs.
`bench/kernel_model.py` builds the plain per-token launches for the model; this script builds a
covering set of the others the backend can launch (every constexpr value with each bit width, the
combinations that change the same code together, not the whole product), each with the first
config the kernel module ships for it (an autotuner's list after its own pruning, or the quantize
launch plan's tiling), at K = N = 1152 and M = 4096. Run it with another Triton first on
PYTHONPATH to check that version (tests/kernels/test_specializations.py does, with the lent GPU's).
Rows: kernel, the
specialization, and either the binary's MMA instruction, registers and spills or the error.
Nothing here runs a kernel or needs a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from typing import Any

import triton

from offline_compile import TARGETS, Pointer, autotune_configs, compile_kernel, have_toolchain

from clq_compile.kernels import triton_gemm, triton_quantize

M, N, K = 4096, 1152, 1152
GROUP = 128


def gemm_cases() -> Iterator[dict[str, Any]]:
    """Per bit widths: grouping x zero point (each changes the main loop), a bias (the epilogue);
    the other output dtypes once."""
    for a_bits, w_bits in ((4, 4), (8, 4), (8, 8)):
        for grouped in (False, True):
            for zero in (False, True):
                yield dict(a_bits=a_bits, w_bits=w_bits, grouped=grouped, zero=zero, bias=False, out="bf16")
        yield dict(a_bits=a_bits, w_bits=w_bits, grouped=True, zero=True, bias=True, out="bf16")
    for out in ("fp16", "fp32"):
        yield dict(a_bits=4, w_bits=4, grouped=False, zero=False, bias=True, out=out)


def gemm_launch(case: dict[str, Any], target: str) -> tuple[Any, dict[str, Any], triton.Config]:
    """The arguments `quant_matmul` passes for `case`, and the first config it would try."""
    a_bits, w_bits = case["a_bits"], case["w_bits"]
    group = GROUP if case["grouped"] else K
    chunk, meta = triton_gemm._launch_meta(K, group, group, a_bits, w_bits, case["zero"], case["bias"], False)
    args = dict(a_ptr=Pointer("i8"), w_ptr=Pointer("i8"), a_scale_ptr=Pointer("fp32"), w_scale_ptr=Pointer("fp32"),
                w_zero_ptr=Pointer("i8") if case["zero"] else None,
                bias_ptr=Pointer(case["out"]) if case["bias"] else None, out_ptr=Pointer(case["out"]),
                M=M, N=N, K=K, stride_am=K * a_bits // 8, stride_wn=K * w_bits // 8, stride_asm=K // group,
                stride_wsn=K // group, stride_om=N, A_GROUP=group, W_GROUP=group, CHUNK=chunk,
                M_BUCKET=triton_gemm.m_bucket(M), **meta)
    autotuner = triton_gemm._quant_matmul_sm90 if target == "sm_90" else triton_gemm._quant_matmul_sm80
    return triton_gemm._quant_matmul_kernel, args, autotune_configs(autotuner, args)[0]


def int_matmul_cases() -> Iterator[dict[str, Any]]:
    """The exact-accumulator tool `bench/kernel_check.py` compares with `torch._int_mm`, K whole and masked."""
    for a_bits, w_bits in ((4, 4), (8, 4), (8, 8)):
        yield dict(a_bits=a_bits, w_bits=w_bits)


def int_matmul_launch(case: dict[str, Any], target: str) -> tuple[Any, dict[str, Any], triton.Config]:
    a_bits, w_bits = case["a_bits"], case["w_bits"]
    args = dict(a_ptr=Pointer("i8"), w_ptr=Pointer("i8"), out_ptr=Pointer("i32"), M=M, N=N, K=K,
                stride_am=K * a_bits // 8, stride_wn=K * w_bits // 8, stride_om=N, A_BITS=a_bits, W_BITS=w_bits)
    block_k = max(triton_gemm.MIN_GPU_BLOCK_K, triton_gemm._small_block_k(K))
    cfg = triton.Config(dict(BLOCK_M=triton_gemm.SMALL_BLOCK_M, BLOCK_N=triton_gemm.SMALL_BLOCK_N, BLOCK_K=block_k))
    return triton_gemm._int_matmul_kernel, args, cfg


def quantize_cases() -> Iterator[dict[str, Any]]:
    """Bits x grouping x fused rotation on bf16 x; then each other input: a channel permutation
    (CLQ's swap, online on every CLQ layer), a multiplier (smoothing a producer could not absorb) and
    both, float16 and float32 x, strided x."""
    for bits in (4, 8):
        for grouped in (False, True):
            for rotation in (None, 128):
                yield dict(bits=bits, grouped=grouped, rotation=rotation, mul=False, perm=False, x="bf16",
                           contiguous=True)
    for rotation in (None, 128):
        for mul, perm in ((False, True), (True, False), (True, True)):
            yield dict(bits=4, grouped=False, rotation=rotation, mul=mul, perm=perm, x="bf16", contiguous=True)
        for x in ("fp16", "fp32"):
            yield dict(bits=4, grouped=False, rotation=rotation, mul=False, perm=False, x=x, contiguous=True)
    yield dict(bits=4, grouped=False, rotation=None, mul=False, perm=False, x="bf16", contiguous=False)


def quantize_launch(case: dict[str, Any], target: str) -> tuple[Any, dict[str, Any], triton.Config]:
    """The arguments `quantize_activation_triton` passes for `case`, with its launch plan's tiling."""
    bits, rotation = case["bits"], case["rotation"]
    group = GROUP if case["grouped"] else K
    # A float32 input, or any input with a multiplier, is split into three bf16 parts for the dot.
    split = 3 if case["x"] == "fp32" or case["mul"] else 1
    meta, _ = triton_quantize.launch_parameters(M, K, bits, group, rotation, case["mul"], case["perm"],
                                                case["contiguous"], split, 132)
    meta = dict(meta)
    cfg = triton.Config({}, num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    args = dict(x_ptr=Pointer(case["x"]), mul_ptr=Pointer("fp32") if case["mul"] else None,
                perm_ptr=Pointer("i64") if case["perm"] else None,
                rot_ptr=Pointer("fp32") if rotation else None,
                signs_ptr=Pointer("fp16" if case["x"] == "fp16" and split == 1 else "bf16") if rotation else None,
                q_ptr=Pointer("u8" if bits == 4 else "i8"), scale_ptr=Pointer("fp32"),
                stride_xm=K if case["contiguous"] else 1, stride_xk=1 if case["contiguous"] else M, **meta)
    return triton_quantize._quantize_kernel, args, cfg


KERNELS = {"gemm": (gemm_cases, gemm_launch), "int_matmul": (int_matmul_cases, int_matmul_launch),
           "quantize": (quantize_cases, quantize_launch)}


def _build_one(kernel: str, case: dict[str, Any], target: str) -> dict[str, Any]:
    """One specialization's row: built (MMA, registers, spills, shared memory) or its error."""
    row: dict[str, Any] = {"kernel": kernel, "case": case}
    try:
        fn, args, cfg = KERNELS[kernel][1](case, target)
        binary = compile_kernel(fn, args, target, cfg)
    except Exception as error:  # every failure is the row's result, not the script's end
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[-1500:]}")
    else:
        row.update(ok=True, config=str(cfg), mma=binary.sass.mma, registers=binary.registers,
                   spill_bytes=binary.spill_bytes, shared_bytes=binary.shared_bytes)
    return row


def build(target: str, workers: int) -> list[dict[str, Any]]:
    """Every specialization's row, in order, compiled by `workers` processes (ptxas and Triton's
    compiler each use one core)."""
    jobs = [(kernel, case, target) for kernel, (cases, _) in KERNELS.items() for case in cases()]
    if workers <= 1:
        return [_build_one(*job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_build_one, *zip(*jobs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="sm_90", choices=sorted(TARGETS), help="one target (the name its "
                        "sibling scripts use)")
    parser.add_argument("--json", help="write the rows here as JSON instead of printing them")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                        help="compiling processes (default: the cores, up to 4)")
    args = parser.parse_args(argv)
    if not have_toolchain():
        print("this Triton wheel has no ptxas / cuobjdump: nothing can be compiled", file=sys.stderr)
        return 2
    rows = build(args.targets, args.workers)
    result = {"triton": triton.__version__, "target": args.targets, "shape": [M, N, K], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    else:
        for row in rows:
            print(row["kernel"], row["case"], row.get("mma") or row.get("error"))
    failed = [r for r in rows if not r["ok"]]
    print(f"Triton {triton.__version__}, {args.targets}: {len(rows) - len(failed)} of {len(rows)} specializations "
          f"built", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
