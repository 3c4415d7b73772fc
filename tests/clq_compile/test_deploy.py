"""save / load / release_weights end to end on tiny diffusers models."""

import pickle
import shutil

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import clq_compile
from clq_compile import artifact, deploy, tiny_models
from clq_compile.artifact import ArtifactError, read_manifest
from clq_compile.calibration import model_state


def calibrated(family, model, calls=3, **options):
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "kernels": "reference", **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(calls):
            qt(**tiny_models.make_inputs(family, seed=100 + seed))
    return qt


def run(model, family, seed=0, **kw):
    with torch.no_grad():
        return model(**tiny_models.make_inputs(family, seed=seed, **kw)).sample


@pytest.mark.parametrize("family,options,name", [
    ("pixart", {"recipe": "clq"}, "pixart.safetensors"),
    ("sd3", {"recipe": "rtn", "weight_symmetric": False, "weight_group": 32}, "sd3"),
    ("flux", {"recipe": "quarot", "bits": "w4a8"}, "flux.safetensors"),
])
def test_loaded_model_gives_identical_outputs_without_calibrating(tmp_path, family, options, name):
    qt = calibrated(family, tiny_models.build(family, seed=3), **options)
    expected = run(qt, family)
    path = clq_compile.save(qt, tmp_path / name)

    torch._dynamo.reset()
    fresh = tiny_models.build(family, seed=3)
    loaded = clq_compile.load(fresh, path)
    state = model_state(loaded)
    assert state.phase == "quantized" and state.calibrations == 0
    assert torch.equal(run(loaded, family), expected)
    assert "loaded from" in clq_compile.explain(loaded)


def test_saving_after_dynamo_dropped_the_graphs_keeps_every_decision(tmp_path):
    """torch._dynamo.reset() drops the captured graphs; the quantized layers stay, and so must the
    decisions the artifact records for them (a save once wrote none, and its own load refused it)."""
    qt = calibrated("pixart", tiny_models.build("pixart", seed=3), recipe="rtn")
    expected = run(qt, "pixart")
    decisions = model_state(qt).site_decisions()
    torch._dynamo.reset()
    path = clq_compile.save(qt, tmp_path / "after-reset.safetensors")
    assert read_manifest(path)["decisions"] == decisions
    loaded = clq_compile.load(tiny_models.build("pixart", seed=3), path)
    assert torch.equal(run(loaded, "pixart"), expected)


def test_save_never_writes_an_artifact_its_load_would_refuse(tmp_path, monkeypatch):
    qt = calibrated("pixart", tiny_models.build("pixart", seed=3), recipe="rtn")
    monkeypatch.setattr(type(model_state(qt)), "site_decisions", lambda self: {})
    with pytest.raises(RuntimeError, match="nothing was written .* would not load back"):
        clq_compile.save(qt, tmp_path / "broken.safetensors")
    assert not list(tmp_path.iterdir())


