"""Tests for clq_compile/workloads.py: sampling tasks, calibration calls and model loading."""

import json

import pytest
import torch

from clq_compile import tiny_models, workloads


def test_interleaved_calibration_calls_span_the_trajectory():
    steps, batch = 5, 4
    ids = torch.zeros(3, 3)
    calls = [{"hidden_states": torch.tensor([[10.0 * s + i] for i in range(batch)]),
              "timestep": torch.full((batch,), s), "img_ids": ids,
              "added": {"resolution": None, "scale": torch.full((batch,), float(s))}}
             for s in range(steps)]
    mixed = workloads.interleave_timesteps(calls, batch)
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


def test_evenly_spaced_keeps_the_ends():
    assert workloads.evenly_spaced(3, 25) == [0, 12, 24]
    assert workloads.evenly_spaced(30, 4) == [0, 1, 2, 3]
    assert workloads.evenly_spaced(1, 4) == [0]


def test_random_inputs_run_every_family():
    for family in tiny_models.FAMILIES:
        model = tiny_models.build(family)
        inputs = workloads.random_inputs(model, batch=2, latent_size=8, seed=0)
        with torch.no_grad():
            out = model(**inputs).sample
        assert out.shape[0] == 2, family


def test_calibration_calls_keep_evenly_spaced_steps_of_the_full_precision_trajectory():
    model = tiny_models.build("dit")
    task = workloads.random_inputs_task(model, samples=2, calib_samples=3, seed=0, latent_size=8)
    calls = workloads.calibration_calls(task, model, steps=6, calib_steps=3)
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (3, 4, 8, 8)
        assert len(set(call["timestep"].tolist())) == 3  # each row at a different step
    # every calibration sample appears once at each kept step: 0, 2 and 5 of the 6-step loop,
    # whose integer timesteps are 1000 · (1 - i / 6) truncated and capped at 999
    assert sorted(t for c in calls for t in c["timestep"].tolist()) == sorted([999, 666, 166] * 3)


def test_task_for_picks_the_digits_sampler_for_a_digits_shaped_dit():
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    digits_like = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10).eval()
    task = workloads.task_for(digits_like, samples=2, calib_samples=3, seed=0)
    assert task.evaluation["class_labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert task.calibration["class_labels"].tolist() == [0, 1, 2]
    other = workloads.task_for(tiny_models.build("pixart"), samples=2, calib_samples=3, seed=0)
    assert other.evaluation["hidden_states"].shape == (2, 4, 8, 8)
    assert other.judge(torch.zeros(2, 4, 8, 8)) is None


def test_load_model_takes_a_transformer_or_a_pipeline_folder(tmp_path):
    model = tiny_models.build("dit", seed=3)
    model.save_pretrained(tmp_path / "transformer-only")
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    for folder in (tmp_path / "transformer-only", pipeline):
        loaded = workloads.load_model(folder)
        assert type(loaded).__name__ == "DiTTransformer2DModel" and not loaded.training
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_load_model_errors_name_the_folder_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        workloads.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        workloads.load_model(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "NotAModel"}))
    with pytest.raises(ValueError, match="'NotAModel', which is not a diffusers model class"):
        workloads.load_model(tmp_path / "odd")
    (tmp_path / "no-transformer").mkdir()
    (tmp_path / "no-transformer" / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    with pytest.raises(ValueError, match="has no transformer"):
        workloads.load_model(tmp_path / "no-transformer")
