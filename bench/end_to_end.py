"""A PixArt-Σ-size transformer end to end on one GPU: latency, memory, calibration time.

    python bench/end_to_end.py --lease [--out DIR] [--blocks N] [--budget-s S]   # on a CUDA GPU
    python bench/end_to_end.py --dry-run [--out DIR]   # the same plan on a tiny PixArt, on the CPU

The model is a `PixArtTransformer2DModel` with PixArt-Σ's published sizes (28 blocks, width 1152,
16 heads of 72, feed-forward 4608, cross-attention to 300 caption tokens of width 4096 projected
to 1152) and trained-like random weights (clq_compile/stress.py: Student-t, no downloads), in
bf16, on 4096 image tokens (a 1024 px image's 128 x 128 latent in 2 x 2 patches), batch 2 (CFG).
Rows, in this order, each skipped (and said so) once the time budget is spent:

- forward: bf16 eager, bf16 `torch.compile` (Inductor), `backend="clq"` at w8a8 and w4a4
  (data-free: weights rounded with the default recipe's block Hadamard, dynamic activations;
  kernels on, Inductor for the rest; full-precision copies released): median of 20 forwards
  after warm-up, and of CUDA-graph replays of one forward where capture works, peak memory (of
  the whole row, and of the forwards alone), weight bytes, first-call (compile + quantize)
  seconds, ratios to bf16 Inductor;
- profile: a torch.profiler split of the w4a4 forward into quantize kernels, GEMMs, attention
  and the rest;
- calibration: wall time and peak memory of `calibrating()` over 8 calls plus the recipe, for
  `clq` and `rtn`, with and without `offload`.

Rows are JSON lines in <out>/end_to_end.jsonl, written as each finishes (bench/lease.py).
`--blocks` cuts the block count (the rows say how many ran).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import kernel_check
import kernels  # bench/kernels.py
import lease

SIGMA = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             patch_size=2, sample_size=128, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
TINY = dict(SIGMA, num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_size=8,
            cross_attention_dim=32, caption_channels=24)
TEXT_TOKENS = 300
BATCH = 2
RUNS = 20
CALIBRATION_CALLS = 8
FORWARDS = ("bf16_eager", "bf16_inductor", "clq_w8a8", "clq_w4a4")
CALIBRATIONS = (("clq", False), ("clq", True), ("rtn", False), ("rtn", True))
# Classes of the profile, first match wins, matched against kernel (or, on the CPU, op) names.
PROFILE_CLASSES = (("quantize", ("quantize",)),
                   ("gemm", ("matmul", "gemm", "nvjet", "cutlass", "xmma", "quant_linear", "addmm", "aten::mm")),
                   ("attention", ("attention", "flash", "fmha", "sdpa")))


def build(config: dict, seed: int = 0):
    """The model on the CPU in bf16, with trained-like weights drawn from `seed`."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from clq_compile.stress import trained_like_weights

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PixArtTransformer2DModel(**config)
        return trained_like_weights(model, seed).to(torch.bfloat16).eval()


