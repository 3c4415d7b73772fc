"""What a model is sampled and calibrated on: the sampling tasks, the calibration calls, model loading.

Shared by the command line (``clq quantize`` / ``clq eval``) and the quality benchmark
(``bench/quality.py``), so that a quantized model is calibrated and judged the same way
everywhere.

- ``Task``: one model's evaluation inputs (starting noise and conditioning), calibration inputs,
  sampler and judge. ``digits_task`` is class-conditional DDIM for the bundled digits DiT
  (``clq_compile.digits``), judged by a digit classifier; ``random_inputs_task`` serves any other
  DiT / PixArt / SD3 / Flux transformer: random latents and conditioning from its config through
  the short loop ``clq_compile.stress.sample``, compared on the final latents, no classifier.
- Calibration (``calibration_calls``): the full-precision sampler runs on the calibration inputs,
  the transformer's inputs at evenly spaced steps are kept and regrouped so that every call the
  calibrating block replays spans the whole trajectory (``interleave_timesteps``).
- ``load_model``: a diffusers transformer folder, or a pipeline folder's transformer.
- ``score``: PSNR, SSIM (``clq_compile.metrics``) and class accuracy of samples against the
  full-precision ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from torch import nn

from clq_compile.folders import checked_transformer_folder, pipeline_transformer_folder, transformer_folder

from . import digits, metrics
from .stress import sample as short_sampling_loop

TEXT_TOKENS = 16
# Flux has no sample_size in its config; 32 latent pixels (256 packed tokens) keeps a CPU run short.
FLUX_LATENT_SIZE = 32
# Per-token index tensors of Flux: they describe positions, not batch rows.
POSITION_INPUTS = ("img_ids", "txt_ids")
GENERIC_GRID_COLUMNS = 8


# ---------------------------------------------------------------------------------------------
# What is sampled


class Recorder:
    """Calls `model` and keeps the keyword inputs of every call: one sampling run's trajectory."""

    def __init__(self, model: Callable[..., Any]):
        self.model = model
        self.calls: list[dict[str, Any]] = []

    def __call__(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        self.calls.append({"hidden_states": hidden_states, **kwargs})
        return self.model(hidden_states, **kwargs)


@dataclass
class Task:
    """How one model is sampled and judged.

    evaluation / calibration: keyword inputs of one batched call; ``hidden_states`` is the
        starting noise, the rest the conditioning.
    draw(model, inputs, steps) -> images [n, C, H, W]: the sampler.
    data_range(reference) -> the range PSNR and SSIM use, from the full-precision images.
    judge(images) -> class accuracy, or None when there is no classifier.
    grid_index: which evaluation samples a sample grid shows.
    display_scale(reference) -> what a grid divides samples by to bring them into [-1, 1].
    """

    description: str
    evaluation: dict[str, Any]
    calibration: dict[str, Any]
    draw: Callable[[Callable[..., Any], dict[str, Any], int], torch.Tensor]
    data_range: Callable[[torch.Tensor], float]
    judge: Callable[[torch.Tensor], float | None]
    grid_index: torch.Tensor
    display_scale: Callable[[torch.Tensor], float] = lambda reference: 1.0
    ssim_window: int = metrics.SSIM_WINDOW


def is_digits_model(model: nn.Module) -> bool:
    """True for a DiT shaped like the bundled one: 1 channel, 16 x 16, 10 classes."""
    config = model.config
    return (type(model).__name__ == "DiTTransformer2DModel" and config.in_channels == 1
            and config.sample_size == digits.IMAGE_SIZE
            and config.num_embeds_ada_norm == digits.NUM_CLASSES)


def digits_task(samples_per_class: int, calib_samples: int, seed: int) -> Task:
    """Class-conditional DDIM over the 10 digits, judged by the digit classifier.

    Evaluation: `samples_per_class` images of every digit from noise seed `seed`; calibration:
    `calib_samples` images from seed + 1, labels 0, 1, 2, ... cycling through the classes. The
    classifier (scikit-learn) is fitted on the first call of ``judge``, so sampling and
    calibration work without scikit-learn.
    """
    side = digits.IMAGE_SIZE

    def noise(n: int, noise_seed: int) -> torch.Tensor:
        return torch.randn((n, 1, side, side), generator=torch.Generator().manual_seed(noise_seed))

    labels = torch.arange(digits.NUM_CLASSES).repeat_interleave(samples_per_class)
    calib_labels = torch.arange(calib_samples) % digits.NUM_CLASSES
    classifier = []

    def draw(model, inputs, steps):
        return digits.sample(model, inputs["class_labels"], inputs["hidden_states"], num_inference_steps=steps)

    def judge(images):
        if not classifier:
            classifier.append(digits.fit_digit_classifier(seed))
        return float((digits.classify(classifier[0], images) == labels).float().mean())

    return Task(
        description=(f"class-conditional DDIM, {samples_per_class} samples per digit from noise seed "
                     f"{seed}; PSNR/SSIM on images in [-1, 1]; accuracy by the digit classifier"),
        evaluation={"hidden_states": noise(len(labels), seed), "class_labels": labels},
        calibration={"hidden_states": noise(calib_samples, seed + 1), "class_labels": calib_labels},
        draw=draw,
        data_range=lambda reference: 2.0,
        judge=judge,
        grid_index=torch.arange(digits.NUM_CLASSES) * samples_per_class,
    )


def default_latent_size(model: nn.Module) -> int:
    """The latent side the random inputs use when --latent-size is not given."""
    if type(model).__name__ == "FluxTransformer2DModel":
        return FLUX_LATENT_SIZE
    size = getattr(model.config, "sample_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__}'s config has no integer sample_size; pass --latent-size")
    return size


def random_inputs(model: nn.Module, batch: int, latent_size: int, seed: int) -> dict[str, Any]:
    """Keyword inputs for one call of `model` on random latents and conditioning, from its config.

    latents: [batch, in_channels, latent_size, latent_size] (Flux: packed 2 x 2, so
    [batch, (latent_size / 2)², in_channels]); captions: TEXT_TOKENS Gaussian embeddings of the
    model's caption width; DiT class labels uniform over its classes. The timestep is a
    placeholder: the sampling loop overwrites it at every step.
    """
    name, config = type(model).__name__, model.config
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    timestep = torch.full((batch,), 999, dtype=torch.long)
    latents = (batch, config.in_channels, latent_size, latent_size)
    if name == "DiTTransformer2DModel":
        return {"hidden_states": randn(*latents), "timestep": timestep,
                "class_labels": torch.randint(0, config.num_embeds_ada_norm, (batch,), generator=g)}
    if name == "PixArtTransformer2DModel":
        # PixArt at 1024 px embeds the image's resolution and aspect ratio as extra conditions.
        extra = ({"resolution": torch.full((batch, 2), 8.0 * latent_size), "aspect_ratio": torch.ones(batch, 1)}
                 if getattr(model, "use_additional_conditions", False)
                 else {"resolution": None, "aspect_ratio": None})
        return {"hidden_states": randn(*latents), "timestep": timestep,
                "encoder_hidden_states": randn(batch, TEXT_TOKENS, config.caption_channels),
                "added_cond_kwargs": extra}
    if name == "SD3Transformer2DModel":
        return {"hidden_states": randn(*latents), "timestep": timestep,
                "encoder_hidden_states": randn(batch, TEXT_TOKENS, config.joint_attention_dim),
                "pooled_projections": randn(batch, config.pooled_projection_dim)}
    if name == "FluxTransformer2DModel":
        if latent_size % 2:
            raise ValueError(f"Flux packs 2 x 2 latent pixels per token: --latent-size must be even; got {latent_size}")
        side = latent_size // 2
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return {"hidden_states": randn(batch, side * side, config.in_channels),
                "timestep": torch.ones(batch),
                "encoder_hidden_states": randn(batch, TEXT_TOKENS, config.joint_attention_dim),
                "pooled_projections": randn(batch, config.pooled_projection_dim),
                "img_ids": img_ids, "txt_ids": torch.zeros(TEXT_TOKENS, 3),
                "guidance": torch.full((batch,), 3.5) if config.guidance_embeds else None}
    raise ValueError(f"no random inputs for {name}: they exist for DiTTransformer2DModel, "
                     f"PixArtTransformer2DModel, SD3Transformer2DModel and FluxTransformer2DModel")


def as_images(latents: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] latents as they are; Flux's packed [n, tokens, C] unpacked to [n, C, side, side]."""
    if latents.ndim == 4:
        return latents
    n, tokens, channels = latents.shape
    side = math.isqrt(tokens)
    return latents.reshape(n, side, side, channels).permute(0, 3, 1, 2)


def random_inputs_task(model: nn.Module, samples: int, calib_samples: int, seed: int,
                       latent_size: int | None) -> Task:
    """The short sampling loop on random inputs, compared on the final latents; no accuracy.

    Evaluation: `samples` random inputs from `seed`; calibration: `calib_samples` from seed + 1.
    The latent side is `latent_size`, or ``default_latent_size(model)`` when None.
    """
    size = default_latent_size(model) if latent_size is None else latent_size
    evaluation = random_inputs(model, samples, size, seed)
    window = min(metrics.SSIM_WINDOW, *as_images(evaluation["hidden_states"]).shape[-2:])
    window -= 1 - window % 2

    def draw(model, inputs, steps):
        return as_images(short_sampling_loop(model, inputs, steps=steps)).float()

    def data_range(reference):
        spread = float(reference.max() - reference.min())
        return spread if spread > 0 else 1.0

    return Task(
        description=(f"{samples} random inputs (latent size {size}, seed {seed}) through the short "
                     f"sampling loop x <- x - model(x, t) / steps; PSNR/SSIM on the final latents with "
                     f"the full-precision latents' peak-to-peak range as data range; no accuracy"),
        evaluation=evaluation,
        calibration=random_inputs(model, calib_samples, size, seed + 1),
        draw=draw,
        data_range=data_range,
        judge=lambda images: None,
        grid_index=torch.arange(min(samples, GENERIC_GRID_COLUMNS)),
        display_scale=lambda reference: float(reference[:, :1].abs().max()) or 1.0,
        ssim_window=window,
    )


def task_for(model: nn.Module, samples: int, calib_samples: int, seed: int,
             latent_size: int | None = None) -> Task:
    """``digits_task`` for a digits-shaped DiT (`samples` per digit), else ``random_inputs_task``."""
    if is_digits_model(model):
        return digits_task(samples, calib_samples, seed)
    return random_inputs_task(model, samples, calib_samples, seed, latent_size)


# ---------------------------------------------------------------------------------------------
# Calibration


def _is_row_input(key: str, value: Any, batch: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch
            and key not in POSITION_INPUTS)


def _gather_rows(calls: list[dict[str, Any]], sources: list[int], batch: int) -> dict[str, Any]:
    """Row i of the result comes from calls[sources[i]]; inputs shared by all rows are kept."""
    first = calls[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _gather_rows([c[key] for c in calls], sources, batch)
        elif _is_row_input(key, value, batch):
            out[key] = torch.stack([calls[s][key][i] for i, s in enumerate(sources)])
        else:
            out[key] = value
    return out


def interleave_timesteps(calls: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Regroup K recorded calls (one timestep each, `batch` rows) into K calls spanning all steps.

    Call j takes sample i from step (j + i·K // batch) mod K: every (sample, step) pair appears
    exactly once, and within a call the samples sit at steps spread evenly over the trajectory.
    The recipes' searches look at the first few recorded calls only (option ``search_calls``);
    recorded in sampling order, those would all be the noisiest steps.
    """
    k = len(calls)
    return [_gather_rows(calls, [(j + i * k // batch) % k for i in range(batch)], batch) for j in range(k)]


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indices spread over range(total), first and last included (all of them if count >= total)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def calibration_calls(task: Task, model: Callable[..., Any], steps: int, calib_steps: int) -> list[dict[str, Any]]:
    """The inputs the calibrating block replays: the full-precision trajectory, regrouped.

    `model` (full precision) samples ``task.calibration`` over `steps` steps; its inputs at
    `calib_steps` evenly spaced steps (0: all of them) are kept and regrouped with
    ``interleave_timesteps``. Returns `calib_steps` keyword-input dicts of one batched call each.
    """
    recorder = Recorder(model)
    with torch.no_grad():
        task.draw(recorder, task.calibration, steps)
    kept = [recorder.calls[i] for i in evenly_spaced(calib_steps or len(recorder.calls), len(recorder.calls))]
    batch = len(task.calibration["hidden_states"])
    return interleave_timesteps(kept, batch)


# ---------------------------------------------------------------------------------------------
# Models


def load_transformer(path: Path) -> nn.Module:
    """A diffusers transformer folder, loaded with the class its config.json names, in eval mode."""
    path = checked_transformer_folder(path)
    class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{path}: config.json names {class_name!r}, which is not a diffusers "
                         f"model class of diffusers {diffusers.__version__}")
    return cls.from_pretrained(path, torch_dtype=torch.float32).eval()


def load_pipeline_transformer(path: Path) -> nn.Module:
    """The `transformer` of a diffusers pipeline folder, in float32 and eval mode.

    Only the transformer/ subfolder that model_index.json lists is loaded: the text encoders and
    the VAE are not needed to quantize or judge the transformer.
    """
    return load_transformer(pipeline_transformer_folder(path))


def load_model(path: Path) -> nn.Module:
    """A pipeline folder's transformer (the folder has model_index.json), else a transformer folder."""
    return load_transformer(transformer_folder(path))


# ---------------------------------------------------------------------------------------------
# Judging


def _rounded(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)


def score(task: Task, images: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """PSNR, SSIM and accuracy of `images` against the full-precision `reference` (both [n, C, H, W])."""
    if not torch.isfinite(images).all():
        raise FloatingPointError("the quantized model produced non-finite samples (NaN or Inf)")
    data_range = task.data_range(reference)
    return {"psnr": _rounded(metrics.psnr(images, reference, data_range), 3),
            "ssim": _rounded(metrics.ssim(images, reference, data_range, window=task.ssim_window), 5),
            "accuracy": _rounded(task.judge(images), 4)}
