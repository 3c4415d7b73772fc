"""The command line: quantize a diffusers transformer to a file, explain that file, measure its quality.

    clq quantize --model bench/assets/digits-dit --out digits-w4a4.safetensors
    clq explain digits-w4a4.safetensors
    clq eval --model bench/assets/digits-dit --artifact digits-w4a4.safetensors

(``python -m clq_compile`` is the same program.) What a model is calibrated and sampled on is
``clq_compile.workloads``, shared with the quality benchmark: DDIM over the ten digits for a
digits-shaped DiT, the short sampling loop on random inputs from the model's config for any
other DiT / PixArt / SD3 / Flux transformer. Calibration samples are drawn from ``--seed + 1``
and evaluation samples from ``--seed``, so ``quantize`` and ``eval`` with the same seed never
share a starting noise.

Exit status: 0 done, 1 the run failed (e.g. non-finite quantized samples), 2 bad input (a missing
folder or file, a bad option value, an output path that cannot be written): one line on stderr
that names the problem. Arguments and output paths are checked before any work; ``--help``, a
typo and a missing model folder are answered before torch and diffusers are imported, at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from clq_compile.choices import (BITS, CONDITIONING_BITS, DEFAULT_SAMPLING_STEPS, KERNELS, LOWRANK_RECIPES,
                                 RECIPE_NAMES)

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from clq_compile.workloads import Task

EXAMPLE_MODEL = "bench/assets/digits-dit"
EXAMPLE_ARTIFACT = "digits-w4a4.safetensors"
# w16a16 quantizes nothing, so there would be nothing to save.
QUANTIZING_BITS = tuple(b for b in BITS if b != "w16a16")
WEIGHT_ONLY_BITS = tuple(b for b in CONDITIONING_BITS if b)
# The per-layer table is wrapped to this many columns unless --wide.
TABLE_COLUMNS = 120
# Measured for the three example commands together (README, Command line).
EXAMPLE_SECONDS = "about 20 s for the three on an idle 2-core CPU"


class InputError(Exception):
    """Bad input (a folder without config.json, an output path that cannot be written): status 2."""


class UsageError(Exception):
    """A command line argparse rejected: status 2, reported as one line by `main`."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `main` prints them, without the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


class RunError(Exception):
    """A run that could not finish (non-finite samples, a missing optional dependency): status 1."""


# ---------------------------------------------------------------------------------------------
# Helpers


def _stepping(model: Callable[..., Any], bar: tqdm) -> Callable[..., Any]:
    """`model`, advancing `bar` by one per call: a progress bar over a sampler's steps."""
    def call(*args: Any, **kwargs: Any) -> Any:
        out = model(*args, **kwargs)
        bar.update()
        return out

    return call


def _sample(model: Callable[..., Any], task: Task, inputs: dict[str, Any], steps: int, what: str) -> torch.Tensor:
    import torch
    from tqdm import tqdm

    with torch.no_grad(), tqdm(total=steps, desc=what, unit="step", dynamic_ncols=True) as bar:
        return task.draw(_stepping(model, bar), inputs, steps)


def _model_and_task(path: Path, samples: int, calib_samples: int, seed: int,
                    latent_size: int | None) -> tuple[torch.nn.Module, Task]:
    from diffusers.utils import logging as diffusers_logging

    from clq_compile.workloads import load_model, task_for

    # diffusers warns on every load that `accelerate` would load faster; the CLI's models are small.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model = load_model(path)
    except (OSError, ValueError) as error:
        raise InputError(f"--model {error}") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    try:
        return model, task_for(model, samples, calib_samples, seed, latent_size)
    except ValueError as error:
        raise InputError(str(error)) from error


def _model_folder(path: Path) -> None:
    """An InputError unless `path` holds a transformer to load, checked without importing torch."""
    from clq_compile.folders import transformer_folder

    try:
        transformer_folder(path)
    except (OSError, ValueError) as error:
        raise InputError(f"--model {error}") from error


