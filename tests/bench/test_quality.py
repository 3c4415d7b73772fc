"""Tests for bench/metrics.py and bench/quality.py (the quality benchmark)."""

import json
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel

from clq_compile import tiny_models

from tests.bench.bench_scripts import import_bench

ROW_KEYS = {"model", "recipe", "bits", "psnr", "ssim", "accuracy", "quantize_seconds"}


@pytest.fixture(scope="module")
def bench_modules():
    return import_bench("metrics", "quality")


@pytest.fixture(scope="module")
def metrics(bench_modules):
    return bench_modules[0]


@pytest.fixture(scope="module")
def quality(bench_modules):
    return bench_modules[1]


def images(seed: int, n: int = 3, channels: int = 1, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=g) * 2 - 1


def tiny_digits_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()


# ---------------------------------------------------------------------------------------------
# metrics


def test_psnr_of_identical_images_is_the_cap(metrics):
    a = images(0)
    assert metrics.psnr(a, a.clone()) == metrics.PSNR_CAP_DB
    assert metrics.psnr(a, a, cap=60.0) == 60.0


def test_psnr_matches_the_formula(metrics):
    a = images(1)
    # ±0.25 everywhere: MSE is exactly 1/16 in binary floating point.
    signs = torch.where(torch.rand(a.shape, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    assert metrics.psnr(a + 0.25 * signs, a) == 10 * math.log10(2.0**2 / 0.0625)
    assert metrics.psnr(a + 0.25 * signs, a, data_range=1.0) == 10 * math.log10(1.0 / 0.0625)
    noisy = a + 0.03 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    mse = float((noisy.double() - a.double()).square().mean())
    assert metrics.psnr(noisy, a) == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-12)


def test_psnr_pools_the_whole_set(metrics):
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[1] += 0.5  # one image off by 0.5, the other exact: MSE over the set is 0.125
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(4.0 / 0.125), abs=1e-12)


def test_psnr_rejects_mismatched_shapes(metrics):
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(images(0, n=2), images(0, n=3))


def test_ssim_of_identical_images_is_one(metrics):
    a = images(4, channels=2)
    assert metrics.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_ranks_a_negative_below_a_slightly_noisy_copy(metrics):
    a = images(5)
    noisy = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(6))
    near, negative = metrics.ssim(noisy, a), metrics.ssim(-a, a)
    assert negative < near < 1.0
    assert near > 0.9


def test_ssim_is_symmetric(metrics):
    a, b = images(7), images(8)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term(metrics):
    # Without variance the structure terms are C2 / C2 and only the luminance term is left.
    a, b = torch.full((1, 1, 9, 9), 0.5), torch.full((1, 1, 9, 9), -0.2)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * -0.2 + c1) / (0.5**2 + 0.2**2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-7)


def test_ssim_of_one_window_matches_weighted_statistics(metrics):
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


def test_ssim_window_must_fit(metrics):
    with pytest.raises(ValueError, match="larger than the images"):
        metrics.ssim(images(0, side=5), images(1, side=5))
    assert metrics.ssim(images(0, side=5), images(0, side=5), window=5) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# quality: pieces


def test_interleaved_calibration_calls_span_the_trajectory(quality):
    steps, batch = 5, 4
    ids = torch.zeros(3, 3)
    calls = [{"hidden_states": torch.tensor([[10.0 * s + i] for i in range(batch)]),
              "timestep": torch.full((batch,), s), "img_ids": ids,
              "added": {"resolution": None, "scale": torch.full((batch,), float(s))}}
             for s in range(steps)]
    mixed = quality.interleave_timesteps(calls, batch)
    assert len(mixed) == steps
    seen = set()
    for call in mixed:
        step_of_row = call["timestep"].tolist()
        assert len(set(step_of_row)) == batch  # every row at a different step
        for i, s in enumerate(step_of_row):
            assert call["hidden_states"][i].item() == 10.0 * s + i  # row i of the step it claims
            assert call["added"]["scale"][i].item() == s
            seen.add((i, s))
        assert call["img_ids"] is ids and call["added"]["resolution"] is None
    assert seen == {(i, s) for i in range(batch) for s in range(steps)}


