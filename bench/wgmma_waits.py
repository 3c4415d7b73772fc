"""Does Triton keep a Hopper wgmma in flight across K iterations?  Read from the PTX, no GPU needed.

    python bench/wgmma_waits.py                  # writes bench/results/wgmma-waits.json
    python bench/wgmma_waits.py --out /tmp/w.json

A pipelined main loop issues the next tile's wgmma before waiting for the previous one: its PTX
waits with `wgmma.wait_group.sync.aligned 1` inside the loop (one group still pending) and with 0
only after it. A loop that waits with 0 in every iteration serializes the tensor cores with the
loads and the epilogue of each tile. For each kernel compiled for sm_90 with the installed Triton
(bench/offline_compile.py), this counts the wait_group instructions by their pending count:

- a bare GEMM loop `acc = tl.dot(a, b, acc)` on int8 operands with an int32 accumulator, on bf16
  operands and on float8 e4m3 operands with float32 accumulators (128 x 128 tiles, 8 warps, 4 stages);
- the shipped W8A8 and W4A4 GEMM configs of kernels/triton_gemm.py at M = 4096, N = K = 3072.

Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import triton
import triton.language as tl

from offline_compile import Pointer, compile_kernel

RESULTS = Path(__file__).resolve().parent / "results"
WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


@triton.jit
def bare_gemm(a_ptr, b_ptr, c_ptr, M, N, K, INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """c = a · bᵀ for a [M, K], b [N, K] row-major, shapes multiples of the tiles: the plainest loop."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    b = b_ptr + rn[None, :] * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT else tl.float32)
    for _ in range(0, K, BLOCK_K):
        if INT:
            acc = tl.dot(tl.load(a), tl.load(b), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(tl.load(a), tl.load(b), acc)
        a += BLOCK_K
        b += BLOCK_K
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float32))


def waits(ptx: str) -> dict[str, int]:
    """{pending count: how many wait_group instructions name it}."""
    return dict(sorted(collections.Counter(WAIT.findall(ptx)).items()))


def bare_rows() -> list[dict]:
    rows = []
    for operands, block_k in (("i8", 128), ("bf16", 64), ("fp8e4nv", 128)):
        args = dict(a_ptr=Pointer(operands), b_ptr=Pointer(operands), c_ptr=Pointer("fp32"), M=4096, N=3072,
                    K=3072, INT=operands == "i8")
        config = triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k), num_warps=8, num_stages=4)
        binary = compile_kernel(bare_gemm, args, "sm_90", config)
        rows.append({"kernel": "bare_gemm", "operands": operands, "config": config.kwargs,
                     "num_stages": config.num_stages, "wait_group": waits(binary.ptx)})
    return rows


def shipped_rows() -> list[dict]:
    import kernel_model

    rows = []
    for a_bits, w_bits in ((8, 8), (4, 4)):
        launch = kernel_model.gemm_launch(4096, 3072, 3072, a_bits, w_bits, "sm_90")
        for config in launch.configs:
            binary = compile_kernel(launch.jit, launch.args, "sm_90", config)
            rows.append({"kernel": "quant_matmul", "variant": f"w{w_bits}a{a_bits}", "config": config.kwargs,
                         "num_stages": config.num_stages, "wait_group": waits(binary.ptx)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", "--json", type=Path, default=RESULTS / "wgmma-waits.json", help="the JSON written")
    parser.add_argument("--bare-only", action="store_true", help="only the bare loops (no project import)")
    args = parser.parse_args(argv)
    rows = bare_rows() + ([] if args.bare_only else shipped_rows())
    for row in rows:
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
