"""What the weight-only GEMM (kernels/triton_weight_only.py) compiles to, without a GPU.

    python bench/weight_only_build.py                      # sm_90 and sm_80, every variant, a table
                                                           # (kept in bench/results/weight-only-build.md)
    python bench/weight_only_build.py --targets sm_90 --json build.json

Every configuration the kernel module would try (its config list after its own pruning) for a
launch with bf16 x, per-channel scales, no zero point, no bias, bf16 out, at M = 1, 32 and 4096
(where the pruning keeps different tiles) on K = N = 1152, for each weight format, is compiled with
Triton's bundled ptxas (bench/offline_compile.py). Grouped weights with zero points (group 128)
are compiled too. Per binary: registers, spill bytes, shared memory against the module's own
estimate, the MMA instruction, the load kind, and the main loop's instructions, MMAs and
integer-ALU share per K tile. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

from offline_compile import TARGETS, Pointer, compile_kernel

from clq_compile.kernels import triton_weight_only as wo

SHAPE_NK = (1152, 1152)
TOKENS = (1, 32, 4096)
# (name, w_bits, group, zero point, twin-log codes)
VARIANTS = (("w4a16", 4, None, False, False), ("w8a16", 8, None, False, False), ("w3a16", 3, None, False, False),
            ("w4a16_g128_zero", 4, 128, True, False), ("w3a16_g128_zero", 3, 128, True, False),
            ("tlq4", 4, None, False, True), ("tlq3", 3, None, False, True))
MMA_FAMILIES = ("HGMMA", "HMMA")


def launch_args(m: int, n: int, k: int, w_bits: int, group: int | None, zero: bool, twin_log: bool = False) -> dict:
    g = group or k
    width = {4: k // 2, 8: k, 3: 3 * k // 8}[w_bits]
    return dict(x_ptr=Pointer("bf16"), w_ptr=Pointer("u8" if w_bits == 3 else "i8"), s_ptr=Pointer("fp32"),
                z_ptr=Pointer("i8") if zero else None, bias_ptr=None, out_ptr=Pointer("bf16"), M=m, N=n, K=k,
                stride_xm=k, stride_wn=width, stride_sn=4 if twin_log else k // g, stride_om=n, GROUP=g,
                M_BUCKET=wo.m_bucket(m), W_BITS=w_bits, HAS_ZERO=zero, HAS_BIAS=False, TWIN_LOG=twin_log)


def config_text(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"


def build(targets: tuple[str, ...], variants: tuple[str, ...], tokens: tuple[int, ...]) -> list[dict]:
    rows = []
    n, k = SHAPE_NK
    for target in targets:
        capability = TARGETS[target].capability
        for name, w_bits, group, zero, twin_log in VARIANTS:
            if name not in variants:
                continue
            for m in tokens:
                args = launch_args(m, n, k, w_bits, group, zero, twin_log)
                for cfg in wo.prune_configs(wo.CONFIGS, wo.m_bucket(m), group or k, k, w_bits, 2, capability):
                    binary = compile_kernel(wo._weight_only, args, target, cfg)
                    sass = binary.sass
                    loop = sass.main_loop
                    mma = loop.opcode_count(MMA_FAMILIES) if loop else 0
                    rows.append({
                        "target": target, "variant": name, "M": m, "config": config_text(cfg),
                        "BLOCK_N": cfg.kwargs["BLOCK_N"], "num_warps": cfg.num_warps,
                        "registers": binary.registers, "spill_bytes": binary.spill_bytes,
                        "shared_bytes": binary.shared_bytes, "shared_limit": binary.target.shared_limit,
                        "shared_estimate": wo.shared_memory_bytes(cfg, w_bits, 2),
                        "register_estimate": wo.register_estimate(cfg), "mma": sass.mma,
                        "load_kind": sass.load_kind, "main_loop_instructions": loop.count if loop else 0,
                        "main_loop_mma": mma, "main_loop_int_share": round(loop.int_alu_share, 3) if loop else 0.0,
                        "main_loop_k": cfg.kwargs["BLOCK_K"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"Offline compile, no GPU: Triton {triton.__version__}'s ptxas and cuobjdump "
             "(python bench/weight_only_build.py). N = K = 1152, bf16 x and out; regs and shared memory with the "
             "module's estimates in parentheses; main loop per K tile of BLOCK_K channels.", "",
             "| target | variant | M | config | regs (est.) | spill B | shared KB (est.) | MMA | loads | "
             "main loop: instr. / K tile, MMAs, int % |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['target']} | {r['variant']} | {r['M']} | {r['config']} | {r['registers']} "
                     f"({r['register_estimate']}) | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} "
                     f"({r['shared_estimate'] / 1024:.1f}) | {r['mma']} | {r['load_kind']} | "
                     f"{r['main_loop_instructions']}, {r['main_loop_mma']}, {100 * r['main_loop_int_share']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="sm_90,sm_80", help="comma-separated, from " + ", ".join(TARGETS))
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="comma-separated")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated values of M")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON instead of printing a table")
    opts = parser.parse_args()
    rows = build(tuple(opts.targets.split(",")), tuple(opts.variants.split(",")),
                 tuple(int(m) for m in opts.tokens.split(",")))
    if opts.json:
        opts.json.write_text(json.dumps({"binaries": rows}, indent=1))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
