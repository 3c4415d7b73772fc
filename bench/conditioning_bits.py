"""What `conditioning_bits` stores: the linear weights of a DiT with its conditioning GEMMs and
adaLN modulations kept in 16 bit, and quantized weight-only.

For each mode, the model is compiled data-free (round to nearest: storage does not depend on the
recipe) and the per-layer storage is read from `clq_compile.memory_report`; layers the policy keeps
count at bfloat16, and so do the parameters outside linear layers (embeddings, norms, tables) in
the whole-model total. Writes bench/results/conditioning-bits[-MODEL].{json,md}. Bytes do not
depend on the device, so the CPU measures what a GPU will hold.

    python bench/conditioning_bits.py [--model bench/assets/digits-dit | pixart-sigma] [--bits w4a4]

`pixart-sigma`: a PixArtTransformer2DModel with PixArt-Σ's published sizes (bench/end_to_end.py's,
trained-like random weights, bf16; about a minute to build, 2.5 GB of memory), run once on a
16-token latent and 8 caption tokens (storage does not depend on the input's size).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

import clq_compile
from clq_compile.calibration import model_state
from clq_compile.choices import CONDITIONING_BITS, CONDITIONING_ROLES
from clq_compile.workloads import load_model

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PIXART_SIGMA = "pixart-sigma"


def digits_model(path: Path) -> tuple[Callable[[], torch.nn.Module], dict]:
    """A fresh copy of the DiT saved at `path` per call, and inputs for it."""
    config = load_model(path).config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size)
    return (lambda: load_model(path)), dict(hidden_states=x, timestep=torch.tensor([10, 20]),
                                            class_labels=torch.tensor([1, 2]))


def pixart_sigma_model() -> tuple[Callable[[], torch.nn.Module], dict]:
    """A fresh copy of a PixArt-Σ-size transformer per call (built once), and small inputs for it."""
    sys.path.insert(0, str(BENCH))
    import end_to_end

    model = end_to_end.build(end_to_end.SIGMA)
    config = dict(end_to_end.SIGMA, sample_size=4)
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in end_to_end.make_inputs(config, 8, 0).items()}
    return (lambda: copy.deepcopy(model)), inputs


def storage(make_model: Callable[[], torch.nn.Module], inputs: dict, bits: str, conditioning_bits: str | None) -> dict:
    """Bytes of every linear weight of the model, quantized (as packed) or kept (bf16), and of the
    whole model (every other parameter at bf16)."""
    torch._dynamo.reset()
    model = make_model()
    options = {"bits": bits, "recipe": "rtn", "kernels": "reference"}
    if conditioning_bits:
        options["conditioning_bits"] = conditioning_bits
    qt = torch.compile(model, backend="clq", options=options)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        qt(**inputs)
    packed = {p: b for p, (_, b) in clq_compile.memory_report(qt)["per_layer"].items()}
    decisions = model_state(qt).site_decisions()
    totals = {"linear_bytes": 0, "conditioning_bytes": 0, "linear_weights": 0, "conditioning_weights": 0}
    for p, d in decisions.items():
        count = d["out_features"] * d["in_features"]
        size = packed.get(p, 2 * count)
        parts = ("linear", "conditioning") if d["role"] in CONDITIONING_ROLES else ("linear",)
        for part in parts:
            totals[f"{part}_bytes"] += size
            totals[f"{part}_weights"] += count
    parameters = sum(p.numel() for p in model.parameters())
    return {"conditioning_bits": conditioning_bits, **totals,
            "conditioning_weight_share": totals["conditioning_weights"] / totals["linear_weights"],
            "model_parameters": parameters, "model_bf16_bytes": 2 * parameters,
            "model_bytes": totals["linear_bytes"] + 2 * (parameters - totals["linear_weights"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BENCH / "assets" / "digits-dit"),
                        help=f"a saved DiT's folder, or {PIXART_SIGMA!r}")
    parser.add_argument("--bits", default="w4a4", help="the token GEMMs' mode (default w4a4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.model == PIXART_SIGMA:
        (make_model, inputs), name, stem = pixart_sigma_model(), PIXART_SIGMA, f"conditioning-bits-{PIXART_SIGMA}"
    else:
        (make_model, inputs), name, stem = digits_model(Path(args.model)), Path(args.model).name, "conditioning-bits"
    rows = [storage(make_model, inputs, args.bits, mode) for mode in CONDITIONING_BITS]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "bits": args.bits, "torch": torch.__version__, "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    kept = rows[0]["linear_bytes"]
    command = "python bench/conditioning_bits.py" + (f" --model {PIXART_SIGMA}" if args.model == PIXART_SIGMA else "")
    lines = [f"# Linear weights with `conditioning_bits` (`{command}`), {name}, bits={args.bits}", "",
             f"Conditioning GEMMs and adaLN modulations: {rows[0]['conditioning_weight_share']:.1%} of the "
             f"{rows[0]['linear_weights']} linear weights. Kept layers, and in the whole model every parameter "
             f"outside a linear layer, counted at bfloat16 ({rows[0]['model_bf16_bytes'] / 2**20:.1f} MiB for all "
             f"{rows[0]['model_parameters']} parameters).", "",
             "| conditioning_bits | conditioning layers | all linear layers | vs. kept in 16 bit | whole model | "
             "whole model vs. bf16 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['conditioning_bits'] or 'None (16 bit)'} | {r['conditioning_bytes'] / 1024:.0f} KiB | "
              f"{r['linear_bytes'] / 1024:.0f} KiB | {r['linear_bytes'] / kept:.3f}x | "
              f"{r['model_bytes'] / 1024:.0f} KiB | {r['model_bytes'] / r['model_bf16_bytes']:.3f}x |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
