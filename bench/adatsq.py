"""AdaTSQ's bit allocation on the digits DiT: quality against average bits, and the Pareto front.

    python bench/adatsq.py --threads 1                      # the defaults below, about 10 minutes
    python bench/adatsq.py --budgets 5,6 --samples-per-class 2 --steps 10 --out /tmp/a

For each model variant (the bundled digits DiT and its copy with injected outlier channels, as in
bench/quality.py, with the same sampler, calibration and scores) this runs

- the static recipes at W4A4 / W4A8 / W8A8 (4, 6 and 8 average bits): clq, and adatsq's base
  recipe (clq+gptq by default, `--base`);
- recipe adatsq at every `--budgets` average bit-width (its four timestep buckets), and once at 6
  bits with one bucket (`timestep_buckets` 1: a bit-width per layer only, the same for every step);
- the base recipe at W4A8 with four timestep buckets (`timestep_buckets` 4: adatsq's uniform
  W4A8 state, the time-aware parameters without the mixed bit-widths).

Each cell's PSNR / SSIM / class accuracy against the full-precision samples goes into
``adatsq.json`` (quality.json's rows: "bits" holds the average bit-width, "mode" the static mode
where there is one; "weight_bytes" the quantized layers' packed bytes, `memory_report`; "search"
the cell's adatsq report summary). The search run at the largest
budget explores every average bit-width from 4 up: its predicted front (the objective adatsq
minimizes: the first-order, Fisher-weighted relative squared error of the model output), the
uniform assignments and every budget's end-to-end measured candidates go into ``pareto.json``
and are drawn in ``pareto.png`` with the PSNR of every cell. ``adatsq-machine.json`` records the
machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import clq_compile
from clq_compile import digits
from clq_compile.choices import ADATSQ_BASES
from clq_compile.cli import positive_int
from clq_compile.options import Options
from clq_compile.workloads import calibration_calls, load_transformer, score, task_for

# bench/ is a folder of scripts, not a package: run as a script, Python puts this folder on
# sys.path; importers put it there themselves, and only while importing.
from machine import machine_info
from quality import (DEFAULT_MODEL, RESULTS, _font, append_row, outlier_variant, output_folder_problem,
                     begin_run, quality_cell, quantize_and_sample)

log = logging.getLogger("clq_compile.bench.adatsq")

STATIC = {"w4a4": 4.0, "w4a8": 6.0, "w8a8": 8.0}
DEFAULT_BUDGETS = (4.5, 5.0, 6.0, 7.0, 8.0)
JOURNAL = "adatsq.jsonl"


def cells(budgets: list[float], base: str) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """(row label, bits, backend options, static mode or None) of every cell of one variant."""
    out = [(recipe, f"{bits:g}", {"recipe": recipe, "bits": mode}, mode)
           for recipe in dict.fromkeys(("clq", base)) for mode, bits in STATIC.items()]
    out += [("adatsq", f"{b:g}", {"recipe": "adatsq", "bits": "w4a8", "avg_bits": b, "adatsq_base": base}, None)
            for b in budgets]
    out.append(("adatsq (1 timestep bucket)", "6", {"recipe": "adatsq", "bits": "w4a8", "avg_bits": 6.0,
                                                     "adatsq_base": base, "timestep_buckets": 1}, None))
    out.append((f"{base} (4 timestep buckets)", "6", {"recipe": base, "bits": "w4a8", "timestep_buckets": 4},
                "w4a8"))
    return out


def summary(report: dict) -> dict | None:
    if not report:
        return None
    return {"chosen": report["chosen"], "uniform": report["uniform"], "timestep_edges": report["timestep_edges"],
            "units": report["units"], "modes_chosen": _mode_shares(report)}


def _mode_shares(report: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for modes in report["choice"].values():
        for m in modes:
            counts[m] = counts.get(m, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# The figure


def _axes(draw, box, x_range, y_range, x_label, y_label, log_y=False, font=None):
    """Frame, ticks and labels; returns the point mapper (x, y) -> pixel."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=0)
    (x0, x1), (y0, y1) = x_range, y_range
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    a, b = ty(y0), ty(y1)

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (ty(max(y, y0)) - a) / (b - a) * (bottom - top))

    for x in range(math.ceil(x0), math.floor(x1) + 1):
        px, _ = at(x, y0)
        draw.line([(px, bottom), (px, bottom + 4)], fill=0)
        draw.text((px - 4, bottom + 6), str(x), fill=0, font=font)
    ticks = ([10 ** e for e in range(math.ceil(a), math.floor(b) + 1)] if log_y else
             [y0 + i * (y1 - y0) / 4 for i in range(5)])
    for y in ticks:
        _, py = at(x0, y)
        draw.line([(left - 4, py), (left, py)], fill=0)
        draw.text((left - 44, py - 7), f"{y:.0e}" if log_y else f"{y:.0f}", fill=0, font=font)
    draw.text(((left + right) // 2 - 40, bottom + 22), x_label, fill=0, font=font)
    draw.text((left, top - 18), y_label, fill=0, font=font)
    return at


COLOURS = {"adatsq": (200, 30, 30), "clq": (30, 90, 200), "base": (30, 150, 60), "front": (120, 120, 120)}


def _mark(draw, point, colour, size=4, square=False):
    x, y = point
    box = [x - size, y - size, x + size, y + size]
    (draw.rectangle if square else draw.ellipse)(box, fill=colour)


def pareto_figure(fronts: dict[str, dict], rows: list[dict], base: str) -> Image.Image:
    """Per variant: the predicted front and the measured candidates (left), PSNR against average
    bits (right)."""
    font = _font(13)
    width, height = 1100, 360
    image = Image.new("RGB", (width, height * len(fronts)), "white")
    draw = ImageDraw.Draw(image)
    for i, (variant, report) in enumerate(fronts.items()):
        top = i * height
        draw.text((10, top + 6), variant, fill=0, font=font)
        points = [p for p in report["pareto"] if p[1] > 0] + [[u["avg_bits"], u["predicted"]] for u in report["uniform"]]
        ys = [p[1] for p in points] + [m["measured"] for m in report["measured_all"] if m["measured"] > 0]
        y_range = (10 ** math.floor(math.log10(min(ys))), 10 ** math.ceil(math.log10(max(ys))))
        at = _axes(draw, (80, top + 40, 520, top + height - 50), (4, 8), y_range, "average bits",
                   "relative squared error of the output (log)", log_y=True, font=font)
        front = [at(a, d) for a, d in report["pareto"] if d > 0]
        if len(front) > 1:
            draw.line(front, fill=COLOURS["front"], width=2)
        for u in report["uniform"]:
            _mark(draw, at(u["avg_bits"], u["predicted"]), COLOURS["base"], square=True)
        for m in report["measured_all"]:
            if m["measured"] > 0:
                _mark(draw, at(m["avg_bits"], m["measured"]), COLOURS["adatsq"], 3)
        draw.text((90, top + 46), "grey: predicted Pareto front; green squares: uniform modes (predicted);",
                  fill=0, font=font)
        draw.text((90, top + 62), "red: candidates measured end to end", fill=0, font=font)
        cells = [r for r in rows if r["model"] == variant and r["recipe"] != "fp" and r.get("psnr") is not None]
        psnrs = [r["psnr"] for r in cells]
        if not psnrs:
            continue
        low, high = math.floor(min(psnrs) / 5) * 5, math.ceil(max(psnrs) / 5) * 5
        at = _axes(draw, (620, top + 40, 1060, top + height - 50), (4, 8), (low, max(high, low + 5)),
                   "average bits", "PSNR (dB) against full precision", font=font)
        for label, colour in (("adatsq", COLOURS["adatsq"]), ("clq", COLOURS["clq"]), (base, COLOURS["base"])):
            series = sorted((float(r["bits"]), r["psnr"]) for r in cells if r["recipe"] == label)
            pts = [at(a, p) for a, p in series]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for p in pts:
                _mark(draw, p, colour)
        for r in cells:  # the one-bucket ablation and the bucketed base: squares of their colour
            if r["recipe"] == "adatsq (1 timestep bucket)" or r["recipe"] == f"{base} (4 timestep buckets)":
                _mark(draw, at(float(r["bits"]), r["psnr"]), COLOURS["adatsq" if r["recipe"].startswith("adatsq")
                                                                      else "base"], 5, square=True)
        draw.text((630, top + 46), f"red: adatsq; blue: clq; green: {base} (static modes)", fill=0, font=font)
        draw.text((630, top + 62), "squares: adatsq with 1 bucket, green: 4 buckets at W4A8", fill=0, font=font)
    return image


# ---------------------------------------------------------------------------------------------
# The run


def _budgets(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, e.g. 5,6; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/adatsq.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"a diffusers DiT folder (default {DEFAULT_MODEL.relative_to(DEFAULT_MODEL.parents[2])})")
    parser.add_argument("--budgets", type=_budgets, default=list(DEFAULT_BUDGETS),
                        help="average bit-widths adatsq runs at, 4 to 8 (default 4.5,5,6,7,8)")
    parser.add_argument("--base", choices=ADATSQ_BASES, default=Options().adatsq_base,
                        help=f"adatsq's base recipe (default {Options().adatsq_base})")
    parser.add_argument("--samples-per-class", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--calib-samples", type=positive_int, default=10)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--outlier-scale", type=float, default=50.0, help="0: the plain model only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder, new or empty (default a fresh {RESULTS.name}/adatsq-YYYYMMDD-HHMMSS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.budgets or not all(4 <= b <= 8 for b in args.budgets):
        parser.error(f"--budgets must lie from 4 to 8; got {args.budgets}")
    if args.out is None:
        args.out = RESULTS / datetime.datetime.now(datetime.timezone.utc).strftime("adatsq-%Y%m%d-%H%M%S")
    problem = output_folder_problem(args.out)
    if problem:
        parser.error(problem)
    started, command = begin_run("bench/adatsq.py", args.threads, argv)
    try:
        model, name = load_transformer(args.model), args.model.resolve().name
        task = task_for(model, args.samples_per_class, args.calib_samples, args.seed, None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    variants = [(name, model)]
    if args.outlier_scale > 0:
        variants.append((f"{name}+outliers", outlier_variant(model, args.outlier_scale)))
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / JOURNAL
    plan = cells(sorted(set(args.budgets)), args.base)
    rows: list[dict[str, Any]] = []
    fronts: dict[str, dict] = {}
    with logging_redirect_tqdm(), tqdm(total=len(variants) * len(plan), desc="cells", dynamic_ncols=True) as bar:
        for name, module in variants:
            with torch.no_grad():
                reference = task.draw(module, task.evaluation, args.steps)
            calls = calibration_calls(task, module, args.steps, args.calib_steps)
            fp = {"model": name, "recipe": "fp", "bits": "fp32", **score(task, reference, reference)}
            rows.append(fp)
            append_row(journal, fp)
            measured_all = []
            for label, bits, options, mode in plan:
                bar.set_postfix_str(f"{name} {label} {bits}")
                row: dict[str, Any] = {"model": name, "recipe": label, "bits": bits, "mode": mode}
                try:
                    options = dict(options)
                    images, seconds, qt = quantize_and_sample(module, task, calls, options.pop("recipe"),
                                                              options.pop("bits"), args.steps, options)
                    report = clq_compile.search_report(qt).get("adatsq", {})
                    row.update(score(task, images, reference), quantize_seconds=round(seconds, 2),
                               weight_bytes=clq_compile.memory_report(qt)["quantized_bytes"], search=summary(report))
                    if report and label == "adatsq":
                        measured_all += report["measured"]
                        if float(bits) == max(args.budgets):
                            fronts[name] = {k: report[k] for k in ("pareto", "uniform", "modes", "mode_bits",
                                                                   "timestep_edges", "objective")}
                except Exception as error:  # one failing cell must not lose the others
                    log.exception("%s %s %s failed", name, label, bits)
                    row.update(psnr=None, ssim=None, accuracy=None, error=f"{type(error).__name__}: {error}")
                log.info("%s %-28s %4s bits: psnr %s ssim %s", name, label, bits, row.get("psnr"), row.get("ssim"))
                rows.append(row)
                append_row(journal, row)
                bar.update()
            if name in fronts:
                fronts[name]["measured_all"] = measured_all
    (args.out / "adatsq.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "pareto.json").write_text(json.dumps(fronts, indent=2) + "\n")
    if fronts:
        pareto_figure(fronts, rows, args.base).save(args.out / "pareto.png")
    run = {"machine": machine_info(), "command": command,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "wall_seconds": round(time.perf_counter() - started, 1), "task": task.description, "steps": args.steps,
           "sampling": f"DDIM, {args.steps} steps ({digits.__name__})"}
    (args.out / "adatsq-machine.json").write_text(json.dumps(run, indent=2) + "\n")
    for name, _ in variants:
        print(f"\n{name}")
        for r in rows:
            if r["model"] == name and r["recipe"] != "fp":
                print(f"  {r['recipe']:28s} {r['bits']:>4s} bits  {quality_cell(r)}")
    failed = [r for r in rows if r.get("error")]
    log.info("wrote %s in %.1f min", args.out, (time.perf_counter() - started) / 60)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
