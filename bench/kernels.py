"""Speed of the W4A4 / W8A8 / FP8 / W4A16 layers against cuBLAS bf16, cuBLAS int8 and FP8, one row at a time.

    python bench/kernels.py --lease [--out DIR]   # the lease plan: fits a GPU lease (bench/README.md)
    python bench/kernels.py [--out DIR]           # every DiT shape at M = 1024, 4096, 16384
    python bench/kernels.py --lease --dry-run     # the plan, its compiles and minutes; needs no CUDA

For each M x (N, K) of the plan, on one CUDA GPU, in the same process:

- bf16:          F.linear, bfloat16 activations and weights (cuBLAS)
- int8_mm:       torch._int_mm on int8 operands already quantized (cuBLAS, W8A8's GEMM alone)
- fp8_rowwise:   torch._scaled_mm on e4m3 operands already quantized, per-row / per-column scales
- w4a4, w8a8:    the whole quantized layer: activation-quantize kernel + integer GEMM
- w4a4_rot128:   the same with CLQ's online transform (channel multiplier, gather, 128-block rotation)
- w4a4_quantize, w4a4_gemm: the two kernels of w4a4 on their own
- fp8:           the whole `bits="fp8"` layer: per-token e4m3 quantize (torch) + torch._scaled_mm
- w4a16:         the whole `bits="w4a16"` layer: the Triton weight-only GEMM, bf16 activations

each timed with triton.testing.do_bench (median; it flushes L2 between runs) and as CUDA-graph
replay (median), which hides launch gaps. Each row also gives ratios to bf16, int8_mm and
fp8_rowwise, the quantize kernel's GB/s (bf16 x read once, packed x and scales written once)
against a device-to-device copy measured at the start, the GEMM's integer TOPS (2·M·N·K) against
torch._int_mm's on an 8192³ product measured at the start, the autotune configs chosen so far,
and a check of w4a4's output against a float64 product of its quantized operands (relative error
<= 1e-2, all finite) that fails the run when it fails.

Rows are JSON lines in <out>/kernels.jsonl, written as each finishes (bench/lease.py); `--lease`
keeps the first two autotune configs of each list and stops before its time budget.
"""

from __future__ import annotations

import argparse
import sys

import kernel_check
import lease

LEASE_TOKENS = (4096, 16384)
LEASE_SHAPES = ((1152, 1152), (3072, 3072), (12288, 3072))
# (N, K): PixArt / DiT-XL attention q/k/v/out, fused qkv, MLP up (4x) and down; Flux attention,
# MLP up and down.
FULL_TOKENS = (1024, 4096, 16384)
FULL_SHAPES = ((1152, 1152), (3456, 1152), (4608, 1152), (1152, 4608), (3072, 3072), (12288, 3072),
               (3072, 12288))
VARIANTS = ("bf16", "int8_mm", "fp8_rowwise", "w4a4", "w8a8", "w4a4_rot128", "w4a4_quantize", "w4a4_gemm", "fp8",
            "w4a16")
LEASE_CONFIGS = 2
PEAK_SIZE = 8192
COPY_BYTES = 2**30
ROTATION_BLOCK = 128
CHECK_ROWS = 512
# Planning figures for --dry-run (bench/kernel_check.py has the compile figure): one timing is
# do_bench's 25 ms warm-up and 100 ms of runs plus the L2 flushes, twice (direct and graph).
TIMING_SECONDS = 0.4
PEAK_SECONDS = 5.0
# A row's timings, the same for every shape, for the budget check (its compiles are not known
# before it runs: Triton's cache may hold them).
ROW_SECONDS = len(VARIANTS) * TIMING_SECONDS


def plan(lease_plan: bool) -> list[tuple[int, int, int]]:
    tokens, shapes = (LEASE_TOKENS, LEASE_SHAPES) if lease_plan else (FULL_TOKENS, FULL_SHAPES)
    return [(m, n, k) for m in tokens for n, k in shapes]


def estimate(rows: list[tuple[int, int, int]], gemm_configs: int) -> dict:
    """Compiles and seconds, assuming kernels specialized on every K (the worst case).

    The quantize kernel does not autotune: it compiles one binary per launch plan, which depends
    on M and K."""
    ks = {k for _, _, k in rows}
    launches = len({(m, k) for m, _, k in rows})
    # GEMM: w4a4, w8a8 and the weight-only w4a16 per K; quantize: 4-bit, 8-bit and 4-bit rotated per K
    # (per M and K untuned). fp8 runs on cuBLASLt: nothing to compile.
    compiles = len(ks) * 3 * gemm_configs + launches * 3
    trials = len(rows) * 3 * gemm_configs
    seconds = (compiles * kernel_check.COMPILE_SECONDS + trials * kernel_check.TRIAL_SECONDS
               + len(rows) * len(VARIANTS) * TIMING_SECONDS + PEAK_SECONDS)
    return {"rows": len(rows), "compiles": compiles, "autotune_trials": trials, "seconds": round(seconds)}


