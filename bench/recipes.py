"""Compare every recipe on stress models: tiny DiT, PixArt, SD3 and Flux configs with trained-like
weights and injected activation outliers (clq_compile/stress.py).

For each model family, bit width and recipe: the relative error of the final sample of a short
sampling loop (same noise as full precision) averaged over seeds, and the time to quantize.
Writes recipes.json and recipes.md (in --out, default bench/results) with the machine it ran on;
recipes.jsonl there grows by one line per family x bits x seed as each finishes, so a run
stopped early keeps what it measured.

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

import torch

from clq_compile.cli import positive_int
from clq_compile.passes.recipes import RECIPES
from clq_compile.stress import compare_recipes
from clq_compile.tiny_models import FAMILIES
from machine import machine_info


def recipes_table(rows: list[dict], bits: str) -> list[str]:
    """The markdown table of `rows` at `bits`: a line per recipe, a column per family, mean (min–max)."""
    families = list(dict.fromkeys(r["model"] for r in rows if r["bits"] == bits))
    lines = ["| recipe | " + " | ".join(families) + " | quantize s (mean) |", "|---|" + "---|" * (len(families) + 1)]
    for recipe in dict.fromkeys(r["recipe"] for r in rows if r["bits"] == bits):
        cells, seconds = [], []
        for family in families:
            row = next(r for r in rows if (r["model"], r["recipe"], r["bits"]) == (family, recipe, bits))
            cells.append(f"{row['error']:.4f} ({min(row['errors']):.3f}–{max(row['errors']):.3f})")
            seconds.append(row["quantize_seconds"])
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {statistics.mean(seconds):.1f} |")
    return lines


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = ["# Recipes on stress models", "",
             "Relative error ‖x̂ − x‖/‖x‖ of the final latents of a 10-step sampling loop against full "
             "precision (same noise), mean over seeds (min–max in brackets); lower is better. Stress "
             "models: width 256 (8 heads x 32), Student-t weights, two x50 outlier channels per attention "
             "value projection (function-preserving).", ""]
    for bits in dict.fromkeys(r["bits"] for r in rows):
        lines += [f"## {bits}", "", *recipes_table(rows, bits), ""]
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
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 on a machine others are using)")
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; the recipes are {', '.join(RECIPES)}")
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "recipes.jsonl"
    recipes = args.recipes.split(",")
    rows = []
    for bits in args.bits.split(","):
        for family in args.families.split(","):
            print(f"{family} {bits} ...", flush=True)
            results = {r: {"error": [], "quantize_seconds": []} for r in recipes}
            for seed in range(args.seeds):
                one = compare_recipes(family, recipes, bits, (seed,), options=args.options)
                with journal.open("a") as f:
                    for recipe, r in one.items():
                        f.write(json.dumps({"model": family, "recipe": recipe, "bits": bits, "seed": seed,
                                            "error": r["error"][0],
                                            "quantize_seconds": r["quantize_seconds"][0]}) + "\n")
                        results[recipe]["error"] += r["error"]
                        results[recipe]["quantize_seconds"] += r["quantize_seconds"]
            for recipe, r in results.items():
                rows.append({"model": family, "recipe": recipe, "bits": bits,
                             "error": statistics.mean(r["error"]), "errors": r["error"],
                             "quantize_seconds": statistics.mean(r["quantize_seconds"])})
                print(f"  {recipe:14s} {rows[-1]['error']:.4f}", flush=True)
    machine = {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    (args.out / "recipes.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    text = _markdown(rows, machine)
    (args.out / "recipes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
