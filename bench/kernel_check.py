"""Are the compiled kernels right on this GPU?  One pass over W4A4 / W4A8 / W8A8, FP8 and the
weight-only modes, fails loudly.

    python bench/kernel_check.py [--out DIR] [--configs N|all]   # on a CUDA GPU
    python bench/kernel_check.py --dry-run                        # the plan, its compiles, its minutes
    python bench/kernel_check.py --interpret                      # the same checks, tiny, on the CPU

Every case draws fresh random inputs (the run's seed is the first row) and checks, through the
wrappers the backend calls (`quant_linear_triton`, `quantize_activation_triton`, `quant_matmul`):

- layer:     quant_linear_triton(x) against a float64 product of the same quantized operands,
             ||out - ref|| / ||ref|| <= 1e-2 (bf16 output rounding is ~2e-3), every element finite;
- quantize:  the activation integers and scales against the torch reference quantizer: equal
             without a rotation; with one, T(x) may differ in its last bit, so integers may move
             by 1 where that flips a rounding (at most 0.1 % of them) and scales by float32
             rounding;
- integer:   quant_matmul with unit scales and float32 output against an integer oracle on the
             same device (torch._int_mm, exact int32): equal bit for bit. The values are drawn so
             that every partial sum is an exact float32, so the check holds for any summation order;
- nan:       a NaN in one token gives NaN in that token's every output and leaves the other tokens
             bit for bit as they were.

FP8 (e4m3 weights and activations through torch._scaled_mm rowwise) and the weight-only modes
(W3A16 / W4A16 / W8A16 through the Triton dequantize-in-registers GEMM) have no integer product and
no quantize kernel of their own: they get the layer check (against float64 on the same e4m3
activations, or on x itself) and the nan check.

Output buffers are poisoned first: blocks of the output's size are filled with NaN and freed, so
the allocator hands them to the kernel; an element the kernel forgot then shows as NaN or as a
mismatch. Last, on sm_90, the compiled GEMMs' SASS (cuobjdump of Triton's cache) must hold IGMMA,
Hopper's int8 tensor-core instruction. Each result is one JSON line (bench/lease.py); the exit
status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import lease

TOL = 1e-2
ROTATION_FLIPS = 1e-3
GEMM_LISTS = ("SM90_CONFIGS", "SM80_CONFIGS")
WEIGHT_ONLY_LISTS = ("CONFIGS",)  # kernels/triton_weight_only.py
# Planning figures for --dry-run: one sm_90 GEMM compile took 3-5 s with Triton 3.9 on this
# project's 2-core CPU machine (bench/README.md); one autotune trial is do_bench's 25 + 100 ms.
COMPILE_SECONDS = 4.0
TRIAL_SECONDS = 0.15
CASE_SECONDS = 0.5


@dataclass(frozen=True)
class Variant:
    """One way to quantize a layer. Groups of 0 mean one scale per token / output channel."""

    name: str
    w_bits: int
    a_bits: int
    a_group: int = 0
    w_group: int = 0
    rotation: int = 0
    asymmetric: bool = False
    w_format: str = ""  # a number format's name (kernels/formats.py); "" for int{w_bits}
    a_format: str = ""  # likewise for the activations; "none" for a weight-only mode

    @property
    def formats(self) -> tuple[str, str]:
        return self.w_format or f"int{self.w_bits}", self.a_format or f"int{self.a_bits}"

    @property
    def integer(self) -> bool:
        """Whether the layer runs on the quantize kernel and the integer GEMM."""
        return not (self.w_format or self.a_format)


@dataclass(frozen=True)
class Case:
    variant: Variant
    m: int
    n: int
    k: int


VARIANTS = (Variant("w4a4", 4, 4), Variant("w4a4_g128", 4, 4, 128, 128), Variant("w4a8", 4, 8),
            Variant("w8a8", 8, 8), Variant("w4a4_rot128", 4, 4, rotation=128),
            Variant("w4a4_asym_g128", 4, 4, w_group=128, asymmetric=True))
# The modes without an integer GEMM, at fewer token counts: their kernels are torch._scaled_mm
# (cuBLASLt) and the weight-only GEMM, whose tiles switch at M = 16.
MODE_VARIANTS = (Variant("fp8", 8, 8, w_format="e4m3", a_format="e4m3"), Variant("w4a16", 4, 16, a_format="none"),
                 Variant("w8a16", 8, 16, a_format="none"), Variant("w3a16", 3, 16, a_format="none"))
MODE_TOKENS = (7, 1000)
TOKENS = (1, 7, 1000, 4096)
WIDE = ((4608, 1152), (1152, 4608))
TINY_VARIANTS = tuple(Variant(v.name.replace("128", "32"), v.w_bits, v.a_bits, v.a_group and 32,
                              v.w_group and 32, v.rotation and 32, v.asymmetric) for v in VARIANTS) + MODE_VARIANTS


def plan(tiny: bool = False) -> list[Case]:
    """Every integer variant at (N, K) = (1152, 1152) for each M, then FP8 and the weight-only modes
    at M = 7 and 1000, then the wide DiT shapes at M = 1000 (the cases a short budget leaves out)."""
    if tiny:
        return [Case(v, m, 48, 64) for m in (1, 7, 33) for v in TINY_VARIANTS] + \
               [Case(TINY_VARIANTS[0], 9, 32, 128)]
    cases = [Case(v, m, 1152, 1152) for m in TOKENS for v in VARIANTS]
    cases += [Case(v, m, 1152, 1152) for m in MODE_TOKENS for v in MODE_VARIANTS]
    cases += [Case(v, 1000, n, k) for n, k in WIDE for v in VARIANTS if v.name in ("w4a4", "w8a8")]
    return cases


def estimate(cases: list[Case], gemm_configs: int) -> dict:
    """Compiles and seconds, assuming the worst case of a kernel specialized on every K and group.

    Autotuning compiles every kept config once per specialization and times it once per key
    (its M, N, K and specialization). The quantize kernel does not autotune: it compiles one
    binary per launch plan, which depends on M too.
    """
    gemm, quant, gemm_keys, quant_keys = set(), set(), set(), set()
    for c in cases:
        v = c.variant
        if not v.integer:  # e4m3 runs on cuBLASLt; a weight-only mode on the weight-only GEMM alone
            if v.a_format == "none":
                sig = ("weight-only", v.w_bits, v.w_group or c.k)
                gemm.add(sig)
                gemm_keys.add((c.m, c.n, c.k, sig))
            continue
        for bias in (True, False):  # the layer call and the unit-scale integer call
            sig = (v.a_bits, v.w_bits, v.a_group or c.k, v.w_group or c.k, v.asymmetric, bias)
            gemm.add(sig)
            gemm_keys.add((c.m, c.n, c.k, sig))
        qsig = (v.a_bits, v.a_group or c.k, c.k, v.rotation)
        quant.add(qsig)
        quant_keys.add((c.m, qsig))
    compiles = len(gemm) * gemm_configs + len(quant_keys)
    trials = len(gemm_keys) * gemm_configs
    seconds = compiles * COMPILE_SECONDS + trials * TRIAL_SECONDS + len(cases) * CASE_SECONDS
    return {"cases": len(cases), "compiles": compiles, "autotune_trials": trials, "seconds": round(seconds)}


# ---------------------------------------------------------------------------------------------
# the checks (torch and the kernels are imported by main, after TRITON_INTERPRET is settled)


def _rel(out, ref) -> float:
    import torch

    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp(min=torch.finfo(torch.float64).tiny))


def _poison(*shapes_dtypes) -> None:
    """Hand the allocator NaN-filled blocks of these sizes to reuse for the next outputs."""
    import torch

    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def int_oracle(a, w):
    """Exact a · wᵀ for int8 a [M, K], w [N, K] -> int32 [M, N], with torch._int_mm on their device.

    cuBLAS's int8 GEMM wants more than 16 rows (and K, N multiples of 8): the rows are padded, then
    dropped. w transposed is the column-major [K, N] operand it takes.
    """
    import torch

    m = a.shape[0]
    padded = torch.zeros(max(32, -(-m // 8) * 8), a.shape[1], dtype=torch.int8, device=a.device)
    padded[:m] = a
    return torch._int_mm(padded, w.t())[:m]


def _weights(case: Case, g, device):
    """A random weight [N, K] and its quantized, packed form."""
    import torch
    from clq_compile.kernels.formats import get_format
    from clq_compile.kernels.packing import pack_weight
    from clq_compile.kernels.quantize import quantize

    v = case.variant
    w = torch.randn(case.n, case.k, generator=g) / case.k**0.5
    quantized = quantize(w, get_format(v.formats[0]), symmetric=not v.asymmetric, group=v.w_group or None)
    stored = pack_weight(quantized)
    return quantized, {"qweight": stored.qweight.to(device), "w_scale": stored.scale.to(device),
                       "w_zero": None if stored.zero is None else stored.zero.to(device)}


def _transform(case: Case, g, device):
    import torch
    from clq_compile.kernels.hadamard import normalized_hadamard

    v = case.variant
    if not v.rotation:
        return None, None, None
    mul = (1 + torch.rand(case.k, generator=g)).to(device)
    perm = torch.randperm(case.k, generator=g).to(device)
    return mul, perm, normalized_hadamard(v.rotation).to(device)


def check_case(case: Case, seed: int, device: str) -> list[dict]:
    """The layer, quantize, integer and NaN checks of one case (layer and NaN only for the modes
    without an integer GEMM); one result dict each."""
    import torch
    from clq_compile.kernels.formats import get_format
    from clq_compile.kernels.packing import pack_int4
    from clq_compile.kernels.quantize import quantize_activation
    from clq_compile.kernels.reference import transform_activation
    from clq_compile.kernels.triton_gemm import quant_matmul
    from clq_compile.kernels.triton_linear import quant_linear_triton
    from clq_compile.kernels.triton_quantize import quantize_activation_triton

    v, m, n, k = case.variant, case.m, case.n, case.k
    cuda = device == "cuda"
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * (1 + 4 * torch.rand(m, 1, generator=g))).to(torch.bfloat16).to(device)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(device)
    wq, layer = _weights(case, g, device)
    mul, perm, rot = _transform(case, g, device)
    w_format, a_format = v.formats
    args = (layer["qweight"], layer["w_scale"], layer["w_zero"], bias, mul, perm, rot, k, w_format, a_format,
            v.w_group, v.a_group)
    results = []

    def result(check: str, ok: bool, **measured) -> None:
        results.append({"check": check, "ok": bool(ok), **measured})

    # layer, against float64 on the same quantized activations
    if cuda:
        _poison(((m, n), torch.bfloat16))
    out = quant_linear_triton(x, *args)
    transformed = transform_activation(x.float(), mul, perm, rot)
    if a_format == "none":
        ref = transformed.double() @ _dequantize64(wq).to(device).t() + bias.double()
    else:
        xa = quantize_activation(transformed, get_format(a_format), v.a_group or None)
        ref = _dequantize64(xa) @ _dequantize64(wq).to(device).t() + bias.double()
    finite = bool(torch.isfinite(out).all())
    rel = _rel(out, ref)
    result("layer", finite and rel <= TOL, rel_error=rel, finite=finite, tol=TOL)
    if not v.integer:
        _nan_check(x, out, args, result)
        return results

    # quantize kernel, against the reference quantizer
    q, scale = quantize_activation_triton(x, v.a_bits, v.a_group or None, mul, perm, rot)
    ref_q = xa.q.to(torch.int8)
    got_q = _unpack(q, v.a_bits)
    moved = (got_q.to(torch.int16) - ref_q.to(torch.int16)).abs()
    scale_rel = float(((scale - xa.scale) / xa.scale).abs().max())
    if rot is None:
        ok = bool(torch.equal(got_q, ref_q)) and bool(torch.equal(scale, xa.scale))
    else:
        ok = int(moved.max()) <= 1 and float((moved > 0).float().mean()) <= ROTATION_FLIPS and scale_rel <= 1e-5
    result("quantize", ok, integers_differing=float((moved > 0).float().mean()), max_step=int(moved.max()),
           scale_rel_diff=scale_rel)

    # integer accumulator, against the integer oracle; values keep every partial sum below 2^24
    a_hi = 8 if v.a_bits == 4 else (128 if v.w_bits == 4 else 16)
    w_hi = 8 if v.w_bits == 4 else 128
    a_int = torch.randint(-a_hi, a_hi, (m, k), generator=g, dtype=torch.int8)
    w_int = torch.randint(-w_hi, w_hi, (n, k), generator=g, dtype=torch.int8)
    a_st = (pack_int4(a_int) if v.a_bits == 4 else a_int).to(device)
    w_st = (pack_int4(w_int) if v.w_bits == 4 else w_int).to(device)
    a_ones = torch.ones(m, k // (v.a_group or k), device=device)
    w_ones = torch.ones(n, k // (v.w_group or k), device=device)
    if cuda:
        _poison(((m, n), torch.float32))
    got = quant_matmul(a_st, a_ones, w_st, w_ones, None, None, k, v.a_bits, v.w_bits, v.a_group, v.w_group,
                       torch.float32)
    exact = int_oracle(a_int.to(device), w_int.to(device))
    equal = bool(torch.equal(got, exact.to(torch.float32)))
    result("integer", equal, differing=float((got != exact.to(torch.float32)).float().mean()))

    _nan_check(x, out, args, result)
    return results


def _nan_check(x, out, args, result) -> None:
    """A NaN in one token of x (M > 1): that token's outputs all NaN, the others unchanged."""
    import torch
    from clq_compile.kernels.triton_linear import quant_linear_triton

    m, k = x.shape
    if m < 2:
        return
    x_nan = x.clone()
    x_nan[m // 2, k // 3] = float("nan")
    out_nan = quant_linear_triton(x_nan, *args)
    others = torch.ones(m, dtype=torch.bool, device=x.device)
    others[m // 2] = False
    nan_row = bool(torch.isnan(out_nan[m // 2]).all())
    kept = bool(torch.equal(out_nan[others], out[others]))
    result("nan", nan_row and kept, nan_row_all_nan=nan_row, other_rows_unchanged=kept)


def _dequantize64(quantized):
    """float64 [rows, K] of a Quantized: decode(q, zero) * scale group by group, without rounding.

    The decoded codes (integers, q - zero, or e4m3 values) are exact in float32; their products
    with the scales are taken in float64 (the format's own `dequantize` multiplies in float32).
    """
    q, zero = quantized.q, quantized.zero
    rows, k = q.shape
    g = quantized.group or k
    values = quantized.format.decode(q.reshape(rows, k // g, g), None if zero is None else zero.unsqueeze(-1))
    return (values.double() * quantized.scale.double().unsqueeze(-1)).reshape(rows, k)


def _unpack(q, bits: int):
    from clq_compile.kernels.packing import unpack_int4

    return unpack_int4(q) if bits == 4 else q


def sass_rows(cache: Path) -> list[dict]:
    """Per cubin in Triton's cache: its kernel name and the tensor-core instructions in its SASS."""
    tool = shutil.which("cuobjdump")
    if tool is None:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        tool = str(bundled) if bundled.exists() else None
    if tool is None:
        return [{"check": "sass", "ok": False, "error": "no cuobjdump on PATH or in the triton package"}]
    rows = []
    for cubin in sorted(cache.rglob("*.cubin")):
        sass = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True, text=True).stdout
        counts = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("IGMMA", "IMMA", "HGMMA", "HMMA", "QGMMA")}
        rows.append({"kernel": cubin.stem, "cubin": cubin.parent.name, "instructions": counts})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for kernel_check.jsonl (default $OUT, else bench/results/lease)")
    parser.add_argument("--dry-run", action="store_true", help="list the plan and its estimate; needs no CUDA")
    parser.add_argument("--interpret", action="store_true",
                        help="run the checks on tiny shapes under Triton's interpreter (CPU)")
    parser.add_argument("--configs", default="2",
                        help="autotune configs kept per list, or 'all' (default 2, as bench/kernels.py --lease)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no case after this many seconds; the rest are reported as not run")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    lease.import_project()
    keep = None if args.configs == "all" else int(args.configs)
    rows = lease.Rows(lease.out_dir(args.out), "kernel_check")
    cases = plan(tiny=args.interpret)

    import torch
    from clq_compile.kernels import triton_gemm, triton_weight_only

    kept_gemm = lease.limit_configs(triton_gemm, GEMM_LISTS, keep)
    kept_gemm.update({f"weight_only.{name}": n for name, n in
                      lease.limit_configs(triton_weight_only, WEIGHT_ONLY_LISTS, keep).items()})
    cost = estimate(cases, max(kept_gemm.values(), default=9))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rows.write("plan", dry_run=args.dry_run, seed=seed, configs=kept_gemm, estimate=cost,
               machine=lease.machine())
    if args.dry_run:
        for case in cases:
            rows.write("case", dry_run=True, variant=asdict(case.variant), M=case.m, N=case.n, K=case.k)
        return 0
    device = "cuda" if not args.interpret else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("kernel_check: no CUDA GPU here. Use --dry-run for the plan or --interpret for the checks on "
              "the CPU.", file=sys.stderr)
        return 2
    failed = not_run = 0
    budget = lease.Budget(args.budget_s)
    for i, case in enumerate(cases):
        where = {"variant": case.variant.name, "M": case.m, "N": case.n, "K": case.k}
        if not budget.allows(CASE_SECONDS):
            not_run += 1
            rows.write("check", **where, check="not run", ok=None, reason=f"out of time after {budget.elapsed():.0f} s")
            continue
        try:
            results = check_case(case, seed + i, device)
        except Exception as error:  # a crash is a failed case, and the run goes on to the next one
            results = [{"check": "run", "ok": False, "error": f"{type(error).__name__}: {error}"}]
        for r in results:
            failed += not r["ok"]
            rows.write("check", **where, **r)
    if device == "cuda":
        cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
        found = sass_rows(cache)
        for r in found:
            rows.write("sass", **r)
        if torch.cuda.get_device_capability()[0] == 9:
            gemms = [r for r in found if re.search("matmul|gemm", r.get("kernel", ""))]
            ok = bool(gemms) and all(r["instructions"]["IGMMA"] > 0 for r in gemms)
            failed += not ok
            rows.write("check", check="sass_igmma", ok=ok, gemm_cubins=len(gemms))
    verdict = "FAILED" if failed else ("incomplete" if not_run else "passed")
    rows.write("summary", failed=failed, not_run=not_run, checks=verdict, seconds=round(budget.elapsed()))
    rows.close()
    return 1 if failed else (3 if not_run else 0)


if __name__ == "__main__":
    sys.exit(main())
