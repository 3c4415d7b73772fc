"""Time CLQ on one PixArt-size block: width 1152 (16 heads x 72), feed-forward 4608, 1024 tokens.

Checks that the passes do not hang on real widths: one transformer block of PixArt-Σ's shape,
trained-like weights, 8 calibration calls at 1024 image tokens, each recipe timed end to end
(recording + quantization + lowering). Writes bench/results/big_block.json with the machine.

    python bench/big_block.py                       # recipes rtn, quarot, clq
    python bench/big_block.py --recipes clq --calls 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import clq_compile
from clq_compile.stress import inject_outliers, trained_like_weights
from machine import machine_info


def pixart_block_model() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=64, num_layers=1, patch_size=2, attention_head_dim=72, num_attention_heads=16,
        caption_channels=4096, in_channels=4, out_channels=8, cross_attention_dim=1152,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    trained_like_weights(model)
    inject_outliers(model, scale=50.0)
    return model


def inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 64, 64, generator=g),
            "timestep": torch.randint(0, 1000, (1,), generator=g),
            "encoder_hidden_states": torch.randn(1, 120, 4096, generator=g),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="rtn,quarot,clq")
    parser.add_argument("--calls", type=int, default=8, help="calibration calls (1024 tokens each)")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    model = pixart_block_model()
    rows = []
    with torch.no_grad():
        test = inputs(999)
        reference = model(**test).sample
        for recipe in args.recipes.split(","):
            torch._dynamo.reset()
            qt = torch.compile(model, backend="clq", options={"bits": args.bits, "recipe": recipe})
            start = time.perf_counter()
            with clq_compile.calibrating(qt):
                for seed in range(args.calls):
                    qt(**inputs(seed))
                recorded = time.perf_counter()
            done = time.perf_counter()
            out = qt(**test).sample
            error = float((out - reference).norm() / reference.norm())
            rows.append({"recipe": recipe, "bits": args.bits, "calls": args.calls,
                         "record_seconds": recorded - start, "quantize_seconds": done - recorded,
                         "relative_error": error})
            print(json.dumps(rows[-1]), flush=True)
    machine = {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "big_block.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