# ---------------------------------------------------------------------------------------------
# timing (CUDA only; torch and the kernels are imported by main)


def median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn) -> float:
    """Median replay time of a CUDA graph holding one call of fn (already warm and tuned)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def measured_peaks() -> dict:
    """int8 TOPS of torch._int_mm, bf16 TFLOP/s of F.linear (8192³), copy GB/s (read + write)."""
    import torch
    import torch.nn.functional as F

    s = PEAK_SIZE
    a, b = (torch.randint(-128, 128, (s, s), dtype=torch.int8, device="cuda") for _ in range(2))
    xa, xb = (torch.randn(s, s, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    ops = 2 * s**3
    return {"int8_tops": ops / median_ms(lambda: torch._int_mm(a, b.t())) / 1e9,
            "bf16_tflops": ops / median_ms(lambda: F.linear(xa, xb)) / 1e9,
            "copy_gbps": 2 * COPY_BYTES / median_ms(lambda: dst.copy_(src)) / 1e6,
            "measured_with": f"torch._int_mm and F.linear {s}^3, a {COPY_BYTES >> 20} MiB float32 copy; "
                             f"do_bench medians on random data"}


def _tuned_configs() -> dict[str, dict[str, str]]:
    """{autotuned kernel: {key: chosen config}} of every autotuner in the kernel modules."""
    from triton.runtime.autotuner import Autotuner

    from clq_compile.kernels import triton_gemm

    return {f"triton_gemm.{name}": {str(k): str(c) for k, c in obj.cache.items()}
            for name, obj in vars(triton_gemm).items() if isinstance(obj, Autotuner) and obj.cache}


def time_row(m: int, n: int, k: int, peaks: dict, device: str = "cuda") -> dict:
    """One row of the plan (see the module docstring); `device` is "cpu" only in tests, under
    Triton's interpreter."""
    import torch
    import torch.nn.functional as F

    from clq_compile.kernels.formats import get_format
    from clq_compile.kernels.hadamard import normalized_hadamard
    from clq_compile.kernels.packing import pack_weight
    from clq_compile.kernels.quantize import quantize, quantize_activation
    from clq_compile.kernels.triton_gemm import quant_matmul
    from clq_compile.kernels.triton_linear import quant_linear_triton
    from clq_compile.kernels.triton_quantize import quantize_activation_triton

    g = torch.Generator().manual_seed(m * 7 + n * 3 + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w16 = w.to(device, torch.bfloat16)
    layers = {}
    for bits in (4, 8):
        quantized = quantize(w, bits)
        stored = pack_weight(quantized)
        layers[bits] = (quantized, stored.qweight.to(device), stored.scale.to(device))
    e4m3 = pack_weight(quantize(w, get_format("e4m3")))
    f8_weight, f8_scale = e4m3.qweight.to(device), e4m3.scale.to(device)
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    a_f8 = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    w_f8 = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, 1, device=device) + 0.5, torch.rand(1, n, device=device) + 0.5
    mul = torch.rand(k, device=device) + 0.5
    perm = torch.randperm(k, device=device)
    rot = normalized_hadamard(ROTATION_BLOCK).to(device)

    def layer(bits: int, transform: tuple = (None, None, None)):
        _, qweight, scale = layers[bits]
        return lambda: quant_linear_triton(x, qweight, scale, None, None, *transform, k, f"int{bits}", f"int{bits}",
                                           0, 0)

    xq, x_scale = quantize_activation_triton(x, 4)
    fns = {
        "bf16": lambda: F.linear(x, w16),
        # w8 [n, k] transposed is the column-major [k, n] operand cuBLAS's int8 path wants.
        "int8_mm": lambda: torch._int_mm(a8, w8.t()),
        "fp8_rowwise": lambda: torch._scaled_mm(a_f8, w_f8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
        "w4a4": layer(4),
        "w8a8": layer(8),
        "w4a4_rot128": layer(4, (mul, perm, rot)),
        "w4a4_quantize": lambda: quantize_activation_triton(x, 4),
        "w4a4_gemm": lambda: quant_matmul(xq, x_scale, layers[4][1], layers[4][2], None, None, k, 4, 4, 0, 0,
                                          torch.bfloat16),
        "fp8": lambda: quant_linear_triton(x, f8_weight, f8_scale, None, None, None, None, None, k, "e4m3", "e4m3",
                                           0, 0),
        "w4a16": lambda: quant_linear_triton(x, layers[4][1], layers[4][2], None, None, None, None, None, k, "int4",
                                             "none", 0, 0),
    }
    ms, graph, errors = {}, {}, {}
    for name, fn in fns.items():
        try:
            ms[name] = median_ms(fn)
            graph[name] = graph_ms(fn)
        except Exception as error:  # one failing variant is reported, the others still run
            errors[name] = f"{type(error).__name__}: {error}"

    # w4a4's output on the timed input, against float64 on its quantized operands
    out = fns["w4a4"]()[:CHECK_ROWS]
    xa = quantize_activation(x[:CHECK_ROWS].float(), 4)
    ref = kernel_check._dequantize64(xa) @ kernel_check._dequantize64(layers[4][0]).to(device).t()
    finite = bool(torch.isfinite(out).all())
    rel = kernel_check._rel(out, ref)

    ops = 2 * m * n * k
    quant_bytes = m * k * 2 + m * k // 2 + m * 4
    best = {name: min(t, graph.get(name, t)) for name, t in ms.items()}

    def ratio(base: str) -> dict:
        return {name: best[base] / t for name, t in best.items() if name != base} if base in best else {}

    tops = {name: ops / best[name] / 1e9 for name in ("int8_mm", "w4a4", "w8a8", "w4a4_gemm", "fp8") if name in best}
    return {
        "M": m, "N": n, "K": k, "ms": ms, "graph_ms": graph, "errors": errors,
        "speedup_vs_bf16": ratio("bf16"), "speedup_vs_int8_mm": ratio("int8_mm"),
        "speedup_vs_fp8_rowwise": ratio("fp8_rowwise"),
        "tops": tops, "fraction_of_int8_peak": {name: t / peaks["int8_tops"] for name, t in tops.items()},
        "quantize_gbps": quant_bytes / best["w4a4_quantize"] / 1e6 if "w4a4_quantize" in best else None,
        "quantize_fraction_of_copy": (quant_bytes / best["w4a4_quantize"] / 1e6 / peaks["copy_gbps"]
                                      if "w4a4_quantize" in best else None),
        "check": {"ok": finite and rel <= kernel_check.TOL and not errors, "rel_error": rel, "finite": finite,
                  "rows_checked": out.shape[0]},
        "autotuned": _tuned_configs(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", action="store_true",
                        help="M = 4096, 16384 on three shapes, two autotune configs per list, a time budget")
    parser.add_argument("--dry-run", action="store_true", help="walk the plan and estimate it; needs no CUDA")
    parser.add_argument("--out", help="folder for kernels.jsonl (default $OUT, else bench/results/lease)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting rows after this many seconds (default 300 with --lease)")
    args = parser.parse_args(argv)
    lease.import_project()
    rows = lease.Rows(lease.out_dir(args.out), "kernels")

    import torch
    from clq_compile.kernels import triton_gemm, triton_weight_only

    keep = LEASE_CONFIGS if args.lease else None
    kept_gemm = lease.limit_configs(triton_gemm, kernel_check.GEMM_LISTS, keep)
    kept_gemm.update({f"weight_only.{name}": n for name, n in
                      lease.limit_configs(triton_weight_only, kernel_check.WEIGHT_ONLY_LISTS, keep).items()})
    shapes = plan(args.lease)
    budget = lease.Budget(args.budget_s or (300.0 if args.lease else None))
    rows.write("plan", dry_run=args.dry_run, lease=args.lease, configs=kept_gemm,
               estimate=estimate(shapes, max(kept_gemm.values(), default=9)),
               budget_s=budget.seconds, machine=lease.machine())
    if args.dry_run:
        for m, n, k in shapes:
            rows.write("row", dry_run=True, M=m, N=n, K=k, variants=list(VARIANTS))
        return 0
    if not torch.cuda.is_available():
        print("kernels.py: no CUDA GPU here, nothing to time. --dry-run shows the plan; "
              "python bench/kernel_check.py --interpret checks the kernels on the CPU.", file=sys.stderr)
        return 2
    peaks = measured_peaks()
    rows.write("peaks", **peaks)
    failed = 0
    for m, n, k in shapes:
        if not budget.allows(ROW_SECONDS):
            rows.write("row", M=m, N=n, K=k, skipped=f"out of time after {budget.elapsed():.0f} s")
            continue
        try:
            row = time_row(m, n, k, peaks)
        except Exception as error:  # a crashed row is reported and the next one runs
            row = {"M": m, "N": n, "K": k, "check": {"ok": False}, "errors": {"row": f"{type(error).__name__}: {error}"}}
        failed += not row["check"]["ok"]
        rows.write("row", **row)
        _print_row(row)
    rows.write("summary", failed=failed, seconds=round(budget.elapsed()))
    rows.close()
    return 1 if failed else 0


def _print_row(row: dict) -> None:
    up = row.get("speedup_vs_bf16", {})
    cells = " ".join(f"{name}={up[name]:.2f}x" for name in ("w4a4", "w8a8", "fp8", "w4a16", "int8_mm", "fp8_rowwise")
                     if name in up)
    print(f"M={row['M']} N={row['N']} K={row['K']} vs bf16: {cells} check={'ok' if row['check']['ok'] else 'FAILED'}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