def make_inputs(config: dict, text_tokens: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    side = config["sample_size"]
    return {"hidden_states": torch.randn(BATCH, config["in_channels"], side, side, generator=g),
            "timestep": torch.randint(0, 1000, (BATCH,), generator=g),
            "encoder_hidden_states": torch.randn(BATCH, text_tokens, config["caption_channels"], generator=g),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def to_device(inputs: dict, device: str) -> dict:
    import torch

    return {k: v.to(device, torch.bfloat16 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
            else v for k, v in inputs.items()}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, runs: int, device: str) -> float:
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def forward_row(variant: str, cpu_model, inputs: dict, device: str, runs: int) -> tuple[dict, object]:
    """Latency and memory of one variant; returns (row, the callable, for the profile)."""
    import torch

    import clq_compile

    _peak_reset(device)
    model = _copy(cpu_model).to(device)
    if variant == "bf16_eager":
        fn = model
    elif variant == "bf16_inductor":
        fn = torch.compile(model)
    else:
        fn = torch.compile(model, backend=clq_compile.clq_backend, options={"bits": variant.split("_")[1]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(device)
        t0 = time.perf_counter()
        fn(**inputs)
        _sync(device)
        first = time.perf_counter() - t0
        row = {"variant": variant, "first_call_s": first}
        if variant.startswith("clq"):
            report = clq_compile.memory_report(fn)
            clq_compile.release_weights(fn)
            row.update(quantized_layer_bytes=report["quantized_bytes"], bf16_layer_bytes=report["bf16_bytes"],
                       weight_ratio_vs_bf16=report["quantized_bytes"] / report["bf16_bytes"])
        else:
            row["bf16_weight_bytes"] = sum(p.numel() * 2 for p in model.parameters())

        def call():
            return fn(**inputs)

        peak = _peak_bytes(device)
        _peak_reset(device)
        for _ in range(3):
            call()
        row["ms"] = _median_ms(call, runs, device)
        row["forward_peak_bytes"] = _peak_bytes(device)
        if device == "cuda":
            try:
                row["graph_ms"] = kernels.graph_ms(call)
            except Exception as error:  # noqa: BLE001  (capture is optional: say why it did not apply)
                row["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    # Peak over the row: the first call (compile, quantize, full-precision weights still there)
    # included; forward_peak_bytes: the forwards alone, after release_weights.
    row["peak_bytes"] = None if peak is None else max(peak, row["forward_peak_bytes"])
    return row, call


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _release(device: str) -> None:
    """Drop what a row compiled and allocated before the next one measures its memory."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def profile_row(call, device: str) -> dict:
    """Device time of one forward split into PROFILE_CLASSES and the rest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with torch.no_grad(), profile(activities=activities) as prof:
        call()
        _sync(device)
    split = {name: 0.0 for name, _ in PROFILE_CLASSES} | {"other": 0.0}
    for event in prof.key_averages():
        if device == "cuda":
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        name = event.key.lower()
        kind = next((c for c, words in PROFILE_CLASSES if any(w in name for w in words)), "other")
        split[kind] += us / 1e3
    total = sum(split.values()) or 1.0
    return {"variant": "clq_w4a4", "ms": split, "fraction": {k: v / total for k, v in split.items()}}


def calibration_row(recipe: str, offload: bool, cpu_model, calls: list[dict], device: str) -> dict:
    import torch

    import clq_compile

    _peak_reset(device)
    model = _copy(cpu_model).to(device)
    qt = torch.compile(model, backend=clq_compile.clq_backend,
                       options={"bits": "w4a4", "recipe": recipe, "offload": offload})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(device)
        t0 = time.perf_counter()
        with clq_compile.calibrating(qt):
            for inputs in calls:
                qt(**inputs)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"recipe": recipe, "offload": offload, "calls": len(calls), "seconds": seconds,
            "peak_bytes": _peak_bytes(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", action="store_true",
                        help="sized for a GPU lease: a 240 s budget, two autotune configs per list")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on a tiny PixArt, on the CPU")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 28, PixArt-Σ's)")
    parser.add_argument("--out", help="folder for end_to_end.jsonl (default $OUT, else bench/results/lease)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*FORWARDS, "profile", "calibration"],
                        help="rows to leave out")
    args = parser.parse_args(argv)
    lease.import_project()
    import torch

    from clq_compile.kernels import triton_gemm

    keep = kernels.LEASE_CONFIGS if args.lease else None
    configs = lease.limit_configs(triton_gemm, kernel_check.GEMM_LISTS, keep)
    config = dict(TINY if args.dry_run else SIGMA)
    if args.blocks is not None:
        config["num_layers"] = args.blocks
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("end_to_end.py: no CUDA GPU here. --dry-run runs the same plan on a tiny PixArt on the CPU.",
              file=sys.stderr)
        return 2
    rows = lease.Rows(lease.out_dir(args.out), "end_to_end")
    budget = lease.Budget(args.budget_s or (240.0 if args.lease else None))
    tokens = (config["sample_size"] // config["patch_size"]) ** 2
    text = 6 if args.dry_run else TEXT_TOKENS
    runs = 3 if args.dry_run else RUNS
    rows.write("plan", dry_run=args.dry_run, autotune_configs=configs, config=config, image_tokens=tokens, text_tokens=text, batch=BATCH,
               runs=runs, budget_s=budget.seconds, machine=lease.machine())
    t0 = time.perf_counter()
    cpu_model = build(config)
    inputs = to_device(make_inputs(config, text, 0), device)
    rows.write("setup", seconds=time.perf_counter() - t0,
               parameters=sum(p.numel() for p in cpu_model.parameters()))
    failed = 0
    reference = None
    for variant in FORWARDS:
        if variant in args.skip:
            continue
        if not budget.allows(0):
            rows.write("row", variant=variant, skipped=f"out of time after {budget.elapsed():.0f} s")
            continue
        try:
            row, call = forward_row(variant, cpu_model, inputs, device, runs)
        except Exception as error:  # noqa: BLE001  (a failing variant is a row; the next one runs)
            failed += 1
            rows.write("row", variant=variant, error=f"{type(error).__name__}: {str(error)[:300]}")
            continue
        if variant == "bf16_inductor":
            reference = row["ms"]
        if reference:
            row["speedup_vs_bf16_inductor"] = reference / row["ms"]
        rows.write("row", blocks=config["num_layers"], **row)
        if variant == "clq_w4a4" and "profile" not in args.skip and budget.allows(0):
            rows.write("profile", **profile_row(call, device))
        del call
        _release(device)
    if "calibration" not in args.skip:
        calls = [to_device(make_inputs(config, text, seed), device) for seed in range(CALIBRATION_CALLS)]
        for recipe, offload in CALIBRATIONS:
            if not budget.allows(0):
                rows.write("calibration", recipe=recipe, offload=offload,
                           skipped=f"out of time after {budget.elapsed():.0f} s")
                continue
            try:
                rows.write("calibration", blocks=config["num_layers"],
                           **calibration_row(recipe, offload, cpu_model, calls, device))
                _release(device)
            except Exception as error:  # noqa: BLE001
                failed += 1
                rows.write("calibration", recipe=recipe, offload=offload,
                           error=f"{type(error).__name__}: {str(error)[:300]}")
    rows.write("summary", failed=failed, seconds=round(budget.elapsed()))
    rows.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
