"""Recipe lrq-dit end to end: compiled, explained, saved with twin-log weights, loaded, refused when forged."""

import json

import pytest
import torch

import clq_compile
from clq_compile import stress, tiny_models
from clq_compile import artifact
from clq_compile.artifact import ArtifactError
from clq_compile.calibration import model_state
from clq_compile.options import parse_options
from tests.clq_compile.test_artifact_hostile import forge, manifest_text, tensors_of
from tests.clq_compile.test_lowrank_recipes import calibrated as calibrated_pixart, layers_by_hand


def calibrated(**options):
    return calibrated_pixart(options.pop("recipe", "lrq-dit"), **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, qt = calibrated()
    path = clq_compile.save(qt, tmp_path_factory.mktemp("lrq") / "pixart.safetensors")
    inputs = tiny_models.make_inputs("pixart", seed=5)
    with torch.no_grad():
        out = qt(**inputs).sample
    return model, qt, path, out


def test_the_compiled_model_is_its_records_with_twin_log_weights(saved):
    model, qt, _, out = saved
    state = model_state(qt)
    assert {layer.weight.format.name for layer in state.layers.values()} == {"tlq4"}
    assert torch.equal(out, layers_by_hand(model, state, tiny_models.make_inputs("pixart", seed=5)))
    text = clq_compile.explain(qt)
    assert "w4a4 (tlq4 weights)" in text and "ars: " in text


def test_the_threshold_sends_layers_to_the_outlier_aware_rotation():
    _, qt = calibrated(ars_threshold=1e-6)
    choices = {layer.details["ars"] for layer in model_state(qt).layers.values()}
    assert choices == {"outlier-aware"}
    assert "ars: outlier-aware rotation" in clq_compile.explain(qt)


def test_an_artifact_with_twin_log_weights_round_trips(saved):
    _, _, path, out = saved
    manifest = json.loads(manifest_text(path))
    assert manifest["format_version"] == artifact.FORMAT_VERSION and {m["w_format"] for m in manifest["layers"].values()} == {"tlq4"}
    torch._dynamo.reset()
    loaded = clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path,
                              options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_models.make_inputs("pixart", seed=5)).sample, out)


def _as_rtn(m):
    m["options"]["recipe"] = m["recipe"] = "rtn"
    del m["options"]["ars_threshold"], m["options"]["lrq_weights"]


def _as_version_4(m):
    m["format_version"] = 4


def _grouped(m):
    m["options"]["weight_group"] = 32
    for layer in m["layers"].values():
        layer["w_group"] = 32


@pytest.mark.parametrize("edit,match", [
    (_as_rtn, r"'tlq4', which only recipes lrq-dit and lrq-dit\+lowrank write"),
    (_as_version_4, r"from format version 5 \(this is version 4"),
    (_grouped, r"lrq-dit.*drop 'weight_group'"),
])
def test_forged_twin_log_layers_are_refused(saved, tmp_path, edit, match):
    _, _, path, _ = saved
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    forge(target, edit, tensors_of(target))
    with pytest.raises(ArtifactError, match=match):
        clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), target)


@pytest.mark.parametrize("options,match", [
    ({"recipe": "clq", "ars_threshold": 2.0}, r"ars_threshold.*recipe 'clq' does not read it"),
    ({"recipe": "lrq-dit", "ars_threshold": 0}, r"ars_threshold.*positive finite"),
    ({"recipe": "lrq-dit", "ars_threshold": True}, r"ars_threshold.*positive finite"),
    ({"recipe": "lrq-dit", "weight_group": 64}, r"drop 'weight_group'"),
    ({"recipe": "lrq-dit", "weight_symmetric": False}, r"drop 'weight_group' and 'weight_symmetric'"),
    ({"recipe": "lrq-dit", "bits": "fp8"}, r"integer activations"),
])
def test_bad_lrq_dit_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_only_lrq_dit_artifacts_record_the_threshold():
    assert "ars_threshold" not in parse_options({"recipe": "clq"}).quantization_dict()
    assert parse_options({"recipe": "lrq-dit", "ars_threshold": 2}).quantization_dict()["ars_threshold"] == 2.0


def test_uniform_weights_are_the_ablation_the_notes_name():
    _, qt = calibrated(lrq_weights="uniform")
    layers = model_state(qt).layers.values()
    assert {layer.weight.format.name for layer in layers} == {"int4"}
    assert all("weights: uniform grid (option lrq_weights)" in layer.notes for layer in layers)
    with pytest.raises(ValueError, match="lrq_weights.*recipe 'clq' does not read it"):
        parse_options({"recipe": "clq", "lrq_weights": "uniform"})
    with pytest.raises(ValueError, match="lrq_weights.*'twin-log', 'uniform'"):
        parse_options({"recipe": "lrq-dit", "lrq_weights": "log"})


@pytest.mark.parametrize("bits,threshold", [("w4a4", 1.0), ("w4a8", 1e-6), ("w3a16", 1.0)])
def test_the_compiled_kernels_compute_what_the_reference_does(bits, threshold, monkeypatch):
    """The whole model through the Triton paths (interpreted on CPU): twin-log weights decoded by
    the weight-only GEMM, activations quantized by the quantize kernel with the online multiplier
    and the (Hadamard or outlier-aware) rotation. Every layer call is checked against the reference
    op on the same input: float32 model, so only float32 rounding differs. (Compared at the model
    output instead, a rounding difference in one layer can move a later layer's activation across
    a rounding boundary of its grid, one code step, which is not a kernel error.)"""
    pytest.importorskip("triton")
    from clq_compile.kernels import reference, triton_linear, triton_quantize

    if not triton_quantize.interpreted():
        pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
    compiled = triton_linear.quant_linear_triton
    errors = []

    def checked(x, *args):
        out = compiled(x, *args)
        ref = reference.quant_linear_reference(x, *args).double()
        errors.append(float((out.double() - ref).norm() / ref.norm()))
        return out

    monkeypatch.setattr(triton_linear, "quant_linear_triton", checked)
    _, qt = calibrated(bits=bits, kernels="triton", ars_threshold=threshold, inductor="never")
    errors.clear()
    with torch.no_grad():
        qt(**tiny_models.make_inputs("pixart", seed=5))
    assert len(errors) == len(model_state(qt).layers)
    assert max(errors) < 1e-5
