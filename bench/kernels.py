"""Speed of the Triton W4A4 / W8A8 kernels against bfloat16 and int8 cuBLAS.

    python bench/kernels.py            # all shapes
    python bench/kernels.py --quick    # M = 4096 and three (N, K) only

On a CUDA GPU, for every M in (1024, 4096, 16384) tokens and every (N, K) of the linears of
PixArt / DiT-XL (width 1152) and Flux (width 3072), it times with triton.testing.do_bench (median):

- bf16:          F.linear on bfloat16 activations and weights (cuBLAS)
- int8_mm:       torch._int_mm on int8 operands already quantized (cuBLAS, the integer ceiling)
- w4a4, w8a8:    the whole quantized layer (activation-quantize kernel + integer GEMM)
- w4a4_rot128:   the same with the online 128-channel block rotation of CLQ's smoothing
- w4a4_quantize, w4a4_gemm: the two kernels of w4a4 on their own

and reports each time's ratio to bf16 and to int8_mm, measured in the same run, and the achieved
integer TOPS (2·M·N·K per call) against an int8 peak measured here with torch._int_mm on a large
square product. Before timing, the kernels are checked against the torch reference (on CPU) at a
small M. Results go to bench/results/kernels-<gpu>.json with the machine they ran on.

Without a GPU there is nothing to time: the script says so, runs the kernels under Triton's
interpreter on a few tiny shapes against the reference, and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are imported (triton.jit reads it when they are defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from clq_compile.kernels.hadamard import normalized_hadamard  # noqa: E402
from clq_compile.kernels.packing import pack_weight  # noqa: E402
from clq_compile.kernels.quantize import quantize  # noqa: E402
from clq_compile.kernels.reference import quant_linear_reference  # noqa: E402
from clq_compile.kernels.triton_gemm import quant_matmul  # noqa: E402
from clq_compile.kernels.triton_linear import quant_linear_triton  # noqa: E402
from clq_compile.kernels.triton_quantize import quantize_activation_triton  # noqa: E402

TOKENS = (1024, 4096, 16384)
# (N, K): PixArt / DiT-XL attention q/k/v/out, fused qkv, MLP up (4x) and down; Flux attention,
# MLP up and down.
SHAPES = ((1152, 1152), (3456, 1152), (4608, 1152), (1152, 4608), (3072, 3072), (12288, 3072), (3072, 12288))
QUICK_TOKENS = (4096,)
QUICK_SHAPES = ((1152, 1152), (4608, 1152), (3072, 12288))
PEAK_SIZE = 8192
CHECK_TOKENS = 256
ROTATION_BLOCK = 128
RESULTS = Path(__file__).resolve().parent / "results"


def quantized_layer(n: int, k: int, bits: int, device: str, seed: int = 0) -> dict:
    """A random [n, k] weight quantized symmetric per channel, as the op's tensors."""
    g = torch.Generator().manual_seed(seed)
    stored = pack_weight(quantize(torch.randn(n, k, generator=g) / k**0.5, bits))
    return {"qweight": stored.qweight.to(device), "w_scale": stored.scale.to(device), "w_zero": None}