def _probe(folder: Path, flag: str, path: Path) -> None:
    """An InputError unless a file can be created in `folder` (file modes, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error})") from error


def _writable(path: Path, flag: str) -> None:
    """An InputError unless a file can be written at `path` (a new one, or one replaced)."""
    if path.is_dir():
        raise InputError(f"{flag} {path}: that is a folder; give a file name")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: the folder {path.parent} does not exist")
    _probe(path.parent, flag, path)


def _artifact_target(path: Path) -> None:
    """An InputError unless `clq_compile.save` can write an artifact at `path`, checked before any work.

    A name ending in .safetensors is one file, which may replace an artifact file written before but
    nothing else; any other name is a folder holding manifest.json and tensors.safetensors, which
    may replace an artifact folder written before but nothing else.
    """
    if path.suffix == ".safetensors":
        _writable(path, "--out")
        from clq_compile.artifact import is_artifact_file

        if path.is_file() and not is_artifact_file(path):
            raise InputError(f"--out {path}: that file exists and is not a clq artifact (a model's own weights, "
                             f"say); name a new file, or an artifact written before")
        return
    if path.is_file():
        raise InputError(f"--out {path}: that is a file, and a name without .safetensors is written as a "
                         f"folder; name a new folder, or a .safetensors file")
    if path.is_dir() and any(path.iterdir()) and not (path / "manifest.json").is_file():
        raise InputError(f"--out {path}: that folder exists and holds no clq artifact; name a new folder, "
                         f"or a .safetensors file")
    if not path.parent.is_dir():
        raise InputError(f"--out {path}: the folder {path.parent} does not exist")
    _probe(path.parent, "--out", path)
    if path.is_dir():
        _probe(path, "--out", path)


def _existing(path: Path, label: str) -> None:
    """An InputError that starts with `label` when there is nothing at `path`."""
    if not path.exists():
        raise InputError(f"{label}: no such file or folder; write one with "
                         f"`clq quantize --model FOLDER --out {path}`")


def _manifest(path: Path, label: str) -> dict[str, Any]:
    """The manifest of the artifact at `path`, or an InputError that starts with `label`."""
    from clq_compile import artifact

    _existing(path, label)
    try:
        return artifact.read_manifest(path)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from error


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------------------------------------
# Subcommands

# Options with a flag of their own (and `load`, which quantize does not take): not in --options.
_FLAGGED_OPTIONS = {"bits": "--bits", "recipe": "--recipe", "kernels": "--kernels",
                    "conditioning_bits": "--conditioning-bits", "lowrank_rank": "--lowrank-rank", "load": None}


def _with_further_options(options: dict, text: str | None) -> dict:
    """`options` and the backend options of --options (a JSON object, or None), checked as the
    backend will check them, before any model is loaded; an InputError names what is wrong
    (a recipe that cannot run at --bits, too)."""
    if text is None:
        return _checked(options, "")
    try:
        further = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"--options {text!r:.80}: not JSON ({error.msg}); e.g. '{{\"ars_threshold\": 0.5}}'") from None
    if not isinstance(further, dict):
        raise InputError(f"--options must be a JSON object of backend options, e.g. '{{\"mean_correction\": true}}'; "
                         f"got {text!r:.80}")
    for key in sorted(set(further) & set(_FLAGGED_OPTIONS)):
        flag = _FLAGGED_OPTIONS[key]
        raise InputError(f"--options: {key!r} " + (f"has its own flag, {flag}" if flag else "is not for quantize"))
    return _checked({**options, **further}, "--options: ")


def _checked(options: dict, prefix: str) -> dict:
    from clq_compile.options import parse_options

    try:
        parse_options(options)
    except (TypeError, ValueError) as error:
        raise InputError(f"{prefix}{error}") from None
    return options


def quantize(args: argparse.Namespace) -> int:
    """Calibrate `args.model` on its own samples, quantize it and save the artifact."""
    _model_folder(args.model)
    if args.lowrank_rank is not None and args.recipe not in LOWRANK_RECIPES:
        raise InputError(f"--lowrank-rank {args.lowrank_rank}: recipe {args.recipe} has no low-rank branch; "
                         f"drop it, or choose one of {', '.join(LOWRANK_RECIPES)}")
    options = {"bits": args.bits, "recipe": args.recipe, "kernels": args.kernels,
               **({"conditioning_bits": args.conditioning_bits} if args.conditioning_bits else {}),
               **({"lowrank_rank": args.lowrank_rank} if args.lowrank_rank is not None else {})}
    options = _with_further_options(options, args.options)
    _artifact_target(args.out)
    model, task = _model_and_task(args.model, 1, args.calib_samples, args.seed, args.latent_size)
    import torch
    from tqdm import tqdm

    import clq_compile
    from clq_compile.calibration import model_state
    from clq_compile.workloads import calibration_calls

    started = time.perf_counter()
    with tqdm(total=args.steps, desc="calibration trajectory", unit="step", dynamic_ncols=True) as bar:
        calls = calibration_calls(task, _stepping(model, bar), args.steps, args.calib_steps)
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options=options)
    with torch.no_grad(), clq_compile.calibrating(qt):
        for call in tqdm(calls, desc="calibration calls", unit="call", dynamic_ncols=True):
            qt(**call)
    written = clq_compile.save(qt, args.out)
    seconds = time.perf_counter() - started
    layers = len(model_state(qt).layers)
    batch = len(task.calibration["hidden_states"])
    print(textwrap.fill(f"quantized {layers} linear layers of {args.model} ({type(model).__name__}) with recipe "
                        f"{args.recipe!r} at {args.bits} in {seconds:.1f} s, calibrated on {len(calls)} calls of "
                        f"{batch} samples (seed {args.seed + 1}, {args.steps} sampling steps)", TABLE_COLUMNS,
                        subsequent_indent="    "))
    print(f"wrote {written} ({_size(written) / 2**20:.2f} MiB)")
    print()
    print(clq_compile.explain(qt, columns=None if args.wide else TABLE_COLUMNS))
    return 0


def explain(args: argparse.Namespace) -> int:
    """Print the per-layer table of a saved artifact."""
    from clq_compile.explain import explain_artifact

    _existing(args.artifact, str(args.artifact))
    try:
        table = explain_artifact(args.artifact, columns=None if args.wide else TABLE_COLUMNS)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from error
    print(table)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Sample full precision and the artifact from the same noise and compare."""
    _model_folder(args.model)
    if args.json is not None:
        _writable(args.json, "--json")
    manifest = _manifest(args.artifact, f"--artifact {args.artifact}")
    model, task = _model_and_task(args.model, args.samples, 1, args.seed, args.latent_size)
    import torch

    import clq_compile
    from clq_compile.workloads import score

    torch._dynamo.reset()
    try:
        # The full-precision weights stay: `model` itself draws the reference samples.
        qt = clq_compile.load(model, args.artifact, release_weights=False)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from error
    reference = _sample(model, task, task.evaluation, args.steps, "full-precision samples")
    images = _sample(qt, task, task.evaluation, args.steps, "quantized samples")
    try:
        quantized = score(task, images, reference)
        full = task.judge(reference)
    except (FloatingPointError, ImportError) as error:
        raise RunError(str(error)) from error
    options = manifest.get("options", {})
    result = {"model": str(args.model), "artifact": str(args.artifact), "recipe": manifest.get("recipe"),
              "bits": options.get("bits"), "task": task.description, "steps": args.steps, "seed": args.seed,
              "samples": len(reference), **quantized,
              "fp_accuracy": None if full is None else round(full, 4)}
    print(f"{args.artifact} (recipe {result['recipe']!r}, {result['bits']}) against full precision on "
          f"{args.model}")
    print(f"samples: {task.description}; {args.steps} steps")
    print(_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _table(result: dict[str, Any]) -> str:
    from clq_compile.explain import aligned

    def show(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [("", "PSNR (dB)", "SSIM", "accuracy"),
            ("full precision", "reference", "reference", show(result["fp_accuracy"], ".3f")),
            ("quantized", show(result["psnr"], ".2f"), show(result["ssim"], ".4f"),
             show(result["accuracy"], ".3f"))]
    return "\n".join(aligned(rows))


# ---------------------------------------------------------------------------------------------
# Parser


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more; got {value}")
    return value


# Seeds reach numpy / scikit-learn (the digits judge), which take 0 to 2^32 - 1; `quantize` uses seed + 1.
MAX_SEED = 2**32 - 2


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED}; got {value}")
    return value


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="FOLDER",
                        help="a diffusers transformer folder (config.json + weights: DiT, PixArt, SD3, Flux) "
                             f"or a pipeline folder (model_index.json; its transformer is used), e.g. {EXAMPLE_MODEL}")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_SAMPLING_STEPS, metavar="S",
                        help="sampling steps: DDIM steps for a digits model, steps of the short loop x <- x - "
                             f"model(x, t) / S otherwise (default {DEFAULT_SAMPLING_STEPS})")
    parser.add_argument("--latent-size", type=positive_int, default=None, metavar="N",
                        help="models other than the digits DiT: side of the random latents (default: the "
                             "config's sample_size; Flux 32)")


