"""What folding OBS's activation transform into the producing layers costs (option `fold`).

With `fold` on, the activation transform of every output projection whose input comes from value
projections through attention (passes/folding.py proves which) is stored in the value
projections' output rows instead of running online: CLQ's rotation G, which then has to stay
inside one attention head, and SmoothQuant's multiplier 1/s. This script measures both settings
on the same calibration:

- the digits DiT (bench/assets/digits-dit), as shipped and with x50 injected outlier channels:
  PSNR / SSIM / class accuracy of W4A4 samples against full precision (same noise);
- the stress models (clq_compile/stress.py): relative error of the final latents of a 10-step
  loop, mean over seeds;

and how many layers lose their online rotation. Writes bench/results/fold.{json,md}.

    python bench/fold.py                        # about 8 minutes on 2 CPU cores
    python bench/fold.py --recipes clq --seeds 1 --samples-per-class 1 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import clq_compile
from clq_compile.calibration import model_state
from clq_compile.cli import positive_int
from clq_compile.stress import compare_recipes, stress_model
from clq_compile.tiny_models import FAMILIES, make_inputs
from clq_compile.workloads import calibration_calls, load_model, score, task_for

from machine import machine_info
from quality import DEFAULT_MODEL, outlier_variant, quantize_and_sample

SETTINGS = {"online": {"fold": False}, "folded": {"fold": True}}


def folded_layers(family: str) -> dict[str, int]:
    """Quantized layers of a stress model, and how many of them run no online rotation when folded."""
    torch._dynamo.reset()
    model = stress_model(family, seed=0)
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "fold": True})
    with torch.no_grad(), clq_compile.calibrating(qt):
        qt(**make_inputs(family, seed=0))
    layers = model_state(qt).layers
    return {"layers": len(layers),
            "rotation_folded": sum(bool(layer.fold and layer.fold.producers) for layer in layers.values())}


def digits_rows(recipes: list[str], samples_per_class: int, steps: int, calib_samples: int) -> list[dict[str, Any]]:
    model = load_model(DEFAULT_MODEL)
    task = task_for(model, samples_per_class, calib_samples, seed=0)
    rows = []
    for variant, m in (("digits", model), ("digits x50 outliers", outlier_variant(model, 50.0))):
        with torch.no_grad():
            reference = task.draw(m, task.evaluation, steps)
        calls = calibration_calls(task, m, steps, min(steps, 10))
        for recipe in recipes:
            for setting, options in SETTINGS.items():
                images, seconds, _ = quantize_and_sample(m, task, calls, recipe, "w4a4", steps, options)
                rows.append({"model": variant, "recipe": recipe, "setting": setting,
                             **score(task, images, reference), "quantize_seconds": round(seconds, 2)})
                print(f"  {variant} {recipe} {setting}: {rows[-1]}", flush=True)
    return rows


def stress_rows(recipes: list[str], seeds: int) -> list[dict[str, Any]]:
    rows = []
    for family in FAMILIES:
        for setting, options in SETTINGS.items():
            results = compare_recipes(family, recipes, "w4a4", tuple(range(seeds)), options=options)
            for recipe, r in results.items():
                rows.append({"model": family, "recipe": recipe, "setting": setting,
                             "error": statistics.mean(r["error"]), "errors": r["error"]})
                print(f"  {family} {recipe} {setting}: {rows[-1]['error']:.4f}", flush=True)
    return rows


def _markdown(digits: list[dict], stress: list[dict], counts: dict[str, dict], machine: dict) -> str:
    lines = ["# Folding the activation transform into the producers (option `fold`)", "",
             "W4A4. `online`: every activation transform runs in the activation-quantization step (the "
             "default). `folded`: output projections fed by attention get theirs from the value "
             "projections' output rows (CLQ: G inside each head; SmoothQuant: 1/s) and run none.", "",
             "## Digits DiT (PSNR / SSIM / accuracy against full-precision samples, same noise)", "",
             "| model | recipe | online | folded |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in digits):
        for recipe in dict.fromkeys(r["recipe"] for r in digits):
            cells = []
            for setting in SETTINGS:
                r = next(x for x in digits if (x["model"], x["recipe"], x["setting"]) == (model, recipe, setting))
                cells.append(f"{r['psnr']:.2f} dB / {r['ssim']:.3f} / {r['accuracy']}")
            lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
    lines += ["", "## Stress models (relative error of the final latents, mean over seeds; lower is better)", "",
              "| recipe | setting | " + " | ".join(FAMILIES) + " |", "|---|---|" + "---|" * len(FAMILIES)]
    for recipe in dict.fromkeys(r["recipe"] for r in stress):
        for setting in SETTINGS:
            cells = [f"{next(x for x in stress if (x['model'], x['recipe'], x['setting']) == (f, recipe, setting))['error']:.4f}"
                     for f in FAMILIES]
            lines.append(f"| {recipe} | {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Layers whose rotation is folded (no online transform), of the quantized layers: " +
              ", ".join(f"{f} {c['rotation_folded']}/{c['layers']}" for f, c in counts.items()), "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="clq,clq+gptq,smoothquant", help="comma-separated recipes")
    parser.add_argument("--seeds", type=positive_int, default=3, help="stress models per family")
    parser.add_argument("--samples-per-class", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=20, help="digits sampling steps")
    parser.add_argument("--calib-samples", type=positive_int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    warnings.simplefilter("ignore")
    print("digits DiT ...", flush=True)
    digits = digits_rows(recipes, args.samples_per_class, args.steps, args.calib_samples)
    print("stress models ...", flush=True)
    stress = stress_rows(recipes, args.seeds)
    counts = {f: folded_layers(f) for f in FAMILIES}
    machine = {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fold.json").write_text(json.dumps(
        {"machine": machine, "digits": digits, "stress": stress, "folded_layers": counts}, indent=1))
    text = _markdown(digits, stress, counts, machine)
    (args.out / "fold.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
