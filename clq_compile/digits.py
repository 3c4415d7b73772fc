"""Handwritten digits as a small, real diffusion task: data, noise schedule, sampler and judge.

The 1,797 8x8 digits bundled with scikit-learn (``sklearn.datasets.load_digits``, no download)
are scaled from their 0..16 ink levels to [-1, 1] and bilinearly upsampled to 16x16, so that a
patch-2 diffusion transformer sees 64 tokens. A class-conditional ``DiTTransformer2DModel``
trained on them (``bench/train_digits_dit.py``) is sampled here with DDIM; a logistic
regression fit on the same real digits judges whether each sample shows the digit it was asked
for. ``clq eval`` and the quality benchmark (``bench/quality.py``) reuse ``sample`` with a
quantized transformer in place of the full-precision one, so everything that defines the
sampling process lives in this file.

The data and the judge need scikit-learn, which is not a core dependency (``pip install
"clq-compile[bench]"``); sampling does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from clq_compile.choices import DEFAULT_SAMPLING_STEPS

if TYPE_CHECKING:
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

IMAGE_SIZE = 16
NUM_CLASSES = 10
TRAIN_TIMESTEPS = 1000


def _sklearn() -> Any:
    """scikit-learn, or an ImportError that says how to install it."""
    try:
        import sklearn.datasets
        import sklearn.linear_model
    except ImportError as error:
        raise ImportError(
            "the digits data and the digit classifier need scikit-learn: pip install "
            "\"clq-compile[bench]\" (or pip install scikit-learn)") from error
    return sklearn


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits, ready for diffusion.

    Returns:
        images: float32 [1797, 1, 16, 16] in [-1, 1] (0 ink -> -1, full ink 16 -> +1), upsampled
            from 8x8 bilinearly with ``align_corners=False``. Bilinear weights are convex, so the
            range stays [-1, 1], and unlike nearest-neighbour the strokes stay smooth rather than
            blocky, which is closer to what a diffusion model on natural images meets.
        labels: int64 [1797], the digit 0..9 each image shows.
    """
    digits = _sklearn().datasets.load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32)) / 8.0 - 1.0
    images = F.interpolate(
        small[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images must have shape [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]; "
            f"got {tuple(images.shape)}"
        )


def fit_digit_classifier(seed: int = 0) -> LogisticRegression:
    """Fit the judge: a multinomial logistic regression on the real 16x16 digits.

    Args:
        seed: passed to scikit-learn as ``random_state``, so the fit is reproducible.

    Returns:
        A fitted classifier over 256 pixel features in [-1, 1]; use it through ``classify``.
    """
    images, labels = load_digit_images()
    classifier = _sklearn().linear_model.LogisticRegression(max_iter=2000, random_state=seed)
    with _one_blas_thread():
        classifier.fit(images.reshape(len(images), -1).numpy(), labels.numpy())
    return classifier


def _one_blas_thread():
    """The solver's sums in one fixed order: with the BLAS's own thread count (the cores, or
    OMP_NUM_THREADS) the fitted weights differ in their last bits, and borderline samples with
    them, so accuracies would depend on the machine and the environment."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def classify(classifier: LogisticRegression, images: torch.Tensor) -> torch.Tensor:
    """Label images with the digit classifier.

    Args:
        classifier: from ``fit_digit_classifier``.
        images: [batch, 1, 16, 16] with pixels in [-1, 1].

    Returns:
        int64 [batch], the predicted digit of each image.
    """
    _check_images(images)
    features = images.detach().to(torch.float32).cpu().reshape(len(images), -1).numpy()
    with _one_blas_thread():
        return torch.from_numpy(classifier.predict(features).astype(np.int64))


def training_scheduler() -> DDPMScheduler:
    """The forward (noising) process the model is trained under.

    1,000 steps of the cosine schedule (``squaredcos_cap_v2``), epsilon prediction. The cosine
    schedule keeps more steps at low noise than a linear one, which matters on 16x16 images
    where a linear schedule destroys the digit within the first few hundred steps.
    """
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def sampling_scheduler() -> DDIMScheduler:
    """A deterministic DDIM sampler (eta = 0) over the training schedule.

    ``trailing`` spacing starts at the last training step (999), where the cosine schedule has
    left essentially no signal, so the pure Gaussian noise the sampler starts from is what the
    model expects at that step; the default ``leading`` spacing would start at 960 instead.
    The predicted clean image is clipped to [-1, 1], the data range.
    """
    return DDIMScheduler.from_config(training_scheduler().config, timestep_spacing="trailing")


@torch.no_grad()
def sample(
    transformer: Callable[..., object],
    labels: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS,
    scheduler: DDIMScheduler | None = None,
) -> torch.Tensor:
    """Draw class-conditional digits with DDIM; the result depends only on the inputs.

    Args:
        transformer: a class-conditional ``DiTTransformer2DModel`` or anything called the same
            way, e.g. its ``torch.compile``d version: ``transformer(x, timestep=t,
            class_labels=labels).sample`` with ``x: [batch, 1, 16, 16]`` and ``t: int64 [batch]``,
            returning the predicted noise ``[batch, 1, 16, 16]``. The caller puts it in eval
            mode (in train mode diffusers drops 10% of the class labels).
        labels: int64 [batch], the digit to draw for each sample, in 0..9.
        noise: [batch, 1, 16, 16], the starting Gaussian noise; fixing it fixes the samples.
        num_inference_steps: DDIM steps, 25 by default.
        scheduler: a DDIM scheduler to use instead of ``sampling_scheduler()``.

    Returns:
        float32 [batch, 1, 16, 16] images in [-1, 1].
    """
    _check_images(noise)
    if labels.ndim != 1 or len(labels) != len(noise):
        raise ValueError(
            f"labels must be a 1-D tensor with one class per noise image ({len(noise)}); "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}; got {labels.tolist()}")
    scheduler = sampling_scheduler() if scheduler is None else scheduler
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    labels = labels.to(device=noise.device, dtype=torch.long)
    x = noise
    for t in scheduler.timesteps:
        timestep = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
        eps = transformer(x, timestep=timestep, class_labels=labels).sample
        x = scheduler.step(eps.to(x.dtype), t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0).to(torch.float32)


def image_grid(images: torch.Tensor, columns: int, zoom: int = 4) -> Image.Image:
    """Tile images into one grayscale picture, row by row, with a gray line between tiles.

    Args:
        images: [n, 1, H, W] in [-1, 1]; -1 is drawn black, +1 white.
        columns: images per row; the last row is filled up with gray.
        zoom: each pixel becomes a zoom x zoom square (nearest neighbour), so 16x16 is visible.

    Returns:
        A mode "L" image of size (columns * (W + 1) * zoom, rows * (H + 1) * zoom).
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [n, 1, H, W]; got {tuple(images.shape)}")
    if columns < 1 or zoom < 1:
        raise ValueError(f"columns and zoom must be positive; got columns={columns}, zoom={zoom}")
    n = len(images)
    rows = -(-n // columns)
    # Digits sit on a black background, so only a separator that is not black shows the tiles;
    # 0.0 is mid-gray on the [-1, 1] scale.
    gray = 0.0
    tiles = F.pad(images.detach().cpu().float().clamp(-1, 1)[:, 0], (0, 1, 0, 1), value=gray)
    filler = torch.full((rows * columns - n, *tiles.shape[1:]), gray)
    tiles = torch.cat([tiles, filler])
    _, height, width = tiles.shape
    canvas = tiles.reshape(rows, columns, height, width).permute(0, 2, 1, 3)
    canvas = canvas.reshape(rows * height, columns * width)
    canvas = canvas.repeat_interleave(zoom, dim=0).repeat_interleave(zoom, dim=1)
    return Image.fromarray(((canvas + 1) * 127.5).round().to(torch.uint8).numpy())
