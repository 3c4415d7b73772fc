"""options["conditioning_bits"]: conditioning GEMMs and adaLN modulations quantized weight-only."""

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.artifact import ArtifactError
from clq_compile.calibration import model_state
from clq_compile.kernels.quantize import quantize
from clq_compile.options import parse_options
# `copy` and the `saved` it reads are fixtures.
from tests.clq_compile.test_artifact_hostile import (KEPT, copy, forge, forge_honest_layer,  # noqa: F401
                                                     fresh_model, run, saved)

CONDITIONING_ROLES = ("conditioning", "adaln", "adaln_token")


def calibrated(family: str, **options):
    torch._dynamo.reset()
    qt = torch.compile(tiny_models.build(family), backend="clq",
                       options={"bits": "w4a4", "kernels": "reference", **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        qt(**tiny_models.make_inputs(family, seed=100))
    return qt


@pytest.mark.parametrize("options,message", [
    ({"conditioning_bits": "w4a4"}, r"conditioning_bits.*must be one of"),
    ({"conditioning_bits": 8}, r"conditioning_bits.*must be one of"),
    ({"bits": "w16a16", "conditioning_bits": "w8a16"}, r"quantizes nothing"),
    ({"conditioning_bits": "w8a16", "weight_symmetric": False, "bits": "fp8"}, r"weight_symmetric"),
])
def test_bad_conditioning_bits_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


@pytest.fixture(scope="module")
def pixart_runs():
    """(decisions, layers) of a plain W4A4 run (taken before the next compile resets Dynamo), and
    the model compiled with conditioning_bits="w8a16"."""
    plain = model_state(calibrated("pixart", recipe="clq"))
    before = (plain.site_decisions(), dict(plain.layers))
    return before, calibrated("pixart", recipe="clq", conditioning_bits="w8a16")


def test_conditioning_layers_are_quantized_weight_only_and_say_so(pixart_runs):
    (before, plain_layers), weight_only = pixart_runs
    state = model_state(weight_only)
    after = state.site_decisions()
    conditioning = [p for p, d in after.items() if d["role"] in CONDITIONING_ROLES]
    assert conditioning and all(not before[p]["quantize"] for p in conditioning)
    for path in conditioning:
        assert after[path]["quantize"] and "weight-only w8a16 (conditioning_bits)" in after[path]["reason"]
        layer = state.layers[path]
        assert (layer.weight.format.name, layer.a_format.name) == ("int8", "none")
        weight = weight_only_model_weight(weight_only, path)
        assert torch.equal(layer.weight.qweight.to(torch.int16), quantize(weight, 8, True, None).q)
    # Embeddings and the final projection stay in 16 bit; the token GEMMs are the recipe's as before.
    for path, d in after.items():
        if d["role"] in ("embed", "final"):
            assert not d["quantize"]
        elif d["role"] not in CONDITIONING_ROLES:
            a, b = plain_layers[path], state.layers[path]
            assert torch.equal(a.weight.qweight, b.weight.qweight) and torch.equal(a.weight.scale, b.weight.scale)
    assert "w8a16" in clq_compile.explain(weight_only)


def weight_only_model_weight(qt, path):
    return qt._orig_mod.get_submodule(path).weight.detach().float()


def test_an_artifact_with_conditioning_bits_round_trips(pixart_runs, tmp_path):
    _, weight_only = pixart_runs
    inputs = tiny_models.make_inputs("pixart", seed=3)
    with torch.no_grad():
        expected = weight_only(**inputs).sample
    path = clq_compile.save(weight_only, tmp_path / "pixart.safetensors")
    torch._dynamo.reset()
    loaded = clq_compile.load(tiny_models.build("pixart"), path, options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    assert "w8a16" in clq_compile.explain(loaded)


def test_an_artifact_cannot_give_a_conditioning_layer_another_format(copy):  # noqa: F811
    """conditioning_bits set, and a conditioning layer forged in as a W4A4 token GEMM (its decision
    says attn_q, so the manifest's own checks expect W4A4): the model's graph knows its role."""
    model = fresh_model()
    forge_honest_layer(copy, model, KEPT)
    forge(copy, lambda m: m["options"].update(conditioning_bits="w8a16"))
    with pytest.raises((ArtifactError, torch._dynamo.exc.BackendCompilerFailed), match="int4/int4.*int8/none"):
        run(clq_compile.load(model, copy, release_weights=False))
