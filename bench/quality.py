"""Quality benchmark: how far each recipe's quantized samples move from the full-precision ones.

    python bench/quality.py                                  # the bundled digits DiT, every recipe
    python bench/quality.py --recipes rtn,clq --bits w4a4 --samples-per-class 2 --steps 10 --out /tmp/q

For every model variant and every recipe x bits cell the transformer is compiled with
``torch.compile(transformer, backend="clq", options={"bits": ..., "recipe": ...})``, calibrated,
quantized, and sampled from the same starting noise and conditioning as the full-precision model.
Each cell reports PSNR and SSIM of its samples against the full-precision samples
(``clq_compile/metrics.py``), the class accuracy of its samples, and ``quantize_seconds``: the time
spent leaving the ``calibrating`` block, where the recipe runs and the graphs are rewritten.

Model variants: the model as loaded, and (unless ``--outlier-scale 0``) a deep copy with
``clq_compile.stress.inject_outliers(copy, scale)``: a few value-projection channels of every
attention scaled up and the matching output-projection columns scaled down, which creates the
massive-activation channels of large DiTs without changing the full-precision function. The
copy's full-precision samples are checked against the original's (max |difference| per pixel
at most ``OUTLIER_TOLERANCE``); a larger difference is logged and written to the report.

What is sampled (``clq_compile/workloads.py``, shared with ``clq eval``):

- The digits DiT (``bench/assets/digits-dit``, or any DiTTransformer2DModel with one input
  channel, 16 x 16 samples and 10 classes): class-conditional DDIM with the sampler of
  ``clq_compile/digits.py``, ``--samples-per-class`` images of every digit, noise drawn from
  ``--seed``. PSNR and SSIM are taken on the images in [-1, 1]; the digit classifier of
  ``clq_compile/digits.py`` (logistic regression on the real digits) judges whether each sample
  shows its digit.
- Any other transformer (DiT, PixArt, SD3, Flux; there is no classifier or sampler of ours for
  them): ``--samples-per-class`` random inputs built from the model's config (Gaussian latents
  of ``--latent-size``, random class labels or random caption embeddings of
  ``workloads.TEXT_TOKENS`` tokens) go through ``clq_compile.stress.sample``, a short
  deterministic loop x <- x - model(x, t) / steps over ``--steps`` decreasing timesteps. What
  is compared is the final latents (Flux's packed tokens unpacked to [C, H, W]); PSNR and SSIM
  use the full-precision latents' peak-to-peak range as data range, and accuracy is null. The final
  latents still carry most of the shared starting noise, so these PSNRs run high (tiny random
  models: 50-65 dB at w4a4): compare recipes with each other, not with the digits numbers.

Calibration: ``--calib-samples`` inputs with their own noise and conditioning, drawn from
``--seed + 1`` so that no calibration sample shares its starting noise with an evaluation
sample (digits: labels 0, 1, 2, ... cycling through the classes). The full-precision sampler
runs on them with the full ``--steps`` schedule, and the transformer's inputs at
``--calib-steps`` evenly spaced steps are kept. They are regrouped before they reach the model
(``interleave_timesteps``): each recorded call holds every calibration sample once, each at a
different step, so every call spans the whole trajectory. The recipes' searches look at the
first few recorded calls only (option ``search_calls``); recorded in sampling order, those
would all be the noisiest steps. Inside ``with clq_compile.calibrating(qt):`` the compiled
model is called once per regrouped call, in full precision, and every call is recorded.

Outputs in ``--out``: ``quality.json`` (a list of rows ``{"model", "recipe", "bits", "psnr",
"ssim", "accuracy", "quantize_seconds"}``, plus ``"error"`` in a cell that failed; one row with
recipe "fp" and bits "fp32" per variant, PSNR at the cap of ``metrics.PSNR_CAP_DB``, SSIM 1 and
quantize_seconds null), ``quality-machine.json`` (machine, versions, command, date,
calibration, outlier check), ``quality.md`` (one table per variant), ``quality-grid.png``
(samples: full precision on top, then each recipe at w4a4, or at the last of ``--bits`` when
w4a4 is not run) and ``obs-activation.png`` (per-channel max |x| of one attention output
projection's input before and after OBS's transform). The exit status is 1 when a cell failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import clq_compile
from clq_compile import digits, metrics
from clq_compile.cli import positive_int
from clq_compile.options import BITS, Options
from clq_compile.passes.orthogonal_smoothing import orthogonal_smoothing
from clq_compile.passes.recipes import RECIPES
from clq_compile.stress import inject_outliers
from clq_compile.workloads import (FLUX_LATENT_SIZE, Task, calibration_calls, load_pipeline_transformer,
                                   load_transformer, score, task_for)

# bench/ is a folder of scripts, not a package: run as a script, Python puts this folder on
# sys.path; importers put it there themselves, and only while importing.
from machine import machine_info

log = logging.getLogger("clq_compile.bench.quality")

BENCH = Path(__file__).resolve().parent
DEFAULT_MODEL = BENCH / "assets" / "digits-dit"
RESULTS = BENCH / "results"
# Each cell's row is appended here as soon as the cell finishes, so a run stopped early keeps them.
JOURNAL = "quality.jsonl"
OUTPUTS = (JOURNAL, "quality.json", "quality-machine.json", "quality.md", "quality-grid.png", "obs-activation.png")
DEFAULT_BITS = ("w8a8", "w4a8", "w4a4", "w4a16", "w3a16")
GRID_BITS = "w4a4"
# Float rounding of the scaled channels, measured on the digits DiT: 2e-5 after 25 DDIM steps,
# 1.3e-4 after 3, where the first steps divide by sqrt(alpha_bar) near 0 and amplify it. A copy
# whose function really changed differs by a sizeable part of the [-1, 1] range.
OUTLIER_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# Models


def outlier_variant(model: nn.Module, scale: float) -> nn.Module:
    """A deep copy of `model` with injected outlier channels; `model` is left as it was."""
    variant = copy.deepcopy(model)
    if inject_outliers(variant, scale) == 0:
        raise ValueError(f"{type(model).__name__} has no attention whose value and output projections "
                         f"inject_outliers can scale; run with --outlier-scale 0")
    return variant.eval()


# ---------------------------------------------------------------------------------------------
# The benchmark


def outlier_check(name: str, samples: torch.Tensor, original: str, original_samples: torch.Tensor) -> dict[str, Any]:
    """Whether the outlier copy's full-precision samples match the original's; logged when they do not."""
    difference = float((samples - original_samples).abs().max())
    ok = difference <= OUTLIER_TOLERANCE
    if not ok:
        log.warning("%s: full-precision samples differ from %s's by up to %.2e (tolerance %.0e): the "
                    "outlier injection changed the model's function", name, original, difference,
                    OUTLIER_TOLERANCE)
    return {"model": name, "against": original, "max_abs_difference": difference,
            "tolerance": OUTLIER_TOLERANCE, "ok": ok}


@dataclass
class VariantResult:
    """Rows of one model variant, its full-precision samples and the samples the grid shows."""

    name: str
    rows: list[dict[str, Any]]
    reference: torch.Tensor
    calls: list[dict[str, Any]]
    grid: list[tuple[str, torch.Tensor]] = field(default_factory=list)


def quantize_and_sample(model: nn.Module, task: Task, calls: list[dict[str, Any]], recipe: str,
                        bits: str, steps: int, options: dict[str, Any] | None = None,
                        ) -> tuple[torch.Tensor, float, nn.Module]:
    """Compile with the clq backend, calibrate on `calls`, sample the evaluation set.

    options: further backend options. Returns the samples, the seconds spent leaving the
    calibrating block (quantization) and the compiled model.
    """
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": bits, "recipe": recipe, **(options or {})})
    with torch.no_grad():
        with clq_compile.calibrating(qt):
            for call in calls:
                qt(**call)
            start = time.perf_counter()
        seconds = time.perf_counter() - start
        images = task.draw(qt, task.evaluation, steps)
    return images, seconds, qt


def append_row(journal: Path, row: dict[str, Any]) -> None:
    """Append `row` to the JSON-lines file `journal` (one object per line), flushed at once."""
    with journal.open("a") as f:
        f.write(json.dumps(row) + "\n")


def benchmark_variant(name: str, model: nn.Module, task: Task, reference: torch.Tensor, recipes: list[str],
                      bits: list[str], steps: int, calib_steps: int, grid_bits: str,
                      progress: tqdm, journal: Path, options: dict[str, Any] | None = None,
                      skip: dict[tuple[str, str], str] | None = None) -> VariantResult:
    """The fp row and one row per recipe x bits for one model variant; `reference` are its fp samples.

    Every row is appended to `journal` as soon as it is known; a cell in `skip` ({(recipe, bits):
    why}) is a row saying why it was not run.
    """
    log.info("%s: calibration trajectory", name)
    calls = calibration_calls(task, model, steps, calib_steps)
    fp = {"model": name, "recipe": "fp", "bits": "fp32", **score(task, reference, reference),
          "quantize_seconds": None}
    append_row(journal, fp)
    scale = task.display_scale(reference)
    result = VariantResult(name, [fp], reference, calls, [("fp", reference[task.grid_index] / scale)])
    for recipe in recipes:
        for b in bits:
            progress.set_postfix_str(f"{name} {recipe} {b}")
            row: dict[str, Any] = {"model": name, "recipe": recipe, "bits": b}
            if skip and (recipe, b) in skip:
                row.update(psnr=None, ssim=None, accuracy=None, quantize_seconds=None, not_applicable=skip[(recipe, b)])
                result.rows.append(row)
                append_row(journal, row)
                progress.update()
                continue
            start = time.perf_counter()
            try:
                images, seconds, _ = quantize_and_sample(model, task, calls, recipe, b, steps, options)
                row.update(score(task, images, reference), quantize_seconds=round(seconds, 2))
                if b == grid_bits:
                    result.grid.append((recipe, images[task.grid_index] / scale))
            except Exception as error:  # one failing cell must not lose the others' results
                log.exception("%s %s %s failed", name, recipe, b)
                row.update(psnr=None, ssim=None, accuracy=None, quantize_seconds=None,
                           error=f"{type(error).__name__}: {error}")
            log.info("%s %-12s %s: psnr %s ssim %s accuracy %s quantize %ss (cell %.1fs)", name, recipe, b,
                     row["psnr"], row["ssim"], row["accuracy"], row["quantize_seconds"],
                     time.perf_counter() - start)
            result.rows.append(row)
            append_row(journal, row)
            progress.update()
    return result


# ---------------------------------------------------------------------------------------------
# Figures


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size only
        return ImageFont.load_default()


def sample_grid(blocks: list[tuple[str, list[tuple[str, torch.Tensor]]]], zoom: int = 4) -> Image.Image:
    """One labelled block per variant: a row per method, the same samples (same noise) in each row.

    blocks: [(variant name, [(row label, images [columns, C, H, W] in [-1, 1])])]. Only the first
    channel is drawn.
    """
    font = _font(14)
    label_width, header = 130, 24
    pictures = []
    for title, rows in blocks:
        columns = len(rows[0][1])
        tiles = torch.cat([images[:, :1] for _, images in rows])
        grid = digits.image_grid(tiles, columns=columns, zoom=zoom)
        row_height = grid.height // len(rows)
        block = Image.new("L", (label_width + grid.width, header + grid.height), 255)
        block.paste(grid, (label_width, header))
        draw = ImageDraw.Draw(block)
        draw.text((4, 4), title, fill=0, font=font)
        for r, (label, _) in enumerate(rows):
            draw.text((4, header + r * row_height + row_height // 2 - 8), label, fill=0, font=font)
        pictures.append(block)
    canvas = Image.new("L", (max(p.width for p in pictures), sum(p.height + 8 for p in pictures)), 255)
    top = 0
    for p in pictures:
        canvas.paste(p, (0, top))
        top += p.height + 8
    return canvas


def _stem_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], values: torch.Tensor,
                y_max: float, title: list[str], color: tuple[int, int, int], font) -> None:
    """A stem plot of `values` in `box`; `title`: lines drawn above it, each short enough for the panel."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 70, top + 8 + 18 * len(title), right - 15, bottom - 45
    for i, line in enumerate(title):
        draw.text((x0, top + 4 + 18 * i), line, fill="black", font=font)
    n = len(values)
    width = max(1, int(0.6 * (x1 - x0) / n))
    for c, v in enumerate(values.tolist()):
        x = x0 + (c + 0.5) * (x1 - x0) / n
        draw.line((x, y1, x, y1 - (y1 - y0) * min(v / y_max, 1.0)), fill=color, width=width)
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - (y1 - y0) * frac
        draw.line((x0 - 5, y, x0, y), fill="black")
        draw.text((left + 4, y - 8), f"{y_max * frac:.3g}", fill="black", font=font)
    for c in range(0, n + 1, max(1, n // 6)):
        x = x0 + c * (x1 - x0) / n
        draw.line((x, y1, x, y1 + 5), fill="black")
        draw.text((x - 10, y1 + 8), str(c), fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 45, y1 + 26), "input channel", fill="black", font=font)


def _summary(absmax: torch.Tensor) -> str:
    return f"max {float(absmax.max()):.3g}, median {float(absmax.median()):.3g}"


def attention_output_inputs(model: nn.Module, calls: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| over every token of every call, for the input of each attention output projection."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.endswith(("to_out.0", "to_add_out")):
            def hook(module, args, output, path=path):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
                absmax[path] = x if path not in absmax else torch.maximum(absmax[path], x)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for call in calls:
                model(**call)
    finally:
        for h in hooks:
            h.remove()
    return absmax


def obs_activation_figure(model: nn.Module, calls: list[dict[str, Any]], block: int) -> tuple[Image.Image, str]:
    """Per-channel max |x| of one attention output projection's input, before and after OBS's G = S·H.

    The layer is the one whose input is most outlier-dominated (largest max / median channel
    magnitude) on the calibration calls; G is what ``orthogonal_smoothing`` builds from those
    statistics with Hadamard block `block`. Returns the picture and the layer's path.
    """
    absmax = attention_output_inputs(model, calls)
    if not absmax:
        raise ValueError(f"{type(model).__name__} has no attention output projection to show")
    path = max(absmax, key=lambda p: float(absmax[p].max() / absmax[p].median().clamp(min=1e-12)))
    before = absmax[path]
    smoothing = orthogonal_smoothing(len(before), before, block)
    module = model.get_submodule(path)
    after = torch.zeros_like(before)

    def hook(module, args, output):
        nonlocal after
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        moved = smoothing.transform.apply(x)
        after = torch.maximum(after, moved.abs().amax(dim=0))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for call in calls:
                model(**call)
    finally:
        handle.remove()

    font = _font(14)
    image = Image.new("RGB", (1200, 460), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"input of {path}: per-channel max |x| over all calibration tokens "
                       f"(same scale in both panels)", fill="black", font=font)
    y_max = float(before.max()) or 1.0
    g = ("S·" if smoothing.transform.perm is not None else "") + f"H{smoothing.block}"
    _stem_panel(draw, (0, 30, 600, 460), before, y_max, ["before OBS: x", _summary(before)],
                (31, 119, 180), font)
    _stem_panel(draw, (600, 30, 1200, 460), after, y_max, [f"after OBS: x·G, G = {g}", _summary(after)],
                (214, 96, 39), font)
    return image, path


# ---------------------------------------------------------------------------------------------
# Reports


def quality_cell(row: dict[str, Any] | None, psnr: str = ".2f") -> str:
    """"PSNR / SSIM / accuracy" of one result row ("" for none, "failed" for an error); psnr: its format."""
    if row is None:
        return ""
    if row.get("error"):
        return "failed"
    if row.get("not_applicable"):
        return "n/a"

    def show(value, spec):
        return "–" if value is None else format(value, spec)

    return f"{show(row['psnr'], psnr)} / {show(row['ssim'], '.3f')} / {show(row['accuracy'], '.2f')}"


def markdown_tables(rows: list[dict[str, Any]], recipes: list[str], bits: list[str]) -> str:
    """Per variant: PSNR / SSIM / accuracy (rows = recipes, columns = bits), then quantize seconds."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {(r["recipe"], r["bits"]): r for r in rows if r["model"] == model}
        fp = cells.get(("fp", "fp32"))
        accuracy = "–" if fp is None or fp["accuracy"] is None else f"{fp['accuracy']:.2f}"
        lines += [f"### {model}", "", f"Full precision: accuracy {accuracy}.", "",
                  "| recipe | " + " | ".join(bits) + " |", "|---" * (len(bits) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(quality_cell(cells.get((r, b))) for b in bits) + " |" for r in recipes]
        lines += ["", "quantize_seconds:", "", "| recipe | " + " | ".join(bits) + " |",
                  "|---" * (len(bits) + 1) + "|"]
        for r in recipes:
            seconds = [cells.get((r, b), {}).get("quantize_seconds") for b in bits]
            lines.append(f"| {r} | " + " | ".join("–" if s is None else f"{s:.1f}" for s in seconds) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown_report(rows: list[dict[str, Any]], recipes: list[str], bits: list[str],
                    run: dict[str, Any]) -> str:
    m = run["machine"]
    checks = "".join(
        f"- full-precision samples of {c['model']} vs {c['against']}: max |difference| "
        f"{c['max_abs_difference']:.2e} ({'within' if c['ok'] else 'ABOVE'} the tolerance {c['tolerance']:.0e})\n"
        for c in run["outlier_check"])
    return (
        "# Quality of quantized samples\n\n"
        f"Command: `{run['command']}`\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}; run on {run['date']}, "
        f"{run['wall_seconds'] / 60:.1f} min in all.\n\n"
        f"Samples: {run['task']}; {run['steps']} steps. Calibration: {run['calibration']['description']}.\n\n"
        f"Cells: PSNR (dB, capped at {metrics.PSNR_CAP_DB:g}) / SSIM / class accuracy of each quantized "
        "model's samples against the full-precision samples from the same noise; quantize_seconds is "
        "the time spent leaving the calibrating block.\n\n"
        + (f"Outlier check:\n\n{checks}\n" if checks else "")
        + "".join(f"n/a: {c['recipe']} at {c['bits']}, which the backend refuses ({c['why']})\n\n"
                  for c in run.get("not_applicable", []))
        + markdown_tables(rows, recipes, bits))


# ---------------------------------------------------------------------------------------------
# Command line


def _names(text: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                                         f"choose from {', '.join(allowed)}")
    return names


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more; got {text}")
    return value


def output_folder_problem(out: Path) -> str | None:
    """Why the benchmark cannot write its outputs to the folder `out`, or None when it can.

    `out` must be new, or a folder holding none of the benchmark's outputs (results are never
    overwritten), and the nearest existing folder on its path must be writable.
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if out.is_dir():
        held = [name for name in OUTPUTS if (out / name).exists()]
        if held:
            return f"--out {out} already holds results ({', '.join(held)}); choose a new folder"
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: cannot create or write in {existing}"
    return None


def not_applicable(recipes: list[str], bits: list[str]) -> dict[tuple[str, str], str]:
    """{(recipe, bits): why}: the cells the backend refuses whatever the options (e.g. recipe
    lrq-dit at fp8); they are reported as "n/a" instead of run."""
    from clq_compile.options import parse_options

    cells = {}
    for recipe in recipes:
        for b in bits:
            try:
                parse_options({"recipe": recipe, "bits": b})
            except ValueError as error:
                cells[(recipe, b)] = str(error)
    return cells


def options_problem(options: Any, recipes: list[str], bits: list[str],
                    skipped: dict[tuple[str, str], str]) -> str | None:
    """Why --options cannot run with every recipe and bit width asked for (the not-applicable
    cells, `skipped`, aside), or None: checked as the backend checks them, before any model is
    loaded, so that a typo does not fail every cell."""
    from clq_compile.options import parse_options

    if not isinstance(options, dict):
        return f"--options must be a JSON object of backend options; got {options!r:.80}"
    for key in ("recipe", "bits"):
        if key in options:
            return f"--options: {key!r} has its own flag, --{key if key == 'bits' else 'recipes'}"
    for recipe in recipes:
        for b in bits:
            if (recipe, b) in skipped:
                continue
            try:
                parse_options({**options, "recipe": recipe, "bits": b})
            except (TypeError, ValueError) as error:
                return f"--options with recipe {recipe} at {b}: {error}"
    return None


# adatsq quantizes every candidate mode per timestep bucket and searches their mix: minutes per
# cell. It runs when named (--recipes adatsq; its budget is the bits mode's average unless
# --options gives avg_bits); bench/adatsq.py measures it against the static modes.
NOT_BY_DEFAULT = ("adatsq",)


def build_parser() -> argparse.ArgumentParser:
    recipes = list(RECIPES)
    defaults = [r for r in recipes if r not in NOT_BY_DEFAULT]
    parser = argparse.ArgumentParser(
        prog="python bench/quality.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Quantize a diffusion transformer with every recipe of the clq backend and measure how\n"
            "far its samples move from the full-precision model's: PSNR and SSIM against the\n"
            "full-precision samples from the same noise, class accuracy (digits model only) and the\n"
            "time quantization takes. By default: the bundled digits DiT (bench/assets/digits-dit)\n"
            "and a copy of it with injected outlier channels, every recipe, w8a8 / w4a8 / w4a4."),
        epilog=(
            "outputs (in --out): quality.json (one row per model x recipe x bits), quality-machine.json,\n"
            "quality.md (tables), quality-grid.png (samples), obs-activation.png (OBS on one layer).\n"
            "Example, a quick check:\n"
            "  python bench/quality.py --recipes rtn,clq --bits w4a4 --samples-per-class 2 --steps 10 --out /tmp/q"),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None,
                        help="a diffusers transformer folder (config.json + weights: DiT, PixArt, SD3, Flux); "
                             f"default {DEFAULT_MODEL.relative_to(BENCH.parent)}")
    source.add_argument("--pipeline", type=Path, default=None,
                        help="a diffusers pipeline folder (model_index.json); its .transformer is benchmarked")
    parser.add_argument("--options", type=json.loads, default={},
                        help='further backend options as JSON, e.g. \'{"obs_statistics": "fp"}\'')
    parser.add_argument("--recipes", type=lambda t: _names(t, recipes), default=defaults,
                        help=f"comma-separated recipes (default: all but {', '.join(NOT_BY_DEFAULT)}: "
                             f"{','.join(defaults)})")
    parser.add_argument("--bits", type=lambda t: _names(t, BITS), default=list(DEFAULT_BITS),
                        help=f"comma-separated bit widths (default {','.join(DEFAULT_BITS)})")
    parser.add_argument("--samples-per-class", type=positive_int, default=10,
                        help="digits: samples of each of the 10 digits; other models: number of random "
                             "inputs (default 10)")
    parser.add_argument("--steps", type=positive_int, default=digits.DEFAULT_SAMPLING_STEPS,
                        help=f"sampling steps (DDIM for the digits; default {digits.DEFAULT_SAMPLING_STEPS})")
    parser.add_argument("--calib-samples", type=positive_int, default=10,
                        help="calibration samples, with their own noise (seed + 1) and labels cycling "
                             "0..9 (default 10)")
    parser.add_argument("--calib-steps", type=int, default=10,
                        help="steps of each calibration trajectory recorded, evenly spaced; 0 = all "
                             "(default 10)")
    parser.add_argument("--outlier-scale", type=_non_negative, default=50.0,
                        help="also benchmark a copy with outlier channels scaled by this (default 50; 0: off)")
    parser.add_argument("--latent-size", type=positive_int, default=None,
                        help="other models: latent side of the random inputs (default: the config's sample_size, "
                             f"Flux {FLUX_LATENT_SIZE})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the evaluation noise and the classifier; calibration uses seed + 1 (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, new or empty (default: a fresh "
                             f"{RESULTS.relative_to(BENCH.parent)}/quality-YYYYMMDD-HHMMSS)")
    return parser


