"""Tests for bench/quality.py (the quality benchmark)."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from clq_compile import metrics, tiny_models

from tests.bench.bench_scripts import import_bench

ROW_KEYS = {"model", "recipe", "bits", "psnr", "ssim", "accuracy", "quantize_seconds"}


@pytest.fixture(scope="module")
def quality():
    (module,) = import_bench("quality")
    return module


def tiny_digits_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()


# ---------------------------------------------------------------------------------------------
# pieces


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


@pytest.mark.parametrize("options,message", [
    ('{"ars_threshold": 2}', "recipe rtn at w4a4: options['ars_threshold'] is for recipes lrq-dit, lrq-dit+lowrank"),
    ('{"bits": "w8a8"}', "'bits' has its own flag, --bits"),
    ("[1]", "must be a JSON object"),
])
def test_bad_options_stop_before_any_cell(quality, tmp_path, capsys, options, message):
    """A typo in --options is refused once, before the model is loaded, not by every cell in turn."""
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--recipes", "rtn", "--bits", "w4a4", "--options", options, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cells_the_backend_refuses_are_reported_not_run(quality, tmp_path):
    """lrq-dit at fp8 cannot run (twin-log weights need integer activations): its cell says n/a
    and why, in the journal, the JSON and the report, while the other cells run."""
    folder = tmp_path / "tiny-dit"
    tiny_digits_dit().save_pretrained(folder)
    out = tmp_path / "results"
    assert quality.main(["--model", str(folder), "--recipes", "rtn,lrq-dit", "--bits", "fp8", "--outlier-scale", "0",
                         "--samples-per-class", "1", "--steps", "2", "--calib-samples", "2", "--out", str(out)]) == 0
    rows = {r["recipe"]: r for r in json.loads((out / "quality.json").read_text())}
    assert rows["rtn"]["psnr"] is not None and "not_applicable" not in rows["rtn"]
    assert rows["lrq-dit"]["psnr"] is None and "integer activations" in rows["lrq-dit"]["not_applicable"]
    assert quality.quality_cell(rows["lrq-dit"]) == "n/a"
    assert "n/a: lrq-dit at fp8" in (out / "quality.md").read_text()
    assert len((out / "quality.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------
# end to end on tiny models


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
    assert fp["psnr"] == metrics.PSNR_CAP_DB and fp["ssim"] == 1.0 and fp["quantize_seconds"] is None
    assert rtn["psnr"] < fp["psnr"] and rtn["ssim"] < 1.0 and rtn["quantize_seconds"] >= 0
    run = json.loads((out / "quality-machine.json").read_text())
    assert {"machine", "command", "date", "calibration", "outlier_check"} <= set(run)
    assert run["outlier_check"][0]["ok"]
    assert run["calibration"]["recorded_calls"] == 2
    assert "| rtn |" in (out / "quality.md").read_text()
    for picture in ("quality-grid.png", "obs-activation.png"):
        assert (out / picture).stat().st_size > 0
    journal = [json.loads(line) for line in (out / quality.JOURNAL).read_text().splitlines()]
    assert journal == rows  # every cell was appended as it finished


def test_results_are_never_overwritten(quality, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "quality.jsonl").write_text('{"model": "earlier run"}\n')
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--model", str(tmp_path / "nowhere"), "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"--out {out} already holds results (quality.jsonl); choose a new folder" in capsys.readouterr().err
    assert (out / "quality.jsonl").read_text() == '{"model": "earlier run"}\n'

