"""Train a small class-conditional DiT on scikit-learn's digits: the project's trained instrument.

Random-init models are a poor stand-in for W4A4 studies: freshly initialized linear weights
are uniform, which 4-bit quantization handles unusually well and which any rotation turns
Gaussian, so rotations look harmful on them; trained weights are bell-shaped with heavy tails. This script
trains a real diffusers ``DiTTransformer2DModel`` (adaLN-Zero, patch 2, 4 blocks, width 96 =
3 heads x 32) with the standard DDPM objective, so the benchmark can measure how far a
quantized model's samples move from the full-precision ones on a model that actually learned
something, and whether the samples still show the requested digit.

Usage (writes the model, ``samples.png`` and ``training_run.json`` into ``--out``)::

    python bench/train_digits_dit.py --seed 0 --steps 2000 --minutes 25 --threads 1 \
        --out bench/assets/digits-dit
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.normalization import AdaLayerNormZero
from torch import nn
from tqdm import tqdm

# bench/ is a folder of scripts, not a package: run as a script, Python puts this folder on
# sys.path; importers put it there themselves.
from clq_compile import digits
from machine import machine_info


def digits_dit_config(
    num_attention_heads: int = 3, attention_head_dim: int = 32, num_layers: int = 4
) -> dict[str, Any]:
    """Keyword arguments for a ``DiTTransformer2DModel`` over 16x16 one-channel digits.

    The default width 96 = 3 x 32 is a multiple of 32 but not a power of two, like the
    widths of real DiTs (1152 in DiT-XL and PixArt), so rotation recipes cannot rely on a
    single power-of-two Hadamard over the whole width; each head stays 32 wide, so rotations
    kept inside a head still can. ``out_channels = 1`` predicts only the noise: the
    learned-variance half (``out_channels = 2``) would need the variational loss term and is
    not used by DDIM.
    """
    return {
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": attention_head_dim,
        "in_channels": 1,
        "out_channels": 1,
        "num_layers": num_layers,
        "sample_size": digits.IMAGE_SIZE,
        "patch_size": 2,
        "num_embeds_ada_norm": digits.NUM_CLASSES,
        "norm_type": "ada_norm_zero",
    }


def init_weights(model: DiTTransformer2DModel) -> None:
    """Redraw every ``nn.Linear`` weight from a normal truncated at 3 std, std 1/sqrt(fan_in),
    then zero the adaLN-Zero modulation and output layers as the DiT paper does.

    Trained large DiTs have bell-shaped, heavy-tailed weights; PyTorch's default init is
    uniform, which 4-bit quantization handles unusually well and which hides what a rotation
    does to the weight distribution. Training from a normal start keeps the bell shape.
    The std is 1/sqrt(fan_in) (LeCun) rather than the 0.02 of large transformers because at
    width 96 a fixed 0.02 would shrink every layer's output to about a fifth of its input's
    scale; 1/sqrt(fan_in) keeps activations at unit scale whatever the width, and matches the
    scale the project's heavy-tailed stress models use. Truncation (the 0.27% of draws beyond
    3 std are redrawn) is the conventional guard against a few extreme initial weights; it
    makes the start slightly lighter-tailed than a normal, so heavy tails have to come from
    training or be injected as the stress models do. Biases start at zero.

    Diffusers leaves the adaLN-Zero layers at PyTorch's default init, but the zeros matter:
    with them every block starts as the identity and the output as zero. Measured here
    (seed 0, 500 steps, batch 128), the zero start reached loss 0.073 and 84% class accuracy,
    redrawing those layers like the rest only 0.140 and 54%. The layers zeroed are each
    block's modulation linear (shift, scale and gate from the conditioning) and the final
    modulation and projection (``proj_out_1``, ``proj_out_2``); they are conditioning or
    output GEMMs, which the quantizer keeps in 16 bit by default, while every token GEMM
    (attention q/k/v/out, feed-forward) starts bell-shaped.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    zero_start = [m.linear for m in model.modules() if isinstance(m, AdaLayerNormZero)]
    for linear in [*zero_start, model.proj_out_1, model.proj_out_2]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


def _batches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: epoch after epoch of seeded permutations, read in order."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(num_items, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


@dataclass
class TrainingRun:
    """What ``train`` produced: the model (in eval mode), the loss of every step, the time."""

    model: DiTTransformer2DModel
    losses: list[float]
    seconds: float


