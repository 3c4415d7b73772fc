"""Image similarity: PSNR and SSIM of quantized against full-precision samples.

Used by ``clq eval`` and ``bench/quality.py``. Both take batches ``[n, C, H, W]`` and compare
image i of ``a`` with image i of ``b``; the default ``data_range`` of 2 is the width of the
[-1, 1] pixel range the digits sampler (``clq_compile.digits``) returns. All arithmetic is in
float64, so the numbers do not depend on the dtype of the inputs.

- PSNR is computed over the whole set: one mean squared error over every pixel of every image,
  PSNR = 10 · log10(data_range² / MSE). This is the PSNR of the mean MSE, not the mean of
  per-image PSNRs, so one badly broken image cannot be hidden by an infinite PSNR elsewhere.
  Identical sets (MSE = 0) and anything closer than ``cap`` dB report ``cap``, so the result is
  always a finite number that JSON can hold.
- SSIM (Wang, Bovik, Sheikh and Simoncelli, 2004) with a Gaussian window, K1 = 0.01,
  K2 = 0.03, no padding (only windows that lie fully inside the image count), averaged over
  window positions, channels and images. The window is 7 x 7 with σ = 1.5 by default rather
  than the paper's 11 x 11: on a 16 x 16 digit an 11-wide window leaves a 6 x 6 map whose
  windows all overlap the image centre, a 7-wide one leaves 10 x 10 and still covers a stroke.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
K1, K2 = 0.01, 0.03
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"the two image sets must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"images must have shape [n, C, H, W]; got {tuple(a.shape)}")
    if a.numel() == 0:
        raise ValueError("cannot compare empty image sets")
    return a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive; got {value!r}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, cap: float = PSNR_CAP_DB) -> float:
    """PSNR in dB of the set ``a`` against the set ``b``, both [n, C, H, W], pooled over the set.

    Returns min(10 · log10(data_range² / MSE), cap), and ``cap`` when MSE is 0. NaN in either
    set gives NaN.
    """
    a, b = _pair(a, b)
    _positive("data_range", data_range)
    mse = float((a - b).square().mean())
    if math.isnan(mse):
        return math.nan
    if mse == 0.0:
        return float(cap)
    return min(10.0 * math.log10(data_range**2 / mse), float(cap))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """float64 [size, size] separable Gaussian weights summing to 1, centred on the middle pixel."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the SSIM window size must be a positive odd number; got {size}")
    _positive("sigma", sigma)
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-offsets.square() / (2 * sigma**2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Local SSIM of every fully covered window: float64 [n, C, H - window + 1, W - window + 1].

    SSIM = (2·μa·μb + C1)(2·σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2)) with C1 = (K1·L)²,
    C2 = (K2·L)², L = data_range, and the means and (biased) variances taken under the window.
    """
    a, b = _pair(a, b)
    _positive("data_range", data_range)
    height, width = a.shape[-2:]
    if window > min(height, width):
        raise ValueError(f"the SSIM window ({window}) is larger than the images ({height} x {width}); "
                         f"pass a smaller odd window")
    channels = a.shape[1]
    kernel = gaussian_window(window, sigma).expand(channels, 1, window, window)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a.square()
    var_b = local_mean(b * b) - mu_b.square()
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> float:
    """Mean SSIM of ``a`` against ``b`` (both [n, C, H, W]) over windows, channels and images.

    1 for identical sets; symmetric in ``a`` and ``b``; at most 1.
    """
    return float(ssim_map(a, b, data_range, window, sigma).mean())