def test_same_inputs_give_a_byte_identical_artifact(tmp_path):
    blobs = []
    for i in range(2):
        qt = calibrated("dit", tiny_models.build("dit", seed=5))
        blobs.append(clq_compile.save(qt, tmp_path / f"{i}.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


@pytest.fixture(scope="module")
def dit_artifact(tmp_path_factory):
    qt = calibrated("dit", tiny_models.build("dit", seed=7), recipe="rtn")
    path = clq_compile.save(qt, tmp_path_factory.mktemp("art") / "dit.safetensors")
    return path, run(qt, "dit")


def test_loading_into_another_model_lists_what_differs(dit_artifact):
    path, _ = dit_artifact
    other = tiny_models.build("dit", seed=7)
    with torch.no_grad():
        other.transformer_blocks[1].attn1.to_k.weight[0, 0] += 1.0
    with pytest.raises(ArtifactError, match=r"values: transformer_blocks\.1\.attn1\.to_k\.weight"):
        clq_compile.load(other, path)
    wider = tiny_models.build("dit", seed=7, heads=3)
    with pytest.raises(ArtifactError, match=r"shape/dtype: .*to_q\.weight is float32\[48, 48\] here"):
        clq_compile.load(wider, path)
    with pytest.raises(ArtifactError, match="was made from a different model"):
        clq_compile.load(tiny_models.build("pixart", seed=7), path)
    # The same model cast to another dtype: named as a cast, not as another model.
    with pytest.raises(ArtifactError, match=r"quantized from a float32 model with these parameters' shapes, and "
                                            r"this model is bfloat16 .*run it in float32"):
        clq_compile.load(tiny_models.build("dit", seed=7).to(torch.bfloat16), path)


def test_compile_option_load_checks_the_captured_parameters(dit_artifact):
    path, expected = dit_artifact
    torch._dynamo.reset()
    model = tiny_models.build("dit", seed=7)
    qt = torch.compile(model, backend="clq", options={"load": str(path), "kernels": "reference"})
    assert torch.equal(run(qt, "dit"), expected)
    assert model_state(qt).calibrations == 0

    torch._dynamo.reset()
    other = tiny_models.build("dit", seed=8)
    qt = torch.compile(other, backend="clq", options={"load": str(path)})
    with pytest.raises(BackendCompilerFailed, match="values: "):
        run(qt, "dit")

    # A parameter no graph uses is still part of the model's fingerprint.
    torch._dynamo.reset()
    extended = tiny_models.build("dit", seed=7)
    extended.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    qt = torch.compile(extended, backend="clq", options={"load": str(path)})
    with pytest.raises(BackendCompilerFailed, match=r"extra: unused \(in this model"):
        run(qt, "dit")


def test_conflicting_options_are_refused_and_runtime_ones_accepted(dit_artifact):
    path, expected = dit_artifact
    with pytest.raises(ValueError, match=r"bits: 'w8a8' given, 'w4a4' in the artifact"):
        clq_compile.load(tiny_models.build("dit", seed=7), path, options={"bits": "w8a8"})
    with pytest.raises(ValueError, match="recipe"):
        clq_compile.load(tiny_models.build("dit", seed=7), path, options={"recipe": "clq"})
    # An option of another recipe is compared with the artifact's recipe ('rtn'), not the default.
    with pytest.raises(ValueError, match=r"avg_bits: 6 given, None in the artifact"):
        clq_compile.load(tiny_models.build("dit", seed=7), path, options={"avg_bits": 6})
    torch._dynamo.reset()
    qt = clq_compile.load(tiny_models.build("dit", seed=7), path, options={"kernels": "reference", "bits": "w4a4"})
    assert torch.equal(run(qt, "dit"), expected)


def test_loading_never_unpickles(dit_artifact, monkeypatch):
    path, expected = dit_artifact

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    torch._dynamo.reset()
    qt = clq_compile.load(tiny_models.build("dit", seed=7), path)
    assert torch.equal(run(qt, "dit"), expected)


def weight_storage_bytes(model):
    return sum(p.untyped_storage().nbytes() for name, p in model.named_parameters() if name.endswith("weight"))


def test_release_weights_frees_the_full_precision_copies(tmp_path):
    model = tiny_models.build("pixart", seed=2, heads=4, head_dim=32)
    qt = calibrated("pixart", model, recipe="rtn")
    expected = run(qt, "pixart")
    saved_before = clq_compile.save(qt, tmp_path / "before.safetensors").read_bytes()
    before = clq_compile.memory_report(qt)
    storage_before = weight_storage_bytes(model)
    assert before["resident_fp_bytes"] == before["fp_bytes"] and not before["released"]

    released = clq_compile.release_weights(qt)
    after = clq_compile.memory_report(qt)
    assert released == len(model_state(qt).layers) > 0
    assert after["released"] and after["resident_fp_bytes"] == released * 4
    # What the process holds: the quantized layers' float32 weights are gone.
    assert storage_before - weight_storage_bytes(model) == before["fp_bytes"] - released * 4
    assert torch.equal(run(qt, "pixart"), expected)
    assert torch.isnan(run(model, "pixart")).any(), "the original module must not silently compute"
    assert clq_compile.save(qt, tmp_path / "after.safetensors").read_bytes() == saved_before
    assert "released" in clq_compile.explain(qt)
    with pytest.raises(RuntimeError, match="cannot be calibrated again"):
        with clq_compile.calibrating(qt):
            pass


def test_load_releases_by_default_and_keeps_weights_when_asked(dit_artifact):
    path, expected = dit_artifact
    torch._dynamo.reset()
    kept = tiny_models.build("dit", seed=7)
    reference = run(kept, "dit")
    qt = clq_compile.load(kept, path, release_weights=False)
    assert torch.equal(run(kept, "dit"), reference)
    assert not clq_compile.memory_report(qt)["released"]

    torch._dynamo.reset()
    model = tiny_models.build("dit", seed=7)
    qt = clq_compile.load(model, path)
    # Until the first call checks the artifact's layers against the policy, their values are kept.
    assert clq_compile.memory_report(qt)["resident_fp_bytes"] >= clq_compile.memory_report(qt)["fp_bytes"]
    assert torch.equal(run(qt, "dit"), expected)
    report = clq_compile.memory_report(qt)
    assert report["released"] and report["resident_fp_bytes"] < report["quantized_bytes"] / 10


def test_loaded_model_refuses_calibration_and_explains_before_its_first_call(dit_artifact):
    path, _ = dit_artifact
    torch._dynamo.reset()
    qt = clq_compile.load(tiny_models.build("dit", seed=7), path)
    table = clq_compile.explain(qt)
    manifest = read_manifest(path)
    assert all(layer in table for layer in manifest["layers"])
    with pytest.raises(RuntimeError, match="already quantized"):
        with clq_compile.calibrating(qt):
            pass


def test_explain_artifact_shows_every_layer_and_decision(dit_artifact):
    path, _ = dit_artifact
    table = clq_compile.explain_artifact(path)
    manifest = read_manifest(path)
    assert "bits=w4a4 recipe=rtn calibrated" in table
    for layer, decision in manifest["decisions"].items():
        line = next(l for l in table.splitlines() if l.startswith(layer + " "))
        assert ("quantized" in line) == decision["quantize"]
        if not decision["quantize"]:
            assert decision["reason"] in line


def test_nothing_to_save_before_quantization(tmp_path):
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4"})
    with pytest.raises(RuntimeError, match="nothing to save yet"):
        clq_compile.save(qt, tmp_path / "x.safetensors")
    plain = torch.compile(model, backend="clq", options={"bits": "w16a16"})
    with pytest.raises(ValueError, match="quantizes nothing"):
        clq_compile.save(plain, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="uncompiled model"):
        clq_compile.load(qt, tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory):
    """A valid artifact of the same model with other options (w8a8, data-free)."""
    torch._dynamo.reset()
    qt = torch.compile(tiny_models.build("dit", seed=7), backend="clq", options={"bits": "w8a8", "recipe": "rtn"})
    with pytest.warns(UserWarning, match="without calibration"):
        run(qt, "dit")
    return clq_compile.save(qt, tmp_path_factory.mktemp("other") / "dit.safetensors")


def _count_reads(monkeypatch) -> list:
    """Every read of an artifact from disk from now on (manifest or tensors)."""
    reads = []
    real = artifact._locate
    monkeypatch.setattr(artifact, "_locate", lambda path: reads.append(path) or real(path))
    return reads


@pytest.mark.parametrize("how", ["load", "option"])
def test_a_loaded_model_holds_its_manifest_and_never_reads_it_again(dit_artifact, other_artifact, tmp_path,
                                                                    monkeypatch, how):
    path, expected = dit_artifact
    held = shutil.copy(path, tmp_path / "held.safetensors")
    torch._dynamo.reset()
    if how == "load":
        qt = clq_compile.load(tiny_models.build("dit", seed=7), held, options={"kernels": "reference"})
    else:
        qt = torch.compile(tiny_models.build("dit", seed=7), backend="clq",
                           options={"load": str(held), "kernels": "reference"})
        assert torch.equal(run(qt, "dit"), expected)
    table = clq_compile.explain(qt)
    reads = _count_reads(monkeypatch)
    shutil.copy(other_artifact, held)  # the file changes on disk: the loaded model does not
    assert torch.equal(run(qt, "dit"), expected)
    assert torch.equal(run(qt, "dit", seed=1, batch=3), run(qt, "dit", seed=1, batch=3))  # a recompile
    def layers_and_bits(text):  # path, role, shape, bits of each layer (the title counts graphs)
        return [line.split()[:6] for line in text.splitlines()[3:]]
    now = clq_compile.explain(qt)
    assert "bits=w4a4" in now and layers_and_bits(now) == layers_and_bits(table)
    again = clq_compile.save(qt, tmp_path / "again.safetensors")
    with pytest.raises(RuntimeError, match="already quantized"):
        with clq_compile.calibrating(qt):
            pass
    assert reads == [], f"the artifact was read again: {reads}"
    assert read_manifest(again) == read_manifest(path)


def test_load_builds_and_checks_the_layers_once(dit_artifact, monkeypatch):
    path, expected = dit_artifact
    built, checked = [], []
    layers, check = artifact.Artifact.layers, deploy._check_linear_layers
    monkeypatch.setattr(artifact.Artifact, "layers", lambda self, *a: built.append(1) or layers(self, *a))
    monkeypatch.setattr(deploy, "_check_linear_layers", lambda *a: checked.append(1) or check(*a))
    torch._dynamo.reset()
    qt = clq_compile.load(tiny_models.build("dit", seed=7), path, options={"kernels": "reference"})
    assert torch.equal(run(qt, "dit"), expected)
    assert (len(built), len(checked)) == (1, 1)


def test_loading_again_into_the_same_model_uses_the_artifact_read_now(tmp_path):
    """A second load() into the same module (the file re-saved meanwhile) runs the new artifact."""
    artifacts = []
    for calls in (1, 3):  # smoothquant's scales depend on the calibration data
        qt = calibrated("dit", tiny_models.build("dit", seed=7), calls=calls, recipe="smoothquant")
        artifacts.append((clq_compile.save(qt, tmp_path / f"{calls}.safetensors"), run(qt, "dit")))
    (first, first_out), (second, second_out) = artifacts
    assert not torch.equal(first_out, second_out)
    path = shutil.copy(first, tmp_path / "model.safetensors")
    torch._dynamo.reset()
    model = tiny_models.build("dit", seed=7)
    assert torch.equal(run(clq_compile.load(model, path, release_weights=False), "dit"), first_out)
    shutil.copy(second, path)
    assert torch.equal(run(clq_compile.load(model, path, release_weights=False), "dit"), second_out)
