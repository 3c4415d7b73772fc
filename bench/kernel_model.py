"""A performance MODEL of the W4A4 kernels on Hopper, from their offline-compiled SASS: not a measurement.

    python bench/kernel_model.py                 # every shipped config, the 21 DiT shapes
    python bench/kernel_model.py --quick         # one config per kernel, two shapes
    python bench/kernel_model.py --output kernel-model-before

Every shipped configuration of the integer GEMM (the autotune list of kernels/triton_gemm.py after its
own pruning, for each launch) and the tiling kernels/triton_quantize.py plans for each quantize launch
(`launch_parameters`) is compiled with Triton's bundled ptxas (bench/offline_compile.py: no GPU
needed), for sm_90 at every shape and for sm_80 and sm_89 at one (K = 3072); each distinct binary
once. From each binary: registers, spills, shared memory, the MMA instruction, the load kind, and the
main loop's instruction count and integer share. For sm_90 a roofline-plus-issue-rate model
(`predict`) turns the binary and the launch into a predicted time on an H100 and an H200 from
published rates (constants below, each with its source), compared with bf16 at the same shape. The
configuration the model ranks first stands for what autotuning would pick.

Shapes: M in {1024, 4096, 16384} tokens x (N, K) of PixArt / DiT-XL (width 1152: attention, fused
qkv, MLP up and down) and Flux (width 3072: attention, MLP up and down).

Writes bench/results/<output>.json and .md, labelled MODEL, with the machine the compiles ran on.
What the model leaves out is listed in `predict`'s docstring: its times are optimistic bounds for a
given binary, meant to rank kernels and configurations and to show what limits them — measured times
come from bench/kernels.py on a GPU and replace these wherever they exist.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import triton
from tqdm import tqdm

from machine import machine_info
from offline_compile import (CONVERSIONS, FP32, INT_ALU, Binary, Loop, Pointer, autotune_configs,
                             compile_kernel)

from clq_compile.kernels import triton_gemm, triton_quantize

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = "MODEL: predicted from offline-compiled SASS and published peak rates; not a measurement"

TOKENS = (1024, 4096, 16384)
SHAPES = ((1152, 1152), (3456, 1152), (4608, 1152), (1152, 4608), (3072, 3072), (12288, 3072), (3072, 12288))
QUICK_SHAPES = ((4096, 1152, 1152), (4096, 12288, 3072))
OTHER_TARGETS_SHAPE = (4096, 3072, 3072)
TARGETS = ("sm_90", "sm_80", "sm_89")
# a4: the W4A4 activation quantize; a4_rot128: with CLQ's online block rotation; w4a4 / w8a8: GEMMs.
VARIANTS = ("a4", "a4_rot128", "w4a4", "w8a8")
ROTATION_BLOCK = 128  # CLQ's default block Hadamard (README, Options: hadamard_block)


@dataclass(frozen=True)
class Gpu:
    """Published rates of one GPU. Tensor-core rates are dense (the datasheets' "with sparsity" / 2)."""

    name: str
    sms: int
    clock_hz: float
    int8_ops: float  # dense int8 tensor-core ops/s (2 per multiply-accumulate)
    bf16_flops: float  # dense bf16 tensor-core flop/s
    bf16_measured: float | None  # cuBLAS bf16 flop/s measured on this GPU, when known
    hbm_bytes_per_s: float

    def tensor_ops_per_clock(self, kind: str) -> float:
        """Per-SM tensor-core ops per clock for "int8", "bf16" (fp16 alike) or "tf32" operands."""
        per_second = {"int8": self.int8_ops, "bf16": self.bf16_flops, "tf32": self.bf16_flops / 2}[kind]
        return per_second / (self.sms * self.clock_hz)


# H100 SXM5 and H200 SXM datasheets (nvidia.com): int8 1979 TOPS and bf16 989 TFLOP/s dense (3958 /
# 1979 with sparsity), HBM3 3.35 TB/s (H100) and HBM3e 4.8 TB/s (H200); 132 SMs (H100 whitepaper,
# SXM5). The clock is the one both tensor rates imply: 989.4e12 / (132 SMs x 4096 dense bf16 flop per
# SM per clock) = 1.83 GHz. bf16 measured: 790 TFLOP/s for an 8192^3 bf16 matmul on this project's
# H200 in an earlier GPU session. TF32 runs at half the bf16 rate (datasheet: 495 TFLOP/s dense).
H100 = Gpu("H100 SXM", 132, 1.83e9, 1979e12, 989e12, None, 3.35e12)
H200 = Gpu("H200 SXM", 132, 1.83e9, 1979e12, 989e12, 790e12, 4.8e12)
GPUS = (H100, H200)

# Per-SM results per clock of the non-tensor pipes on compute capability 9.0: CUDA C++ Programming
# Guide, "Arithmetic Instructions" throughput table (32-bit float add/multiply/FMA 128; 32-bit integer
# add, multiply-add, shift, compare, min/max, bitwise 64; reciprocal / special functions and 32-bit
# type conversions 16). An SM issues at most 4 warp-instructions per clock (4 schedulers, 1 each).
FP32_LANES = 128
INT_LANES = 64
SFU_LANES = 16
WARP_ISSUE_PER_CLOCK = 4
WARP = 32


@dataclass(frozen=True)
class Launch:
    """One kernel launch the model compiles: the arguments its Python wrapper would pass.

    jit: the @triton.jit kernel compiled (heuristics included); configs: those the kernel module
    ships for this launch (an autotuner's list after its own pruning, or the one tiling a launch
    plan picks); grid(config): programs launched; trips(loop, binary, config): how often one program
    runs a loop of its SASS; elements(config): the activations one program quantizes (quantize
    kernels, for per-element figures; 0 for GEMMs).
    """

    kernel: str  # "quantize" or "gemm"
    variant: str
    shape: tuple[int, int, int]  # M, N, K
    jit: Any
    configs: list[triton.Config]
    args: dict[str, Any]
    grid: Callable[[triton.Config], int]
    trips: Callable[[Loop, Binary, triton.Config], int]
    hbm_bytes: int
    elements: Callable[[triton.Config], float]


def gemm_launch(m: int, n: int, k: int, a_bits: int, w_bits: int, target: str) -> Launch:
    """quant_matmul of kernels/triton_gemm.py: per-token activation scales, per-channel weight scales,
    no zero point, no bias, bf16 out. HBM: both operands and the output once, scales (L2 holds reuse)."""
    args = dict(a_ptr=Pointer("i8"), w_ptr=Pointer("i8"), a_scale_ptr=Pointer("fp32"),
                w_scale_ptr=Pointer("fp32"), w_zero_ptr=None, bias_ptr=None, out_ptr=Pointer("bf16"),
                M=m, N=n, K=k, stride_am=k * a_bits // 8, stride_wn=k * w_bits // 8, stride_asm=1,
                stride_wsn=1, stride_om=n, A_GROUP=k, W_GROUP=k, CHUNK=k, SINGLE_CHUNK=True, A_BITS=a_bits,
                W_BITS=w_bits, HAS_ZERO=False, HAS_BIAS=False, M_BUCKET=triton_gemm.m_bucket(m))
    autotuner = triton_gemm._quant_matmul_sm90 if target == "sm_90" else triton_gemm._quant_matmul_sm80

    def grid(cfg: triton.Config) -> int:
        return triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n, cfg.kwargs["BLOCK_N"])

    def trips(loop: Loop, binary: Binary, cfg: triton.Config) -> int:
        # The K loop is the one with the MMAs; its K per trip is what those MMAs cover of the tile.
        macs = loop.mma_macs(binary.num_warps)
        if not macs:
            return 1
        return math.ceil(k / (macs // (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"])))

    hbm = m * k * a_bits // 8 + n * k * w_bits // 8 + 2 * m * n + 4 * (m + n)
    return Launch("gemm", f"w{w_bits}a{a_bits}", (m, n, k), triton_gemm._quant_matmul_kernel,
                  autotune_configs(autotuner, args), args, grid, trips, hbm, lambda cfg: 0)


# Multiprocessors the quantize kernel's launch plan fills: 132 on H100 / H200, 108 on A100 (A100
# whitepaper), 142 on L40S (L40S datasheet: 18,176 CUDA cores, 128 per SM).
PLAN_SMS = {"sm_90": 132, "sm_80": 108, "sm_89": 142}
# Arguments of the quantize launch that say what is computed rather than how it is tiled.
_QUANTIZE_CHOICES = ("units", "BITS", "HAS_MUL", "HAS_PERM", "CONTIGUOUS", "HAS_ROT", "SPLIT", "DOT_IN_FP32")


def quantize_launch(m: int, k: int, bits: int, rotation: int | None, target: str) -> Launch:
    """quantize_activation_triton of kernels/triton_quantize.py on contiguous bf16 x [m, k], per-token scales,
    optionally the block rotation of `rotation` channels. The kernel module's `launch_parameters`
    gives the one tiling it ships for the launch (its config). HBM: x read once, q and scales
    written once."""
    meta, programs = triton_quantize.launch_parameters(m, k, bits, k, rotation, False, False, True, 1,
                                                       PLAN_SMS[target])
    tiling = {key: value for key, value in meta.items()
              if key not in _QUANTIZE_CHOICES and key not in ("num_warps", "num_stages")}
    cfg = triton.Config(tiling, num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    args = dict(x_ptr=Pointer("bf16"), mul_ptr=None, perm_ptr=None,
                rot_ptr=Pointer("fp32") if rotation else None, signs_ptr=Pointer("bf16") if rotation else None,
                q_ptr=Pointer("u8" if bits == 4 else "i8"), scale_ptr=Pointer("fp32"), stride_xm=k, stride_xk=1,
                **{key: meta[key] for key in _QUANTIZE_CHOICES if key in meta})

    def trips(loop: Loop, binary: Binary, cfg: triton.Config) -> int:
        # A program holds its whole tile in registers: no loop runs more than once per element.
        return 1

    variant = f"a{bits}" + (f"_rot{rotation}" if rotation else "")
    hbm = 2 * m * k + m * k * bits // 8 + 4 * m
    return Launch("quantize", variant, (m, 0, k), triton_quantize._quantize_kernel, [cfg], args,
                  lambda cfg: programs, trips, hbm, lambda cfg: m * k / programs)


def launches(m: int, n: int, k: int, target: str, variants: tuple[str, ...] = VARIANTS) -> list[Launch]:
    """The kernels of a W4A4 layer (quantize with and without CLQ's online rotation, GEMM) and the
    W8A8 GEMM of the same template for comparison, those named in `variants`."""
    build = {"a4": lambda: quantize_launch(m, k, 4, None, target),
             "a4_rot128": lambda: quantize_launch(m, k, 4, ROTATION_BLOCK, target),
             "w4a4": lambda: gemm_launch(m, n, k, 4, 4, target), "w8a8": lambda: gemm_launch(m, n, k, 8, 8, target)}
    return [build[v]() for v in variants]


PAIRS = {"w4a4": ("a4", "w4a4"), "w4a4_rot128": ("a4_rot128", "w4a4")}


def _mma_kind(opcode: str) -> str:
    if opcode.startswith(("IGMMA", "IMMA", "QGMMA")):
        return "int8"
    return "tf32" if "TF32" in opcode else "bf16"


def predict(launch: Launch, binary: Binary, cfg: triton.Config, gpu: Gpu) -> dict[str, Any]:
    """Predicted time of one launch on `gpu`, the maximum of a compute bound and a memory bound.

    Per program (one thread block of W warps), from its SASS with each loop repeated trips(loop) times
    (`SassReport.executed`): n instructions per thread, of which n_int integer-ALU, n_fp float32 and
    n_sfu reciprocal / conversion ones, and the MMA multiply-accumulates of the block by operand kind.
    Its SM-clocks are the busiest of the SM's resources:

        issue   = n · W / 4                        (4 schedulers, one warp-instruction per clock each)
        int     = n_int · W · 32 / 64              (64 integer lanes per SM)
        fp32    = n_fp · W · 32 / 128
        sfu     = n_sfu · W · 32 / 16
        tensor  = Σ 2 · MACs / (tensor ops per SM per clock for that operand kind)
        clocks  = max(issue, int, fp32, sfu, tensor)

    Programs are spread evenly over the SMs, and programs sharing an SM are assumed to overlap
    perfectly, so compute = ceil(programs / SMs) · clocks / clock. Memory = the bytes the launch must
    move through HBM at least once / HBM bandwidth. time = max(compute, memory).

    Left out (so the time is a lower bound for this binary): memory and pipeline latencies not hidden
    (a program waiting on its own wgmma or loads), L2 misses beyond the compulsory bytes, bank
    conflicts, the launch overhead, and clocks below boost. Taken branches are not distinguished from
    untaken ones (a division's slow path is counted as run).
    """
    sass = binary.sass
    warps = binary.num_warps

    def trips(loop: Loop) -> int:
        return launch.trips(loop, binary, cfg)

    n_all = sass.executed(trips)
    n_int = sass.executed(trips, INT_ALU)
    n_fp = sass.executed(trips, FP32)
    n_sfu = sass.executed(trips, CONVERSIONS | {"MUFU"})
    tensor = sum(2 * macs / gpu.tensor_ops_per_clock(_mma_kind(op))
                 for op, macs in sass.mma_macs(trips, warps).items())
    clocks = {"issue": n_all * warps / WARP_ISSUE_PER_CLOCK, "int": n_int * warps * WARP / INT_LANES,
              "fp32": n_fp * warps * WARP / FP32_LANES, "sfu": n_sfu * warps * WARP / SFU_LANES,
              "tensor": tensor}
    programs = launch.grid(cfg)
    limiter = max(clocks, key=clocks.get)
    compute_s = math.ceil(programs / gpu.sms) * clocks[limiter] / gpu.clock_hz
    memory_s = launch.hbm_bytes / gpu.hbm_bytes_per_s
    seconds = max(compute_s, memory_s)
    m, n, k = launch.shape
    out = {"us": round(seconds * 1e6, 3), "bound": limiter if compute_s >= memory_s else "memory",
           "compute_us": round(compute_s * 1e6, 3), "memory_us": round(memory_s * 1e6, 3), "programs": programs,
           "clocks_per_program": {name: round(c) for name, c in clocks.items()}}
    if launch.kernel == "gemm":
        out["fraction_of_int8_peak"] = round(2 * m * n * k / seconds / gpu.int8_ops, 4)
    else:
        out["fraction_of_bandwidth_floor"] = round(memory_s / seconds, 4)
    return out


def bf16_us(m: int, n: int, k: int, gpu: Gpu, flops: float) -> float:
    """bf16 F.linear at its roofline: max(2·M·N·K / flops, (M·K + N·K + M·N) · 2 bytes / bandwidth)."""
    return max(2 * m * n * k / flops, 2 * (m * k + n * k + m * n) / gpu.hbm_bytes_per_s) * 1e6


def describe(launch: Launch, binary: Binary, cfg: triton.Config) -> dict[str, Any]:
    """What the compiled binary is: resources, instructions, and per-K or per-element figures."""
    sass = binary.sass
    loop = sass.main_loop
    row = {"target": binary.target.name, "kernel": launch.kernel, "variant": launch.variant, "K": launch.shape[2],
           "config": _config_dict(cfg), "registers": binary.registers, "spill_bytes": binary.spill_bytes,
           "shared_bytes": binary.shared_bytes, "fits_shared": binary.fits_shared, "mma": sass.mma,
           "load_kind": sass.load_kind, "loops": len(sass.loops),
           "main_loop_instructions": loop.count if loop else 0,
           "main_loop_int_alu_share": round(loop.int_alu_share, 3) if loop else 0.0}
    if launch.kernel == "gemm" and loop is not None and loop.mma_macs(binary.num_warps):
        k_per_trip = loop.mma_macs(binary.num_warps) // (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"])
        row["k_per_trip"] = k_per_trip
        row["main_loop_instructions_per_k128"] = round(loop.count * 128 / k_per_trip, 1)
    elements = launch.elements(cfg)
    if elements:
        per_thread = elements / (binary.num_warps * WARP)

        def trips(lp: Loop) -> int:
            return launch.trips(lp, binary, cfg)

        row["instructions_per_element"] = round(sass.executed(trips) / per_thread, 2)
        row["ffma_per_element"] = round(sass.executed(trips, frozenset({"FFMA"})) / per_thread, 2)
        row["divisions_per_element"] = round(sass.divisions(trips) / per_thread, 3)
    return row


def _config_dict(cfg: triton.Config) -> dict[str, int]:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_text(cfg: dict[str, int]) -> str:
    return " ".join(f"{key.removeprefix('BLOCK_')}={value}" for key, value in cfg.items())


def run(shapes: list[tuple[int, int, int]], targets: tuple[str, ...], variants: tuple[str, ...],
        quick: bool) -> dict[str, Any]:
    """Compile every launch x shipped config (sm_90 at `shapes`, other targets at OTHER_TARGETS_SHAPE),
    describe each binary, predict the sm_90 launches."""
    jobs = [(target, launch, cfg) for target in targets
            for m, n, k in (shapes if target == "sm_90" else [OTHER_TARGETS_SHAPE])
            for launch in launches(m, n, k, target, variants)
            for cfg in launch.configs[:1 if quick else None]]
    # A quantize launch does not depend on N: shapes sharing M and K share it.
    unique = {(target, launch.variant, launch.shape, json.dumps(_config_dict(cfg), sort_keys=True)):
              (target, launch, cfg) for target, launch, cfg in jobs}
    jobs = list(unique.values())
    binaries: dict[tuple, dict] = {}
    predictions = []
    compile_seconds: list[tuple[float, str]] = []
    for target, launch, cfg in tqdm(jobs, desc="compile + model", unit="launch"):
        start = time.perf_counter()
        binary = compile_kernel(launch.jit, launch.args, target, cfg)
        row = describe(launch, binary, cfg)
        spent = time.perf_counter() - start
        key = (target, launch.kernel, launch.variant, launch.shape[2], json.dumps(row["config"], sort_keys=True))
        if key not in binaries:
            binaries[key] = row
            compile_seconds.append((spent, f"{target} {launch.variant} K={launch.shape[2]} "
                                           f"{_config_text(row['config'])}"))
        if target == "sm_90":
            for gpu in GPUS:
                predictions.append({"gpu": gpu.name, "kernel": launch.kernel, "variant": launch.variant,
                                    "M": launch.shape[0], "N": launch.shape[1], "K": launch.shape[2],
                                    "config": row["config"], "fits_shared": binary.fits_shared,
                                    **predict(launch, binary, cfg, gpu)})
    return {"binaries": list(binaries.values()), "summary": summarize(predictions, shapes),
            "rankings": rankings(predictions), "compile_seconds": sorted(compile_seconds, reverse=True)}


def summarize(predictions: list[dict], shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Per GPU and shape: each kernel's best config that fits, the pairs, and bf16 for comparison."""
    rows = []
    for gpu in GPUS:
        for m, n, k in shapes:
            best = {}
            for p in predictions:
                if p["gpu"] == gpu.name and p["M"] == m and p["K"] == k and p["N"] in (n, 0) and p["fits_shared"]:
                    if p["variant"] not in best or p["us"] < best[p["variant"]]["us"]:
                        best[p["variant"]] = p
            bf16 = bf16_us(m, n, k, gpu, gpu.bf16_flops)
            row = {"gpu": gpu.name, "M": m, "N": n, "K": k, "bf16_us": bf16,
                   "bf16_measured_rate_us": bf16_us(m, n, k, gpu, gpu.bf16_measured) if gpu.bf16_measured else None,
                   "kernels": {v: {"us": p["us"], "bound": p["bound"], "config": p["config"],
                                   "clocks_per_program": p["clocks_per_program"], "programs": p["programs"],
                                   **{f: p[f] for f in ("fraction_of_int8_peak", "fraction_of_bandwidth_floor")
                                      if f in p}}
                               for v, p in best.items()}}
            row["gemm_ratio_vs_bf16"] = {v: bf16 / best[v]["us"] for v in ("w4a4", "w8a8") if v in best}
            row["pair_us"] = {name: best[q]["us"] + best[g]["us"] for name, (q, g) in PAIRS.items()
                              if q in best and g in best}
            row["pair_ratio_vs_bf16"] = {name: bf16 / us for name, us in row["pair_us"].items()}
            rows.append(row)
    return rows


def constants() -> dict[str, Any]:
    return {"gpus": [asdict(g) for g in GPUS], "fp32_lanes_per_sm": FP32_LANES, "int_lanes_per_sm": INT_LANES,
            "sfu_lanes_per_sm": SFU_LANES, "warp_issue_per_clock_per_sm": WARP_ISSUE_PER_CLOCK,
            "sources": "H100 SXM5 / H200 SXM datasheets (dense tensor rates, HBM bandwidth), H100 "
                       "whitepaper (132 SMs), CUDA C++ Programming Guide throughput table (cc 9.0), "
                       "790 TFLOP/s bf16 measured on this project's H200 (8192^3 matmul); see bench/kernel_model.py"}


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}×" if values else "n/a"


def headline(summary: list[dict]) -> list[dict]:
    """Per GPU: the range over shapes of each kernel's (and pair's) predicted ratio to bf16."""
    out = []
    for gpu in GPUS:
        rows = [r for r in summary if r["gpu"] == gpu.name]
        line = {"gpu": gpu.name}
        for name in ("w4a4", "w8a8"):
            line[f"gemm_{name}"] = _range([r["gemm_ratio_vs_bf16"][name] for r in rows
                                           if name in r["gemm_ratio_vs_bf16"]])
        for name in PAIRS:
            line[f"pair_{name}"] = _range([r["pair_ratio_vs_bf16"][name] for r in rows
                                           if name in r["pair_ratio_vs_bf16"]])
        line["quantize_a4_vs_floor"] = _range([r["kernels"]["a4"]["fraction_of_bandwidth_floor"] for r in rows
                                               if "a4" in r["kernels"]])
        out.append(line)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Kernel model — {LABEL}", "",
             "Generated by `python bench/kernel_model.py" + (" --quick" if result["quick"] else "") + "` on "
             f"{result['date']} (Triton {result['triton']}, compiled offline, no GPU). Times are predictions of "
             "the roofline-plus-issue-rate model of `predict` in bench/kernel_model.py from published rates; "
             "measurements from `bench/kernels.py` on a GPU replace them wherever they exist.", "",
             "## Headline: predicted ratio to bf16 (higher is faster; range over shapes; best config that fits)", "",
             "| GPU | GEMM W4A4 | GEMM W8A8 | quantize+GEMM W4A4 | W4A4 + rotation 128 | "
             "quantize A4: share of bandwidth floor |",
             "|---|---|---|---|---|---|"]
    for h in result["headline"]:
        lines.append(f"| {h['gpu']} | {h['gemm_w4a4']} | {h['gemm_w8a8']} | {h['pair_w4a4']} | {h['pair_w4a4_rot128']} "
                     f"| {h['quantize_a4_vs_floor']} |")
    for gpu in GPUS:
        lines += ["", f"## {gpu.name}: per shape (µs, MODEL)", "",
                  "| M | N | K | bf16 | quantize A4 | quantize A4 rot128 | GEMM W4A4 (% int8 peak, bound) | "
                  "GEMM W8A8 | W4A4 pair × bf16 | rot128 pair × bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["summary"]:
            if r["gpu"] != gpu.name:
                continue
            ks, pr = r["kernels"], r["pair_ratio_vs_bf16"]

            def us(v: str) -> str:
                return f"{ks[v]['us']:.1f}" if v in ks else "—"

            gemm = (f"{ks['w4a4']['us']:.1f} ({100 * ks['w4a4']['fraction_of_int8_peak']:.0f} %, "
                    f"{ks['w4a4']['bound']})" if "w4a4" in ks else "—")
            lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['bf16_us']:.1f} | {us('a4')} | {us('a4_rot128')} | "
                         f"{gemm} | {us('w8a8')} | "
                         + " | ".join(f"{pr[p]:.2f}" if p in pr else "—" for p in PAIRS) + " |")
    lines += ["", "## Binaries (offline compile)", "",
              "Main loop: the innermost SASS loop holding the MMAs (GEMM) or the longest one; per K128: its "
              "instructions per 128 channels of K. Per element (quantize): instructions, FFMAs and divisions "
              "one thread executes per activation it quantizes.", "",
              "| target | kernel | K | config | regs | spill B | shared KB (fits) | MMA | loads | main loop (int %) | "
              "per K128 | per element: instr / FFMA / div |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in result["binaries"]:
        per_element = (f"{b['instructions_per_element']} / {b['ffma_per_element']} / {b['divisions_per_element']}"
                       if "instructions_per_element" in b else "")
        lines.append(f"| {b['target']} | {b['variant']} | {b['K']} | {_config_text(b['config'])} | {b['registers']} "
                     f"| {b['spill_bytes']} | {b['shared_bytes'] / 1024:.0f} ({'yes' if b['fits_shared'] else 'NO'}) "
                     f"| {b['mma']} | {b['load_kind']} | {b['main_loop_instructions']} "
                     f"({100 * b['main_loop_int_alu_share']:.0f} %) | {b.get('main_loop_instructions_per_k128', '')} "
                     f"| {per_element} |")
    lines += ["", "## Model constants", "", "```", json.dumps(result["constants"], indent=1), "```", ""]
    return "\n".join(lines)


def build_facts(binaries: list[dict]) -> dict[str, str]:
    """The sm_90 binaries in a few numbers: what tests/kernels/test_sm90_build.py checks, as ranges."""
    sm90 = [b for b in binaries if b["target"] == "sm_90"]

    def spread(values: list[float]) -> str:
        return f"{min(values):g}–{max(values):g}" if values else "n/a"

    gemm = {v: [b for b in sm90 if b["variant"] == v] for v in ("w4a4", "w8a8")}
    rot = [b for b in sm90 if b["variant"] == "a4_rot128"]
    plain = [b for b in sm90 if b["variant"] == "a4"]
    return {
        "GEMM W4A4 main loop, SASS instructions per 128 of K": spread(
            [b["main_loop_instructions_per_k128"] for b in gemm["w4a4"] if "main_loop_instructions_per_k128" in b]),
        "GEMM W8A8 main loop, SASS instructions per 128 of K": spread(
            [b["main_loop_instructions_per_k128"] for b in gemm["w8a8"] if "main_loop_instructions_per_k128" in b]),
        "GEMM (config, K) builds that spill / all": f"{sum(1 for v in gemm.values() for b in v if b['spill_bytes'])} / "
                                              f"{sum(len(v) for v in gemm.values())}",
        "GEMM (config, K) builds over 227 KB shared memory": str(
            sum(1 for v in gemm.values() for b in v if not b["fits_shared"])),
        "quantize A4: instructions / divisions per element": (
            f"{spread([b['instructions_per_element'] for b in plain])} / "
            f"{spread([b['divisions_per_element'] for b in plain])}"),
        "quantize A4 rot128: instructions / FFMA per element, MMA": (
            f"{spread([b['instructions_per_element'] for b in rot])} / {spread([b['ffma_per_element'] for b in rot])}, "
            + ", ".join(sorted({b["mma"] for b in rot}))),
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A markdown table of two results side by side: the headline per GPU and the sm_90 build facts."""
    lines = ["| MODEL (not measured) | before | after |", "|---|---|---|"]
    names = {"gemm_w4a4": "GEMM W4A4 × bf16", "gemm_w8a8": "GEMM W8A8 × bf16",
             "pair_w4a4": "quantize + GEMM W4A4 × bf16",
             "pair_w4a4_rot128": "the same with rotation 128 × bf16",
             "quantize_a4_vs_floor": "quantize A4: share of its bandwidth floor"}
    for old, new in zip(before["headline"], after["headline"]):
        for key, name in names.items():
            lines.append(f"| {old['gpu']}: {name} | {old[key]} | {new[key]} |")
    old_facts, new_facts = build_facts(before["binaries"]), build_facts(after["binaries"])
    for name in old_facts:
        lines.append(f"| sm_90: {name} | {old_facts[name]} | {new_facts[name]} |")
    return "\n".join(lines) + "\n"


def rankings(predictions: list[dict]) -> list[dict]:
    """Per GPU, variant and shape: every config's predicted µs and limiter, fastest first."""
    groups: dict[tuple, list] = {}
    for p in predictions:
        key = (p["gpu"], p["variant"], p["M"], p["N"], p["K"])
        groups.setdefault(key, []).append([_config_text(p["config"]), p["us"], p["bound"]]
                                          + ([] if p["fits_shared"] else ["does not fit"]))
    return [{"gpu": g, "variant": v, "M": m, "N": n, "K": k, "configs": sorted(rows, key=lambda r: r[1])}
            for (g, v, m, n, k), rows in groups.items()]


def json_text(result: dict[str, Any]) -> str:
    """The result as JSON, one list item per line."""
    parts = []
    for key, value in result.items():
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(item, ensure_ascii=False) for item in value)
            parts.append(f" {json.dumps(key)}: [\n  {items}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes are M,N,K triples of positive ints separated by ';'; got {text!r}")
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config per kernel, two shapes")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ", ".join(TARGETS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--shapes", type=_shapes, help="M,N,K;M,N,K... instead of the DiT shape set")
    parser.add_argument("--output", default="kernel-model", help="results name in bench/results (no suffix)")
    parser.add_argument("--json", type=Path, help="write only the JSON, to this path (for tests)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print a markdown table of two results (JSON files) and exit")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        print(compare(before, after), end="")
        return 0
    targets = tuple(t.strip() for t in args.targets.split(","))
    variants = tuple(v.strip() for v in args.variants.split(","))
    if "sm_90" not in targets or any(t not in TARGETS for t in targets):
        parser.error(f"--targets must include sm_90 (the modelled GPUs) and name only {', '.join(TARGETS)}")
    if any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must name only {', '.join(VARIANTS)}; got {args.variants}")
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else [(m, n, k) for m in TOKENS for n, k in SHAPES])
    start = time.perf_counter()
    result = run(shapes, targets, variants, args.quick)
    elapsed = time.perf_counter() - start
    result = {"label": LABEL, "quick": args.quick, "targets": list(targets),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "triton": triton.__version__, "machine": machine_info(), "constants": constants(),
              "headline": headline(result["summary"]), **result, "seconds": round(elapsed, 1)}
    if args.json is not None:
        args.json.write_text(json_text(result))
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json_text(result))
    (RESULTS / f"{args.output}.md").write_text(markdown(result))
    for h in result["headline"]:
        print(f"{h['gpu']}: GEMM W4A4 {h['gemm_w4a4']} bf16, quantize+GEMM {h['pair_w4a4']}, "
              f"with rotation {h['pair_w4a4_rot128']} (MODEL)")
    spent = sum(s for s, _ in result["compile_seconds"])
    print(f"{len(result['binaries'])} binaries in {elapsed:.0f} s ({spent:.0f} s compiling); slowest: "
          + "; ".join(f"{name} {s:.1f} s" for s, name in result["compile_seconds"][:3]))
    print(f"wrote {RESULTS / args.output}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