def test_evenly_spaced_keeps_the_ends(quality):
    assert quality.evenly_spaced(3, 25) == [0, 12, 24]
    assert quality.evenly_spaced(30, 4) == [0, 1, 2, 3]
    assert quality.evenly_spaced(1, 4) == [0]


def test_outlier_copy_keeps_the_full_precision_output(quality):
    model = tiny_digits_dit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    variant = quality.outlier_variant(model, 50.0)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"timestep": torch.tensor([999, 500, 20, 0]), "class_labels": torch.tensor([0, 3, 7, 9])}
    with torch.no_grad():
        torch.testing.assert_close(variant(x, **kwargs).sample, model(x, **kwargs).sample, atol=1e-5, rtol=1e-5)
    value = variant.transformer_blocks[0].attn1.to_v.weight
    assert value.abs().max() > 10 * original["transformer_blocks.0.attn1.to_v.weight"].abs().max()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[key]), f"{key} of the original model changed"


def test_random_inputs_run_every_family(quality):
    for family in tiny_models.FAMILIES:
        model = tiny_models.build(family)
        inputs = quality.random_inputs(model, batch=2, latent_size=8, seed=0)
        with torch.no_grad():
            out = model(**inputs).sample
        assert out.shape[0] == 2, family


def test_missing_model_folder_is_a_clear_error(quality, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_is_a_clear_error(quality, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--recipes", "rtn,nonsense"])
    assert "unknown 'nonsense'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# quality: end to end on tiny models


def test_tiny_digits_run_writes_the_documented_outputs(quality, tmp_path):
    folder = tmp_path / "tiny-dit"
    tiny_digits_dit().save_pretrained(folder)
    out = tmp_path / "results"
    status = quality.main(["--model", str(folder), "--recipes", "rtn", "--bits", "w4a4",
                           "--samples-per-class", "1", "--steps", "2", "--calib-samples", "2",
                           "--out", str(out)])
    assert status == 0
    rows = json.loads((out / "quality.json").read_text())
    assert isinstance(rows, list)
    assert [(r["model"], r["recipe"], r["bits"]) for r in rows] == [
        ("tiny-dit", "fp", "fp32"), ("tiny-dit", "rtn", "w4a4"),
        ("tiny-dit+outliers", "fp", "fp32"), ("tiny-dit+outliers", "rtn", "w4a4")]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert 0.0 <= row["accuracy"] <= 1.0
    fp, rtn = rows[0], rows[1]
    assert fp["psnr"] == quality.metrics.PSNR_CAP_DB and fp["ssim"] == 1.0 and fp["quantize_seconds"] is None
    assert rtn["psnr"] < fp["psnr"] and rtn["ssim"] < 1.0 and rtn["quantize_seconds"] >= 0
    run = json.loads((out / "quality-machine.json").read_text())
    assert {"machine", "command", "date", "calibration", "outlier_check"} <= set(run)
    assert run["outlier_check"][0]["ok"]
    assert run["calibration"]["recorded_calls"] == 2
    assert "| rtn |" in (out / "quality.md").read_text()
    for picture in ("quality-grid.png", "obs-activation.png"):
        assert (out / picture).stat().st_size > 0


def test_other_models_take_the_random_inputs_path(quality, tmp_path):
    folder = tmp_path / "tiny-pixart"
    tiny_models.build("pixart").save_pretrained(folder)
    out = tmp_path / "results"
    status = quality.main(["--model", str(folder), "--recipes", "rtn", "--bits", "w8a8",
                           "--samples-per-class", "2", "--steps", "2", "--calib-samples", "2",
                           "--outlier-scale", "0", "--out", str(out)])
    assert status == 0
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["recipe"], r["bits"]) for r in rows] == [("fp", "fp32"), ("rtn", "w8a8")]
    assert all(r["accuracy"] is None and r["model"] == "tiny-pixart" for r in rows)
    assert 0 < rows[1]["psnr"] < quality.metrics.PSNR_CAP_DB
