"""What `conditioning_bits` stores: the linear weights of a DiT with its conditioning GEMMs and
adaLN modulations kept in 16 bit, and quantized weight-only.

For each mode, the model is compiled data-free (round to nearest: storage does not depend on the
recipe) and the per-layer storage is read from `clq_compile.memory_report`; layers the policy keeps
count at bfloat16. Writes bench/results/conditioning-bits.{json,md}.

    python bench/conditioning_bits.py [--model bench/assets/digits-dit] [--bits w4a4]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import clq_compile
from clq_compile.calibration import model_state
from clq_compile.choices import CONDITIONING_BITS, CONDITIONING_ROLES
from clq_compile.workloads import load_model

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def storage(path: Path, bits: str, conditioning_bits: str | None) -> dict:
    """Bytes of every linear weight of the model at `path`, quantized (as packed) or kept (bf16)."""
    torch._dynamo.reset()
    model = load_model(path)
    options = {"bits": bits, "recipe": "rtn", "kernels": "reference"}
    if conditioning_bits:
        options["conditioning_bits"] = conditioning_bits
    qt = torch.compile(model, backend="clq", options=options)
    config = model.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        qt(hidden_states=x, timestep=torch.tensor([10, 20]), class_labels=torch.tensor([1, 2]))
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
    return {"conditioning_bits": conditioning_bits, **totals,
            "conditioning_weight_share": totals["conditioning_weights"] / totals["linear_weights"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BENCH / "assets" / "digits-dit")
    parser.add_argument("--bits", default="w4a4", help="the token GEMMs' mode (default w4a4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [storage(args.model, args.bits, mode) for mode in CONDITIONING_BITS]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model), "bits": args.bits, "torch": torch.__version__, "rows": rows}
    (args.out / "conditioning-bits.json").write_text(json.dumps(result, indent=1) + "\n")
    kept = rows[0]["linear_bytes"]
    lines = [f"# Linear weights with `conditioning_bits` (`python bench/conditioning_bits.py`), "
             f"{args.model.name}, bits={args.bits}", "",
             f"Conditioning GEMMs and adaLN modulations: {rows[0]['conditioning_weight_share']:.1%} of the "
             f"{rows[0]['linear_weights']} linear weights. Kept layers counted at bfloat16.", "",
             "| conditioning_bits | conditioning layers | all linear layers | vs. kept in 16 bit |", "|---|---|---|---|"]
    lines += [f"| {r['conditioning_bits'] or 'None (16 bit)'} | {r['conditioning_bytes'] / 1024:.0f} KiB | "
              f"{r['linear_bytes'] / 1024:.0f} KiB | {r['linear_bytes'] / kept:.3f}x |" for r in rows]
    (args.out / "conditioning-bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
