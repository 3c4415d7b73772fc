"""What a 16-bit low-rank branch costs in weight bytes, next to the quantized weight it helps.

    python bench/lowrank_memory.py            # writes bench/results/lowrank-memory.{json,md}

Two parts:

- measured: the bundled digits DiT (width 96) compiled with `clq` and `clq+lowrank` at each
  `lowrank_rank` (capped per layer at min(out, in) / 4 = 24 here) at w4a4, quantized data-free
  (the branch's size does not depend on calibration): `clq_compile.explain.memory_report`'s
  quantized bytes of the selected layers against the same weights in bf16;
- arithmetic: the token GEMMs of one PixArt-Σ block (width 1152, feed-forward 4608) at rank 32,
  int4 codes (N·K/2 bytes) with one float32 scale per output channel against a branch of
  r·(N + K) bf16 numbers.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import clq_compile
from clq_compile.explain import memory_report
from clq_compile.workloads import load_transformer
from machine import machine_info

BENCH = Path(__file__).resolve().parent
RANKS = (4, 8, 16, 32)
# One PixArt-Σ block's token GEMMs: (out, in, how many).
# (The caption reaches cross-attention already projected to 1152 by the caption embedding, kept in 16 bit.)
PIXART_BLOCK = (("self- and cross-attention q/k/v/out", 1152, 1152, 8), ("feed-forward up", 4608, 1152, 1),
                ("feed-forward down", 1152, 4608, 1))


def digits_rows() -> list[dict]:
    model = load_transformer(BENCH / "assets" / "digits-dit")
    rows = []
    for recipe, rank in (("clq", None), *(("clq+lowrank", r) for r in RANKS)):
        torch._dynamo.reset()
        options = {"bits": "w4a4", "recipe": recipe, "kernels": "reference",
                   **({"lowrank_rank": rank} if rank else {})}
        qt = torch.compile(model, backend="clq", options=options)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qt(hidden_states=torch.zeros(1, 1, 16, 16), timestep=torch.tensor([500]), class_labels=torch.tensor([3]))
        report = memory_report(qt)
        rows.append({"recipe": recipe, "lowrank_rank": rank, "bf16_bytes": report["bf16_bytes"],
                     "quantized_bytes": report["quantized_bytes"],
                     "ratio": round(report["quantized_bytes"] / report["bf16_bytes"], 3)})
    return rows


def pixart_rows(rank: int = 32) -> list[dict]:
    rows = []
    for what, n, k, count in PIXART_BLOCK:
        int4 = count * (n * k // 2 + 4 * n)
        branch = count * rank * (n + k) * 2
        rows.append({"layers": what, "out": n, "in": k, "count": count, "int4_bytes": int4, "branch_bytes": branch,
                     "bf16_bytes": count * n * k * 2, "branch_over_int4": round(branch / int4, 3)})
    return rows


def markdown(digits: list[dict], pixart: list[dict]) -> str:
    lines = ["# Low-rank branch: weight bytes", "",
             "Digits DiT (w4a4, the selected layers; measured by memory_report):", "",
             "| recipe | lowrank_rank | quantized / bf16 bytes |", "|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['lowrank_rank'] or '—'} | {r['ratio']:.3f} |" for r in digits]
    total = {k: sum(r[k] for r in pixart) for k in ("int4_bytes", "branch_bytes", "bf16_bytes")}
    lines += ["", "One PixArt-Σ block's token GEMMs at rank 32 (arithmetic):", "",
              "| layers | out x in | branch / int4 bytes |", "|---|---|---|"]
    lines += [f"| {r['layers']} (x{r['count']}) | {r['out']} x {r['in']} | {r['branch_over_int4']:.3f} |" for r in pixart]
    lines += ["", f"Block: int4 {total['int4_bytes'] / total['bf16_bytes']:.3f}x of bf16, with the branch "
                  f"{(total['int4_bytes'] + total['branch_bytes']) / total['bf16_bytes']:.3f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    digits, pixart = digits_rows(), pixart_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank-memory.json").write_text(json.dumps(
        {"machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
         "digits": digits, "pixart_block": pixart}, indent=1) + "\n")
    text = markdown(digits, pixart)
    (args.out / "lowrank-memory.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
