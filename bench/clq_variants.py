"""CLQ's own choices, as this project makes them and as the CLQ paper's reviewers describe them.

Each variant changes one option of the `clq` recipes (clq_compile/options.py) from the choices
this project made before these options existed ("earlier defaults", spelled out, so that the
results keep their meaning whatever the defaults become):

| variant | options | the reviewers' reading |
|---|---|---|
| earlier defaults | obs_swap spread, cbc_prefix all, clps_target peak-error, clps_window 1, clps_norm l2 | — |
| obs_swap=group | {"obs_swap": "group"} | channel swapping groups channels of similar magnitude |
| cbc_prefix=previous | {"cbc_prefix": "previous"} | CBC quantizes only the previous block |
| clps_target=max-variance | {"clps_target": "max-variance"} | CLPS targets the largest-variance layer |
| clps_window=2 / 3 | {"clps_window": 2 / 3} | CLPS looks up to 3 blocks downstream |
| clps_norm=l1 | {"clps_norm": "l1"} | CLPS scores with an L1 norm |
| paper | all five together (window 3) | the paper as its reviewers describe it |

Two parts, each its own process (so two cores run them side by side):

- `--part digits`: the bundled digits DiT and its copy with injected outliers (bench/quality.py's
  task: class-conditional DDIM, `--samples-per-class` per digit, calibration from seed 1), each
  variant x recipe (`--recipes`, default clq and clq+gptq) at `--bits`: PSNR / SSIM against the
  full-precision samples, class accuracy.
- `--part stress`: the stress models (clq_compile/stress.py: DiT, PixArt, SD3, Flux configs with
  trained-like weights and injected outliers, `--blocks` transformer blocks), `--seeds` of each,
  recipe clq: the relative error of the final sample of a 10-step loop against full precision.

Rows are appended to `<part>.jsonl` in `--out` (digits at `--seed` s > 0: `digits-seed<s>.jsonl`)
as each cell finishes; every process then writes
`variants.json` and `variants.md` from all the rows in the folder, so the process that ends last
leaves the whole table.

    python bench/clq_variants.py --part digits --threads 1 --out bench/results/clq-variants &
    python bench/clq_variants.py --part stress --threads 1 --out bench/results/clq-variants
    python bench/clq_variants.py --part stress --blocks 4 --variants "earlier defaults",cbc_prefix=previous,\
        clps_window=2,clps_window=3 --threads 1 --out bench/results/clq-variants-4-blocks
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clq_compile.cli import positive_int
from clq_compile.stress import compare_recipes
from clq_compile.tiny_models import FAMILIES
from clq_compile.workloads import calibration_calls, load_transformer, score, task_for
from machine import machine_info
from quality import DEFAULT_MODEL, append_row, outlier_variant, quantize_and_sample

log = logging.getLogger("clq_compile.bench")

PAPER = {"obs_swap": "group", "cbc_prefix": "previous", "clps_target": "max-variance", "clps_window": 3,
         "clps_norm": "l1"}
BASE = "earlier defaults"
EARLIER = {"obs_swap": "spread", "cbc_prefix": "all", "clps_target": "peak-error", "clps_window": 1,
           "clps_norm": "l2"}
VARIANTS: dict[str, dict[str, Any]] = {
    BASE: EARLIER,
    "obs_swap=group": {**EARLIER, "obs_swap": "group"},
    "cbc_prefix=previous": {**EARLIER, "cbc_prefix": "previous"},
    "clps_target=max-variance": {**EARLIER, "clps_target": "max-variance"},
    "clps_window=2": {**EARLIER, "clps_window": 2},
    "clps_window=3": {**EARLIER, "clps_window": 3},
    "clps_norm=l1": {**EARLIER, "clps_norm": "l1"},
    "paper": PAPER,
}
PARTS = ("digits", "stress")


def run_digits(args, journal: Path, progress: tqdm) -> None:
    model = load_transformer(DEFAULT_MODEL)
    task = task_for(model, args.samples_per_class, 10, args.seed, None)
    name = DEFAULT_MODEL.resolve().name
    for variant_name, module in ((name, model), (f"{name}+outliers", outlier_variant(model, 50.0))):
        with torch.no_grad():
            reference = task.draw(module, task.evaluation, args.steps)
        calls = calibration_calls(task, module, args.steps, 10)
        for variant in args.variants:
            for recipe in args.recipes:
                progress.set_postfix_str(f"{variant_name} {variant} {recipe}")
                images, seconds, _ = quantize_and_sample(module, task, calls, recipe, args.bits, args.steps,
                                                      VARIANTS[variant])
                append_row(journal, {"model": variant_name, "variant": variant, "recipe": recipe,
                                     "bits": args.bits, "seed": args.seed, **score(task, images, reference),
                                     "quantize_seconds": round(seconds, 2)})
                progress.update()


def run_stress(args, journal: Path, progress: tqdm) -> None:
    for family in FAMILIES:
        for seed in range(args.seeds):
            for variant in args.variants:
                progress.set_postfix_str(f"{family} seed {seed} {variant}")
                one = compare_recipes(family, ["clq"], args.bits, (seed,), options=VARIANTS[variant],
                                      blocks=args.blocks)["clq"]
                append_row(journal, {"model": family, "variant": variant, "recipe": "clq", "bits": args.bits,
                                     "blocks": args.blocks, "seed": seed, "error": one["error"][0],
                                     "quantize_seconds": round(one["quantize_seconds"][0], 2)})
                progress.update()


def journal_name(part: str, seed: int) -> str:
    """digits.jsonl, digits-seed1.jsonl, ... (one digits journal per evaluation seed), stress.jsonl."""
    return f"{part}{f'-seed{seed}' if part == 'digits' and seed else ''}.jsonl"


def read_rows(out: Path) -> dict[str, list[dict]]:
    """{part: rows of every journal of that part in `out`}."""
    rows: dict[str, list[dict]] = {}
    for part in PARTS:
        for journal in sorted(out.glob(f"{part}*.jsonl")):
            rows.setdefault(part, []).extend(json.loads(line) for line in journal.read_text().splitlines() if line)
    return rows


def _cell(mine: dict[int, float], base: dict[int, float], spec: str, higher: bool) -> str:
    """`mine` ({seed: value}) as its mean; against the base (on the seeds both measured) its mean
    there and on how many of those seeds `mine` is better: "29.27 (3/3 vs 28.93)"."""
    if not mine:
        return "—"
    shown = format(statistics.mean(mine.values()), spec)
    if mine is base:
        return shown
    common = [s for s in mine if s in base]
    if not common:
        return shown
    wins = sum((mine[s] > base[s]) if higher else (mine[s] < base[s]) for s in common)
    return f"{shown} ({wins}/{len(common)} vs {format(statistics.mean(base[s] for s in common), spec)})"


def digits_table(digits: list[dict]) -> list[str]:
    """Caption and table of the digits rows: mean PSNR per variant x model x recipe over seeds."""
    models = list(dict.fromkeys(r["model"] for r in digits))
    recipes = list(dict.fromkeys(r["recipe"] for r in digits))
    seeds = sorted({r.get("seed", 0) for r in digits})
    psnr: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in digits:
        psnr.setdefault((r["model"], r["variant"], r["recipe"]), {})[r.get("seed", 0)] = r["psnr"]
    lines = [f"Digits DiT ({digits[0]['bits']}): PSNR dB against full precision, mean over the evaluation "
             f"seeds measured ({', '.join(map(str, seeds))}; higher is better); in brackets, on how many "
             f"of them it beats the {BASE}, and their mean on the same seeds:", "",
             "| variant | " + " | ".join(f"{m} {r}" for m in models for r in recipes) + " |",
             "|---|" + "---|" * (len(models) * len(recipes))]
    for variant in dict.fromkeys(r["variant"] for r in digits):
        shown = []
        for m in models:
            for r in recipes:
                base = psnr.get((m, BASE, r), {})
                shown.append(_cell(base if variant == BASE else psnr.get((m, variant, r), {}), base, ".2f", True))
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return lines


def stress_table(stress: list[dict]) -> list[str]:
    """Caption and table of the stress rows: mean error per variant x family over seeds."""
    families = list(dict.fromkeys(r["model"] for r in stress))
    errors: dict[tuple[str, str], dict[int, float]] = {}
    for r in stress:
        errors.setdefault((r["model"], r["variant"]), {})[r["seed"]] = r["error"]
    lines = [f"Stress models ({stress[0]['bits']}, recipe clq, {stress[0].get('blocks', 2)} blocks): relative "
             f"error of the final sample, mean over seeds (lower is better); in brackets, on how many seeds "
             f"it beats the {BASE}, and their mean:", "",
             "| variant | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for variant in dict.fromkeys(r["variant"] for r in stress):
        shown = []
        for f in families:
            base = errors.get((f, BASE), {})
            shown.append(_cell(base if variant == BASE else errors.get((f, variant), {}), base, ".4f", False))
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return lines


def markdown(rows: dict[str, list[dict]], runs: dict[str, dict]) -> str:
    lines = ["# CLQ's choices: this project's earlier defaults against the CLQ paper's reviewers' reading", ""]
    for part, table in (("digits", digits_table), ("stress", stress_table)):
        if rows.get(part):
            lines += [*table(rows[part]), ""]
    lines.append("Variants: " + "; ".join(f"{k} = {json.dumps(v)}" for k, v in VARIANTS.items()) + ".")
    for part, run in runs.items():
        m = run["machine"]
        lines += ["", f"{part}: `{run['command']}` on {m.get('cpu_model')} ({m.get('cpu_capability')}, "
                      f"{m.get('torch_threads')} thread(s)), torch {m.get('torch')}, {run['date']}, "
                      f"{run['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> None:
    rows = read_rows(out)
    runs = {path.name[:-len("-machine.json")]: json.loads(path.read_text())
            for path in sorted(out.glob("*-machine.json"))}
    (out / "variants.json").write_text(json.dumps({"runs": runs, "rows": rows, "variants": VARIANTS}, indent=1) + "\n")
    (out / "variants.md").write_text(markdown(rows, runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--variants", type=lambda t: t.split(","), default=list(VARIANTS),
                        help="comma-separated variant names (default: all)")
    parser.add_argument("--recipes", type=lambda t: t.split(","), default=["clq", "clq+gptq"],
                        help="digits part: comma-separated clq recipes (default clq,clq+gptq)")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--samples-per-class", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--seeds", type=positive_int, default=10, help="stress part: models per family")
    parser.add_argument("--blocks", type=positive_int, default=2,
                        help="stress part: transformer blocks of each model (2, the stress models' own, "
                             "cannot tell cbc_prefix or clps_window > 1 apart; default 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="digits part: seed of the evaluation noise; calibration uses seed + 1 (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (new, or holding the other part's results)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the variants are {', '.join(VARIANTS)}")
    journal = args.out / journal_name(args.part, args.seed)
    if journal.exists():
        parser.error(f"{journal} exists: choose a new --out, or remove it to run the {args.part} part again")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = (2 * len(args.variants) * len(args.recipes) if args.part == "digits"
             else len(FAMILIES) * args.seeds * len(args.variants))
    with tqdm(total=cells, desc=args.part, dynamic_ncols=True) as progress:
        (run_digits if args.part == "digits" else run_stress)(args, journal, progress)
    run = {"machine": machine_info(),
           "command": shlex.join(["python", "bench/clq_variants.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "wall_seconds": round(time.perf_counter() - started, 1)}
    (args.out / f"{journal.stem}-machine.json").write_text(json.dumps(run, indent=2) + "\n")
    write_report(args.out)
    print((args.out / "variants.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
