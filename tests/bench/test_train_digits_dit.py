"""Tests for bench/train_digits_dit.py and the model it shipped."""

import re

import pytest
import torch
from diffusers import DiTTransformer2DModel

from clq_compile import digits

from tests.bench.bench_scripts import BENCH, import_bench

MODEL = BENCH / "assets" / "digits-dit"


@pytest.fixture(scope="module")
def trainer():
    (module,) = import_bench("train_digits_dit")
    return module


def test_training_loss_decreases_on_a_tiny_model(trainer):
    config = trainer.digits_dit_config(num_attention_heads=2, attention_head_dim=8, num_layers=1)
    run = trainer.train(config, steps=60, batch_size=32, seed=0, progress=False)
    assert len(run.losses) == 60
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert not run.model.training


def test_training_is_deterministic_given_the_seed(trainer):
    config = trainer.digits_dit_config(num_attention_heads=2, attention_head_dim=8, num_layers=1)
    runs = [trainer.train(config, steps=3, batch_size=8, seed=5, progress=False) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    other = trainer.train(config, steps=3, batch_size=8, seed=6, progress=False)
    assert other.losses != runs[0].losses


def test_init_draws_token_weights_bell_shaped_and_zeroes_adaln_zero(trainer):
    model = DiTTransformer2DModel(**trainer.digits_dit_config())
    trainer.init_weights(model)
    for zeroed in [model.transformer_blocks[2].norm1.linear, model.proj_out_1, model.proj_out_2]:
        assert not zeroed.weight.any() and not zeroed.bias.any()
    assert not model.transformer_blocks[0].attn1.to_q.bias.any()
    weight = model.transformer_blocks[0].ff.net[0].proj.weight
    std = weight.std().item()
    assert std == pytest.approx(96**-0.5, rel=0.05)
    # A uniform draw has kurtosis 1.8 and no values beyond sqrt(3) std; a normal has 3.
    kurtosis = ((weight / std) ** 4).mean().item()
    assert 2.5 < kurtosis < 3.2
    assert (weight.abs() > 2 * std).float().mean().item() > 0.03


def test_shipped_model_draws_the_requested_digits():
    if not (MODEL / "diffusion_pytorch_model.safetensors").exists():
        raise FileNotFoundError(f"the trained digits model is missing from {MODEL}")
    model = DiTTransformer2DModel.from_pretrained(MODEL).eval()
    requested = torch.arange(10).repeat_interleave(5)
    noise = torch.randn((len(requested), 1, 16, 16), generator=torch.Generator().manual_seed(1))
    images = digits.sample(model, requested, noise)
    assert images.shape == (50, 1, 16, 16)
    assert images.min().item() >= -1.0 and images.max().item() <= 1.0
    accuracy = (digits.classify(digits.fit_digit_classifier(seed=0), images) == requested).float().mean().item()
    assert accuracy >= 0.8


def test_the_sampling_snippet_of_the_assets_readme_runs(monkeypatch):
    text = (BENCH / "assets" / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(snippets) == 1
    monkeypatch.chdir(BENCH.parent)  # the snippet's paths are relative to the repository root
    namespace: dict = {}
    exec(compile(snippets[0], "bench/assets/README.md", "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (10, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