def _add_wide(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wide", action="store_true",
                        help=f"one line per layer, every cell in full (default: wrapped to {TABLE_COLUMNS} columns)")


def build_parser(prog: str = "clq") -> argparse.ArgumentParser:
    """The argument parser of the `clq` program and its three subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=prog, formatter_class=formatter,
        description=(
            "Quantize a diffusers diffusion transformer (DiT, PixArt, SD3, Flux) with the clq torch.compile\n"
            "backend, save the quantized layers to one file, and check what it did and what it costs.\n"
            f"Run `{prog} SUBCOMMAND --help` for each one's options."),
        epilog=(
            f"example, on the bundled digits model ({EXAMPLE_SECONDS}):\n"
            f"  {prog} quantize --model {EXAMPLE_MODEL} --out {EXAMPLE_ARTIFACT}\n"
            f"  {prog} explain {EXAMPLE_ARTIFACT}\n"
            f"  {prog} eval --model {EXAMPLE_MODEL} --artifact {EXAMPLE_ARTIFACT}\n\n"
            "In Python: clq_compile.load(model, path) gives the quantized model back without calibrating."))
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True, title="subcommands")

    q = commands.add_parser(
        "quantize", formatter_class=formatter,
        help="calibrate on the model's own samples, quantize, write an artifact (.safetensors)",
        description=(
            "Quantize a diffusers transformer and write the result to one file.\n\n"
            "The model samples --calib-samples inputs of its own in full precision (DDIM over the ten\n"
            "digits for a digits-shaped DiT, random inputs from its config otherwise; noise seed\n"
            "--seed + 1); its inputs at --calib-steps of the --steps sampling steps are recorded and\n"
            "replayed inside clq_compile.calibrating, where the recipe quantizes every selected layer.\n"
            "Prints a summary and the per-layer table (see `explain`)."),
        epilog=(
            f"example:\n  {prog} quantize --model {EXAMPLE_MODEL} --out {EXAMPLE_ARTIFACT} --bits w4a4 --recipe clq\n\n"
            "output: --out, one .safetensors file (any other name: a folder with manifest.json and\n"
            "tensors.safetensors) holding the packed quantized layers and a manifest of the options,\n"
            "each layer's decision and error, and a fingerprint of the model it belongs to."))
    _add_model(q)
    q.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="where to write the artifact, e.g. model-w4a4.safetensors")
    q.add_argument("--recipe", type=str.lower, choices=RECIPE_NAMES, default="clq", metavar="R",
                   help=f"how to quantize: one of {', '.join(RECIPE_NAMES)} (default clq; see the README's Recipes)")
    q.add_argument("--bits", type=str.lower, choices=QUANTIZING_BITS, default="w4a4", metavar="B",
                   help=f"number formats of weights and activations: one of {', '.join(QUANTIZING_BITS)} "
                        f"(default w4a4; fp8 = float8 e4m3, w*a16 = weight-only)")
    q.add_argument("--conditioning-bits", type=str.lower, choices=WEIGHT_ONLY_BITS, default=None, metavar="B",
                   help=f"quantize the conditioning GEMMs and adaLN modulations weight-only too: one of "
                        f"{', '.join(WEIGHT_ONLY_BITS)} (default: keep them in 16 bit)")
    q.add_argument("--lowrank-rank", type=positive_int, default=None, metavar="R",
                   help=f"rank of the 16-bit low-rank branch of {', '.join(LOWRANK_RECIPES)} (default 32, "
                        f"capped per layer at min(out, in) / 4)")
    q.add_argument("--options", default=None, metavar="JSON",
                   help="further backend options as a JSON object (README, Options), e.g. "
                        "'{\"ars_threshold\": 0.5}' with --recipe lrq-dit, or '{\"mean_correction\": true}'")
    q.add_argument("--calib-samples", type=positive_int, default=10, metavar="N",
                   help="calibration samples, drawn as one batch (default 10; digits: labels 0..9 cycling)")
    q.add_argument("--calib-steps", type=_non_negative, default=10, metavar="K",
                   help="sampling steps recorded per calibration sample, evenly spaced; 0 = all (default 10)")
    q.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="calibration noise comes from seed + 1, so it differs from `eval --seed N`'s (default 0)")
    q.add_argument("--kernels", type=str.lower, choices=KERNELS, default="auto",
                   help="the quant_linear implementation: auto (Triton on CUDA, torch elsewhere), reference "
                        "(torch), triton (default auto)")
    _add_wide(q)
    q.set_defaults(run=quantize)

    e = commands.add_parser(
        "explain", formatter_class=formatter,
        help="print an artifact's per-layer table: which layers are quantized, how, and their error",
        description=(
            "Print what an artifact holds: its options, and one row per linear layer with its role,\n"
            "shape, bits, granularity, method, decision (quantized, or kept in 16 bit and why) and\n"
            "relative output error on the calibration data. Reads the file only; no model needed."),
        epilog=f"example:\n  {prog} explain {EXAMPLE_ARTIFACT}")
    e.add_argument("artifact", type=Path, metavar="FILE", help="an artifact written by `quantize` (or clq_compile.save)")
    _add_wide(e)
    e.set_defaults(run=explain)

    v = commands.add_parser(
        "eval", formatter_class=formatter,
        help="PSNR / SSIM / class accuracy of the artifact's samples against full precision",
        description=(
            "Measure how far the quantized model's samples move from the full-precision model's.\n\n"
            "Both sample from the same noise and conditioning (seed --seed): for a digits-shaped DiT,\n"
            "--samples images of each digit with DDIM, judged by PSNR and SSIM on the images in\n"
            "[-1, 1] and by a digit classifier (needs scikit-learn: pip install \"clq-compile[bench]\");\n"
            "for other models, --samples random inputs through the short sampling loop, compared on\n"
            "the final latents (PSNR / SSIM only). Prints a small table."),
        epilog=(
            f"example:\n  {prog} eval --model {EXAMPLE_MODEL} --artifact {EXAMPLE_ARTIFACT} --samples 4 --json eval.json\n\n"
            "output: the table on stdout; with --json, also a JSON object with model, artifact, recipe,\n"
            "bits, task, steps, seed, samples, psnr, ssim, accuracy and fp_accuracy."))
    _add_model(v)
    v.add_argument("--artifact", type=Path, required=True, metavar="FILE",
                   help="the artifact `quantize` wrote for this model")
    v.add_argument("--samples", type=positive_int, default=4, metavar="N",
                   help="digits model: samples of each of the 10 digits; other models: random inputs (default 4)")
    v.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of the evaluation noise (default 0)")
    v.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the numbers to this JSON file")
    v.set_defaults(run=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `clq` command line on `argv` (default: sys.argv[1:]); returns the exit status.

    0: done; 1: the run failed; 2: bad input, with one line on stderr naming the problem.
    """
    prog = "python -m clq_compile" if argv is None and Path(sys.argv[0]).name == "__main__.py" else "clq"
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, which argparse has printed
        return stop.code if isinstance(stop.code, int) else 0
    except UsageError as error:
        print(f"{error.prog}: error: {error}; see `{error.prog} --help`", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (InputError, RunError) as error:
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1
