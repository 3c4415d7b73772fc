"""Tests for clq_compile/metrics.py: PSNR and SSIM."""

import math

import pytest
import torch

from clq_compile import metrics


def images(seed: int, n: int = 3, channels: int = 1, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=g) * 2 - 1


def test_psnr_of_identical_images_is_the_cap():
    a = images(0)
    assert metrics.psnr(a, a.clone()) == metrics.PSNR_CAP_DB
    assert metrics.psnr(a, a, cap=60.0) == 60.0


def test_psnr_matches_the_formula():
    a = images(1)
    # ±0.25 everywhere: MSE is exactly 1/16 in binary floating point.
    signs = torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    assert metrics.psnr(a + 0.25 * signs, a) == 10 * math.log10(2.0**2 / 0.0625)
    assert metrics.psnr(a + 0.25 * signs, a, data_range=1.0) == 10 * math.log10(1.0 / 0.0625)
    noisy = a + 0.03 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    mse = float((noisy.double() - a.double()).square().mean())
    assert metrics.psnr(noisy, a) == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-12)


def test_psnr_pools_the_whole_set():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[1] += 0.5  # one image off by 0.5, the other exact: MSE over the set is 0.125
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(4.0 / 0.125), abs=1e-12)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(images(0, n=2), images(0, n=3))


def test_ssim_of_identical_images_is_one():
    a = images(4, channels=2)
    assert metrics.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_ranks_a_negative_below_a_slightly_noisy_copy():
    a = images(5)
    noisy = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(6))
    near, negative = metrics.ssim(noisy, a), metrics.ssim(-a, a)
    assert negative < near < 1.0
    assert near > 0.9


def test_ssim_is_symmetric():
    a, b = images(7), images(8)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Without variance the structure terms are C2 / C2 and only the luminance term is left.
    a, b = torch.full((1, 1, 9, 9), 0.5), torch.full((1, 1, 9, 9), -0.2)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * -0.2 + c1) / (0.5**2 + 0.2**2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-7)


def test_ssim_of_one_window_matches_weighted_statistics():
    # An image exactly one window wide has a single SSIM value: the formula on Gaussian-weighted
    # means, variances and covariance computed directly.
    a, b = images(9, n=1, side=7).double(), images(10, n=1, side=7).double()
    w = metrics.gaussian_window(7, 1.5)
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
    cov = (w * (a - mu_a) * (b - mu_b)).sum()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    assert metrics.ssim(a, b, window=7) == pytest.approx(float(expected), abs=1e-12)


def test_ssim_window_must_fit():
    with pytest.raises(ValueError, match="larger than the images"):
        metrics.ssim(images(0, side=5), images(1, side=5))
    assert metrics.ssim(images(0, side=5), images(0, side=5), window=5) == pytest.approx(1.0)
