"""Compare every recipe on stress models: tiny DiT, PixArt, SD3 and Flux configs with trained-like
weights and injected activation outliers (clq_compile/stress.py).

For each model family, bit width and recipe: the relative error of the final sample of a short
sampling loop (same noise as full precision) averaged over seeds, and the time to quantize.
Writes bench/results/recipes.json and bench/results/recipes.md with the machine it ran on.

    python bench/recipes.py                      # all families, recipes, w8a8 / w4a8 / w4a4
    python bench/recipes.py --families pixart --bits w4a4 --seeds 3
    python bench/recipes.py --families dit --recipes clq --options '{"cbc_reference": "fp-model"}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

from clq_compile.passes.recipes import RECIPES
from machine import machine_info
from clq_compile.stress import compare_recipes
from clq_compile.tiny_models import FAMILIES


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = ["# Recipes on stress models", "",
             "Relative error ‖x̂ − x‖/‖x‖ of the final latents of a 10-step sampling loop against full "
             "precision (same noise), mean over seeds (min–max in brackets); lower is better. Stress "
             "models: width 256 (8 heads x 32), Student-t weights, two x50 outlier channels per attention "
             "value projection (function-preserving).", ""]
    for bits in dict.fromkeys(r["bits"] for r in rows):
        families = list(dict.fromkeys(r["model"] for r in rows if r["bits"] == bits))
        lines += [f"## {bits}", "", "| recipe | " + " | ".join(families) + " | quantize s (mean) |",
                  "|---|" + "---|" * (len(families) + 1)]
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            cells, seconds = [], []
            for family in families:
                row = next(r for r in rows if (r["model"], r["recipe"], r["bits"]) == (family, recipe, bits))
                cells.append(f"{row['error']:.4f} ({min(row['errors']):.3f}–{max(row['errors']):.3f})")
                seconds.append(row["quantize_seconds"])
            lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {statistics.mean(seconds):.1f} |")
        lines.append("")
    lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model families")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--bits", default="w8a8,w4a8,w4a4", help="comma-separated bit widths")
    parser.add_argument("--seeds", type=int, default=3, help="stress models (and noises) per family")
    parser.add_argument("--options", type=json.loads, default={},
                        help='further backend options as JSON, e.g. \'{"cbc_reference": "fp-model"}\'')
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; the recipes are {', '.join(RECIPES)}")
    warnings.simplefilter("ignore")
    rows = []
    for bits in args.bits.split(","):
        for family in args.families.split(","):
            print(f"{family} {bits} ...", flush=True)
            results = compare_recipes(family, args.recipes.split(","), bits, tuple(range(args.seeds)),
                                      options=args.options)
            for recipe, r in results.items():
                rows.append({"model": family, "recipe": recipe, "bits": bits,
                             "error": statistics.mean(r["error"]), "errors": r["error"],
                             "quantize_seconds": statistics.mean(r["quantize_seconds"])})
                print(f"  {recipe:14s} {rows[-1]['error']:.4f}", flush=True)
    machine = {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    text = _markdown(rows, machine)
    (args.out / "recipes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