def begin_run(script: str, threads: int | None, argv: list[str] | None) -> tuple[float, str]:
    """Log to the terminal, pin torch's threads (when given); returns the start time and the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    return time.perf_counter(), shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the benchmark, write the reports, print the tables. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calib_steps < 0:
        parser.error(f"--calib-steps must be 0 (all steps) or more; got {args.calib_steps}")
    if args.out is None:
        args.out = RESULTS / datetime.datetime.now(datetime.timezone.utc).strftime("quality-%Y%m%d-%H%M%S")
    skipped = not_applicable(args.recipes, args.bits)
    problem = output_folder_problem(args.out) or options_problem(args.options, args.recipes, args.bits, skipped)
    if problem:
        parser.error(problem)
    started, command = begin_run("bench/quality.py", args.threads, argv)
    try:
        if args.pipeline is not None:
            model, name = load_pipeline_transformer(args.pipeline), args.pipeline.resolve().name
        else:
            path = DEFAULT_MODEL if args.model is None else args.model
            model, name = load_transformer(path), path.resolve().name
        task = task_for(model, args.samples_per_class, args.calib_samples, args.seed, args.latent_size)
        variants = [(name, model)]
        if args.outlier_scale > 0:
            variants.append((f"{name}+outliers", outlier_variant(model, args.outlier_scale)))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    grid_bits = GRID_BITS if GRID_BITS in args.bits else args.bits[-1]
    for (recipe, b), why in skipped.items():
        log.info("not applicable, not run: %s at %s (%s)", recipe, b, why)
    log.info("benchmark of %s: %s", name, task.description)

    args.out.mkdir(parents=True, exist_ok=True)
    log.info("writing to %s (%s grows by one row per finished cell)", args.out, JOURNAL)

    results: list[VariantResult] = []
    checks = []
    with logging_redirect_tqdm(), tqdm(total=len(variants) * len(args.recipes) * len(args.bits),
                                       desc="cells", dynamic_ncols=True) as progress:
        for variant, module in variants:
            log.info("%s: full-precision samples", variant)
            with torch.no_grad():
                reference = task.draw(module, task.evaluation, args.steps)
            if results:
                checks.append(outlier_check(variant, reference, results[0].name, results[0].reference))
            results.append(benchmark_variant(variant, module, task, reference, args.recipes, args.bits,
                                             args.steps, args.calib_steps, grid_bits, progress,
                                             args.out / JOURNAL, args.options, skipped))

    shown = results[-1]
    figure, layer = obs_activation_figure(variants[-1][1], shown.calls, Options().hadamard_block)
    figure.save(args.out / "obs-activation.png")
    sample_grid([(f"{r.name} ({grid_bits}; top row full precision)", r.grid) for r in results]).save(
        args.out / "quality-grid.png")

    rows = [row for r in results for row in r.rows]
    calibration_batch = len(task.calibration["hidden_states"])
    run = {
        "machine": machine_info(),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "task": task.description,
        "steps": args.steps,
        "calibration": {
            "samples": calibration_batch,
            "seed": args.seed + 1,
            "recorded_calls": len(shown.calls),
            "description": (f"{calibration_batch} samples from seed {args.seed + 1}, "
                            f"{len(shown.calls)} of their {args.steps} steps recorded, regrouped into "
                            f"{len(shown.calls)} calls of {calibration_batch} that each span the trajectory"),
        },
        "outlier_check": checks,
        "not_applicable": [{"recipe": r, "bits": b, "why": why} for (r, b), why in skipped.items()],
        "obs_figure_layer": f"{shown.name}: {layer}",
    }
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "quality-machine.json").write_text(json.dumps(run, indent=2) + "\n")
    (args.out / "quality.md").write_text(markdown_report(rows, args.recipes, args.bits, run))
    print(markdown_tables(rows, args.recipes, args.bits))
    failed = [r for r in rows if r.get("error")]
    if failed:
        log.error("%d cell(s) failed: %s", len(failed),
                  "; ".join(f"{r['model']} {r['recipe']} {r['bits']}: {r['error']}" for r in failed))
    log.info("wrote %s in %.1f min", args.out, (time.perf_counter() - started) / 60)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
