"""A bandwidth MODEL of the weight-only GEMM (kernels/triton_weight_only.py) on an H200: not a measurement.

    python bench/weight_only_model.py

A GEMM takes at least max(bytes / HBM bandwidth, 2·M·N·K / tensor-core rate). bf16 reads its bf16
weight, x and y; a weight-only mode reads the packed weight (bits / 8 bytes per weight) and one
float32 scale per output channel instead of the bf16 weight, and runs its dot at the same bf16
tensor-core rate (dequantization is free in this model). Printed per shape and M: the bytes, both
bounds' times, and the ratio of bf16's bound to each mode's (the speedup the model allows).

Left out: the launch floor (a few microseconds, which dominates every M <= 16 row here), how many
programs keep HBM busy (a 1152-wide layer at BLOCK_N = 32 is 36 programs on 132 SMs), and the
dequantization instructions (counted by bench/weight_only_build.py).
"""

from __future__ import annotations

# H200 SXM datasheet: HBM3e 4.8 TB/s. bf16: 790 TFLOP/s, an 8192^3 cuBLAS bf16 matmul measured on
# this project's H200 in an earlier GPU session (the figure bench/kernel_model.py uses), below the
# 989 TFLOP/s of the datasheet.
HBM_BYTES_PER_S = 4.8e12
BF16_FLOPS = 790e12
SHAPES = ((1152, 1152), (4608, 1152), (1152, 4608))  # (N, K): PixArt / DiT-XL attention, MLP up, MLP down
TOKENS = (1, 2, 16, 4096)
MODES = (("w8a16", 8), ("w4a16", 4), ("w3a16", 3))


def bf16_bytes(m: int, n: int, k: int) -> int:
    return 2 * n * k + 2 * m * k + 2 * m * n


def weight_only_bytes(m: int, n: int, k: int, bits: int) -> int:
    """Packed weight, per-channel float32 scales, bf16 x and y."""
    return n * k * bits // 8 + 4 * n + 2 * m * k + 2 * m * n


def bound_s(nbytes: int, m: int, n: int, k: int) -> float:
    return max(nbytes / HBM_BYTES_PER_S, 2 * m * n * k / BF16_FLOPS)


def rows() -> list[dict]:
    out = []
    for n, k in SHAPES:
        for m in TOKENS:
            base = bound_s(bf16_bytes(m, n, k), m, n, k)
            row = {"N": n, "K": k, "M": m, "bf16_MB": bf16_bytes(m, n, k) / 1e6, "bf16_us": base * 1e6,
                   "bound": "compute" if 2 * m * n * k / BF16_FLOPS > bf16_bytes(m, n, k) / HBM_BYTES_PER_S
                   else "memory"}
            for name, bits in MODES:
                row[name] = base / bound_s(weight_only_bytes(m, n, k, bits), m, n, k)
            out.append(row)
    return out


def table(result: list[dict]) -> str:
    lines = ["MODEL (H200: 4.8 TB/s HBM, 790 TFLOP/s bf16): ratio of bf16's lower bound to each mode's",
             "", "| (N, K) | M | bf16 MB | bf16 bound µs (limit) | " + " | ".join(n for n, _ in MODES) + " |",
             "|---|---|---|---|" + "---|" * len(MODES)]
    for r in result:
        lines.append(f"| ({r['N']}, {r['K']}) | {r['M']} | {r['bf16_MB']:.2f} | {r['bf16_us']:.2f} ({r['bound']}) | "
                     + " | ".join(f"{r[name]:.2f}" for name, _ in MODES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows()))