def train(
    config: dict[str, Any],
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
) -> TrainingRun:
    """Train a DiT on the digits with the DDPM epsilon objective.

    Each step draws ``batch_size`` real digits (x0: [batch, 1, 16, 16] in [-1, 1]) in a seeded
    order without augmentation (flips would turn digits into non-digits), a uniform timestep
    t in [0, 1000) and Gaussian noise eps per image, and minimises the mean squared error
    between eps and the model's prediction from the noised image sqrt(a_t) x0 + sqrt(1-a_t) eps
    under ``digits.training_scheduler()``. AdamW at a constant learning rate without weight
    decay, as in DiT. Diffusers' adaLN-Zero embedder replaces 10% of the class labels with a
    null class during training (classifier-free guidance support); that stays on.

    Args:
        config: keyword arguments for ``DiTTransformer2DModel`` (see ``digits_dit_config``).
        steps: optimizer steps to run.
        batch_size: images per step.
        learning_rate: AdamW learning rate.
        seed: fixes the initial weights, the data order, timesteps, noise and label dropout.
        max_seconds: stop earlier once this much wall time has passed; the run is then no
            longer reproducible step for step, so prefer ``steps`` for a model to ship.
        progress: show a tqdm bar with the running loss.

    Returns:
        The trained model in eval mode, the per-step losses and the training wall time.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive; got {steps} and {batch_size}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = DiTTransformer2DModel(**config)
    init_weights(model)
    model.train()
    images, labels = digits.load_digit_images()
    scheduler = digits.training_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(images), batch_size, generator)

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="training", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        index = next(batches)
        clean = images[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(index),), generator=generator
        )
        noisy = scheduler.add_noise(clean, noise, timesteps)
        predicted = model(noisy, timestep=timesteps, class_labels=labels[index]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    bar.close()
    model.eval()
    return TrainingRun(model=model, losses=losses, seconds=time.perf_counter() - start)


def sample_and_classify(
    model: DiTTransformer2DModel,
    per_class: int,
    seed: int,
    num_inference_steps: int = digits.DEFAULT_SAMPLING_STEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``per_class`` digits of every class from fixed noise and label them.

    Returns:
        images: [10 * per_class, 1, 16, 16] in [-1, 1], class by class (0s first);
        requested: int64 [10 * per_class], the class each sample was conditioned on;
        predicted: int64 [10 * per_class], what the digit classifier (seeded with ``seed``) sees.
    """
    requested = torch.arange(digits.NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(
        (len(requested), 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE),
        generator=torch.Generator().manual_seed(seed),
    )
    images = digits.sample(model, requested, noise, num_inference_steps=num_inference_steps)
    predicted = digits.classify(digits.fit_digit_classifier(seed), images)
    return images, requested, predicted


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train a class-conditional DiT (diffusers DiTTransformer2DModel, adaLN-Zero, "
            "width 96, 4 blocks) on scikit-learn's 8x8 digits upsampled to 16x16, save it in "
            "diffusers format, then sample every class with DDIM and report how often a digit "
            "classifier agrees."
        )
    )
    parser.add_argument(
        "--out", type=Path, required=True,
        help="folder for the model, samples.png and training_run.json",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed for weights, data order, noise and sampling (default 0)",
    )
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument(
        "--minutes", type=float, default=None,
        help="also stop after this many minutes of training "
        "(the run is then not reproducible step for step)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per step (default 128)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--samples-per-class", type=int, default=20,
        help="samples per digit for the final check (default 20)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train, save, sample, classify, write the report."""
    args = _parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    max_seconds = None if args.minutes is None else 60.0 * args.minutes
    run = train(
        digits_dit_config(), args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, seed=args.seed, max_seconds=max_seconds,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(args.out, safe_serialization=True)

    start = time.perf_counter()
    images, requested, predicted = sample_and_classify(run.model, args.samples_per_class, args.seed)
    sampling_seconds = time.perf_counter() - start
    accuracy = (predicted == requested).float().mean().item()
    digits.image_grid(images, columns=args.samples_per_class).save(args.out / "samples.png")

    tail = run.losses[-100:]
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "steps": len(run.losses),
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "model_config": digits_dit_config(),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "training_seconds": round(run.seconds, 1),
        "final_loss_mean_last_100_steps": round(sum(tail) / len(tail), 5),
        "loss_mean_first_100_steps": round(sum(run.losses[:100]) / len(run.losses[:100]), 5),
        "sampling": {
            "scheduler": "DDIM (trailing spacing, eta 0)",
            "steps": digits.DEFAULT_SAMPLING_STEPS,
            "samples_per_class": args.samples_per_class,
            "seconds": round(sampling_seconds, 1),
        },
        "class_accuracy": round(accuracy, 4),
        "per_class_accuracy": [
            round((predicted[requested == c] == c).float().mean().item(), 3)
            for c in range(digits.NUM_CLASSES)
        ],
        "machine": machine_info(),
    }
    (args.out / "training_run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['steps']} steps in {run.seconds / 60:.1f} min, final loss "
        f"{report['final_loss_mean_last_100_steps']:.4f}, class accuracy {accuracy:.3f}; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