def linear_args(x: torch.Tensor, layer: dict, w_bits: int, a_bits: int,
                rotation: torch.Tensor | None) -> tuple:
    """The arguments of quant_linear_triton / quant_linear_reference: no bias, per-token scales."""
    return (x, layer["qweight"], layer["w_scale"], layer["w_zero"], None, None, None, rotation, x.shape[-1],
            w_bits, a_bits, 0, 0)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check_against_reference(m: int, n: int, k: int, device: str) -> list[dict]:
    """Kernel vs torch reference (computed on CPU, the oracle) for each bit width, at m tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    rows = []
    for name, w_bits, a_bits, block in (("w4a4", 4, 4, None), ("w4a4_rot128", 4, 4, ROTATION_BLOCK),
                                        ("w4a8", 4, 8, None), ("w8a8", 8, 8, None)):
        if block is not None and k % block:
            continue
        layer = quantized_layer(n, k, w_bits, "cpu")
        rotation = normalized_hadamard(block) if block else None
        ref = quant_linear_reference(*linear_args(x, layer, w_bits, a_bits, rotation))
        on_device = {key: t.to(device) if t is not None else None for key, t in layer.items()}
        out = quant_linear_triton(*linear_args(x.to(device), on_device, w_bits, a_bits,
                                               rotation.to(device) if rotation is not None else None)).cpu()
        rows.append({"M": m, "N": n, "K": k, "bits": name, "rel_error": rel_error(out, ref),
                     "equal_fraction": float((out == ref).float().mean())})
    return rows


def interpreter_pass() -> int:
    """The kernels under the interpreter against the reference on tiny shapes; 0 if they agree."""
    print("no CUDA GPU: nothing to time. Checking the kernels under Triton's interpreter instead.")
    worst = 0.0
    for m, n, k in ((33, 40, 128), (17, 24, 256)):
        for row in check_against_reference(m, n, k, "cpu"):
            worst = max(worst, row["rel_error"])
            print(f"  M={m:3d} N={n:3d} K={k:4d} {row['bits']:12s} relative error {row['rel_error']:.2e}, "
                  f"{100 * row['equal_fraction']:.1f}% of outputs bit-equal")
    # bfloat16 outputs: a last-bit difference of the online rotation may flip one rounding.
    ok = worst <= 1e-2
    print("kernels agree with the reference" if ok else f"MISMATCH: worst relative error {worst:.2e}")
    return 0 if ok else 1


def median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measured_peaks() -> dict:
    """int8 TOPS of torch._int_mm and bfloat16 TFLOPS of F.linear on a large square product."""
    s = PEAK_SIZE
    a = torch.randint(-128, 128, (s, s), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (s, s), dtype=torch.int8, device="cuda")
    xa, xb = torch.randn(s, s, device="cuda", dtype=torch.bfloat16), torch.randn(s, s, device="cuda",
                                                                                  dtype=torch.bfloat16)
    ops = 2 * s**3
    return {"int8_tops": ops / median_ms(lambda: torch._int_mm(a, b.t())) / 1e9,
            "bf16_tflops": ops / median_ms(lambda: F.linear(xa, xb)) / 1e9,
            "measured_with": f"torch._int_mm and F.linear, {s}x{s}x{s}, median of do_bench"}


def time_shape(m: int, n: int, k: int, peak_int8: float) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w16 = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    w4a4, w8a8 = quantized_layer(n, k, 4, "cuda"), quantized_layer(n, k, 8, "cuda")
    rotation = normalized_hadamard(ROTATION_BLOCK).cuda()
    xq, x_scale = quantize_activation_triton(x, 4)

    ms = {
        "bf16": median_ms(lambda: F.linear(x, w16)),
        # w8 [n, k] transposed is the column-major [k, n] operand cuBLAS's int8 path wants.
        "int8_mm": median_ms(lambda: torch._int_mm(a8, w8.t())),
        "w4a4": median_ms(lambda: quant_linear_triton(*linear_args(x, w4a4, 4, 4, None))),
        "w4a4_rot128": median_ms(lambda: quant_linear_triton(*linear_args(x, w4a4, 4, 4, rotation))),
        "w8a8": median_ms(lambda: quant_linear_triton(*linear_args(x, w8a8, 8, 8, None))),
        "w4a4_quantize": median_ms(lambda: quantize_activation_triton(x, 4)),
        "w4a4_gemm": median_ms(lambda: quant_matmul(xq, x_scale, w4a4["qweight"], w4a4["w_scale"], None, None,
                                                    k, 4, 4, 0, 0, torch.bfloat16)),
    }
    ops = 2 * m * n * k
    integer = ("int8_mm", "w4a4", "w4a4_rot128", "w8a8", "w4a4_gemm")
    tops = {name: ops / ms[name] / 1e9 for name in integer}
    return {
        "M": m, "N": n, "K": k, "ms": ms,
        "speedup_vs_bf16": {name: ms["bf16"] / t for name, t in ms.items() if name != "bf16"},
        "speedup_vs_int8_mm": {name: ms["int8_mm"] / ms[name] for name in integer if name != "int8_mm"},
        "tops": tops,
        "fraction_of_int8_peak": {name: t / peak_int8 for name, t in tops.items()},
    }


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 4096 and three (N, K) shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return interpreter_pass()

    tokens, shapes = (QUICK_TOKENS, QUICK_SHAPES) if args.quick else (TOKENS, SHAPES)
    info = machine()
    print(f"{info['gpu']} (sm_{info['capability'].replace('.', '')}), torch {info['torch']}, "
          f"triton {info['triton']}")
    correctness = [row for n, k in shapes for row in check_against_reference(CHECK_TOKENS, n, k, "cuda")]
    for row in correctness:
        print(f"  check N={row['N']:5d} K={row['K']:5d} {row['bits']:12s} relative error "
              f"{row['rel_error']:.2e} vs the CPU reference")
    peaks = measured_peaks()
    print(f"measured peaks: int8 {peaks['int8_tops']:.0f} TOPS, bf16 {peaks['bf16_tflops']:.0f} TFLOPS")

    rows = []
    print(f"{'M':>6} {'N':>6} {'K':>6} {'bf16 ms':>8} {'int8 ms':>8} {'w4a4 ms':>8} {'x bf16':>7} "
          f"{'x int8':>7} {'TOPS':>6} {'rot128':>7} {'w8a8':>7}")
    for m in tokens:
        for n, k in shapes:
            row = time_shape(m, n, k, peaks["int8_tops"])
            rows.append(row)
            ms, up = row["ms"], row["speedup_vs_bf16"]
            print(f"{m:6d} {n:6d} {k:6d} {ms['bf16']:8.3f} {ms['int8_mm']:8.3f} {ms['w4a4']:8.3f} "
                  f"{up['w4a4']:7.2f} {row['speedup_vs_int8_mm']['w4a4']:7.2f} {row['tops']['w4a4']:6.0f} "
                  f"{up['w4a4_rot128']:7.2f} {up['w8a8']:7.2f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["gpu"]).strip("-")
    path = RESULTS / f"kernels-{name}.json"
    path.write_text(json.dumps({"machine": info, "peaks": peaks, "correctness": correctness, "rows": rows},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
