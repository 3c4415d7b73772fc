"""Stress transforms: trained-like weights and function-preserving outliers."""

import pytest
import torch

from clq_compile import stress, tiny_models
from tests.helpers import rel_error


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_injected_outliers_preserve_the_function_and_are_large(family):
    model = tiny_models.build(family, heads=4, head_dim=16)
    stress.trained_like_weights(model)
    inputs = tiny_models.make_inputs(family)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(i[0].abs().amax().item()))
             for name, m in model.named_modules() if name.endswith("to_out.0")]
    with torch.no_grad():
        before = model(**inputs).sample
        peak_before = max(seen)
        seen.clear()
        changed = stress.inject_outliers(model, scale=50.0)
        after = model(**inputs).sample
        peak_after = max(seen)
    for h in hooks:
        h.remove()
    assert changed >= 1
    assert rel_error(after, before) < 1e-5
    assert peak_after > 10 * peak_before


def test_trained_like_weights_are_heavy_tailed_with_the_right_scale():
    layer = torch.nn.Linear(512, 256)
    stress.trained_like_weights(layer, seed=3)
    w = layer.weight.detach().double().flatten()
    assert abs(float(w.std()) * 512**0.5 - 1) < 0.05
    kurtosis = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
    assert kurtosis > 4  # a normal has 3, Student-t(6) has 6; uniform init has 1.8
    again = torch.nn.Linear(512, 256)
    stress.trained_like_weights(again, seed=3)
    assert torch.equal(again.weight, layer.weight)


def test_sampling_loop_is_deterministic_and_moves_the_latents():
    model = tiny_models.build("dit")
    inputs = tiny_models.make_inputs("dit")
    with torch.no_grad():
        a, b = stress.sample(model, inputs, steps=3), stress.sample(model, inputs, steps=3)
    assert torch.equal(a, b) and not torch.allclose(a, inputs["hidden_states"])


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_stress_models_of_more_blocks_keep_the_first_blocks(family):
    """blocks=4 builds four transformer blocks (Flux: two double-stream, two single-stream)."""
    two, four = stress.stress_model(family, seed=3, blocks=2), stress.stress_model(family, seed=3, blocks=4)
    for model, n in ((two, 2), (four, 4)):
        assert sum(len(getattr(model, name, ())) for name in ("transformer_blocks", "single_transformer_blocks")) == n
    assert sum(p.numel() for p in four.parameters()) > sum(p.numel() for p in two.parameters())
    with pytest.raises(ValueError, match="blocks must be an integer of at least 2"):
        tiny_models.build(family, blocks=1)
    if family == "flux":
        with pytest.raises(ValueError, match="even for flux"):
            tiny_models.build(family, blocks=3)
