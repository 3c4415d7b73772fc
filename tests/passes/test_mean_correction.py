"""Mean correction (DAC's activation side): the corrected layers' output means equal full precision's."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clq_compile
from clq_compile import stress, tiny_models
from clq_compile.calibration import model_state
from clq_compile.options import parse_options
from clq_compile.passes.mean_correction import correct_means, output_mean_deviations
from clq_compile.passes.observers import GraphCalibration
from clq_compile.passes.policy import decide
from clq_compile.passes.weight_quantization import rtn
from tests.helpers import dynamo_graph


def calibrated(**options):
    torch._dynamo.reset()
    model = stress.stress_model("pixart", seed=0, heads=4, head_dim=16)
    qt = torch.compile(model, backend="clq", options={"kernels": "reference", **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(2):
            qt(**tiny_models.make_inputs("pixart", seed=100 + seed))
    return model, qt


@pytest.mark.parametrize("options", [{"bits": "w3a16", "recipe": "rtn"}, {"bits": "w4a4", "recipe": "clq"},
                                     {"bits": "w4a4", "recipe": "clq", "fold": True}])
def test_the_option_moves_every_layers_bias_and_runs_compiled(options):
    """Through the backend: each quantized layer carries its own corrected bias and says so, the
    same layers as without the option otherwise, and the compiled model runs on them."""
    model, qt = calibrated(**options, mean_correction=True)
    corrected = model_state(qt).layers
    _, plain = calibrated(**options)
    layers = model_state(plain).layers
    assert set(corrected) == set(layers)
    for path, layer in corrected.items():
        assert layer.bias is not None and layer.notes[-1].startswith("mean correction: bias moved"), path
        assert torch.equal(layer.weight.qweight, layers[path].weight.qweight), path
        graph_bias = model.get_submodule(path).bias if layers[path].bias is None else layers[path].bias
        assert graph_bias is None or not torch.equal(layer.bias, graph_bias), path
    with torch.no_grad():
        out = qt(**tiny_models.make_inputs("pixart", seed=5)).sample
    assert bool(torch.isfinite(out).all())


def test_the_deviation_after_correction_is_zero_against_float64():
    """output_mean_deviations of the corrected layers is ~0; of the uncorrected ones it is Δ."""
    model = stress.stress_model("pixart", seed=1, heads=4, head_dim=16)
    gm, example, analysis = dynamo_graph(model, tiny_models.make_inputs("pixart"))
    state = {p.index: example[p.index] for p in analysis.placeholders if p.kind != "input"}
    calls = []
    for seed in range(3):
        inputs = tiny_models.make_inputs("pixart", seed=seed)
        calls.append([inputs[name] for name in ("hidden_states", "timestep", "encoder_hidden_states")])
    cal = GraphCalibration(gm, analysis, state, calls)
    options = parse_options({"bits": "w4a16", "recipe": "rtn"})
    quantizer = options.method_configs().quantizer
    layers = {s.path: rtn(state[s.weight_index], quantizer) for s in analysis.sites
              if decide(s, options.policy()).quantize}
    before, _ = output_mean_deviations([cal], layers, "reference")
    corrected = correct_means([cal], layers, "reference")
    after, _ = output_mean_deviations([cal], corrected, "reference")
    assert set(before) == set(after) == set(layers)
    for path, delta in before.items():
        scale = float(delta.abs().max())
        assert scale > 0
        assert float(after[path].abs().max()) <= 1e-4 * scale + 1e-6, path


@settings(deadline=None, max_examples=20)
@given(st.integers(2, 12), st.sampled_from([8, 16, 24]), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_a_weight_only_deviation_is_the_input_mean_times_the_weight_error(n, k, tokens, seed):
    """For weight-only layers Δ = μ_x · (W − Ŵ)ᵀ, against float64 (a layer alone, through observe)."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    x = torch.randn(tokens, k, generator=g) + 2

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear

        def forward(self, hidden_states):
            return self.proj(hidden_states)

    gm, example, analysis = dynamo_graph(One(), {"hidden_states": x})
    state = {p.index: example[p.index] for p in analysis.placeholders if p.kind != "input"}
    cal = GraphCalibration(gm, analysis, state, [[x]])
    layer = rtn(linear.weight, parse_options({"bits": "w3a16", "recipe": "rtn"}).method_configs().quantizer)
    deviations, _ = output_mean_deviations([cal], {"proj": layer}, "reference")
    dequantized = layer.forward(torch.eye(k), None, "reference").double().t()  # Ŵ [n, k]
    want = x.double().mean(0) @ (linear.weight.double() - dequantized).t()
    assert torch.allclose(deviations["proj"], want, rtol=1e-4, atol=1e-5)


def test_mean_correction_without_calibration_says_it_was_skipped():
    torch._dynamo.reset()
    qt = torch.compile(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), backend="clq",
                       options={"bits": "w4a16", "recipe": "rtn", "kernels": "reference", "mean_correction": True})
    with pytest.warns(UserWarning, match="without calibration data"), torch.no_grad():
        qt(**tiny_models.make_inputs("pixart", seed=1))
    assert all("mean correction skipped: no calibration data" in layer.notes
               for layer in model_state(qt).layers.values())
    with pytest.raises(ValueError, match=r"options\['mean_correction'\] must be True or False"):
        parse_options({"mean_correction": 1})
