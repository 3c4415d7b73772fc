"""Recipes with a 16-bit low-rank branch (svdquant, clq+lowrank): compiled, saved, loaded, reported."""

import json

import pytest
import torch

import clq_compile
from clq_compile import artifact, stress, tiny_models
from clq_compile.artifact import ArtifactError
from clq_compile.calibration import model_state
from clq_compile.explain import memory_report
from clq_compile.options import parse_options
# `copy` reads the fixture `saved`; both live in the hostile-artifact tests.
from tests.clq_compile.test_artifact_hostile import forge, manifest_text, tensors_of


def calibrated(recipe: str, **options):
    torch._dynamo.reset()
    model = stress.stress_model("pixart", seed=0, heads=4, head_dim=16)
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "kernels": "reference", "recipe": recipe,
                                                      **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(2):
            qt(**tiny_models.make_inputs("pixart", seed=100 + seed))
    return model, qt


def layers_by_hand(model, state, inputs, kernels="reference"):
    """The model run eagerly with every quantized nn.Linear replaced by its record's forward (given
    the call's timesteps, which a layer quantized per timestep bucket needs)."""
    handles = []
    for path, layer in state.layers.items():
        def hook(module, args, output, layer=layer):
            return layer.forward(args[0], module.bias, kernels, inputs.get("timestep"))
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(**inputs).sample
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("recipe", ["svdquant", "clq+lowrank", "quarot+lowrank", "gptq+lowrank"])
def test_the_compiled_branch_is_the_records_branch(recipe):
    """The lowered graph (merged q/k/v included, each member adding its own branch) computes what
    the records do; every layer wide enough has a branch of the option's rank."""
    model, qt = calibrated(recipe, lowrank_rank=4)
    state = model_state(qt)
    assert all(layer.lowrank is not None and layer.lowrank.rank == 4 for layer in state.layers.values())
    inputs = tiny_models.make_inputs("pixart", seed=5)
    with torch.no_grad():
        compiled = qt(**inputs).sample
    assert torch.equal(compiled, layers_by_hand(model, state, inputs))
    lowered = [g.lowered for g in state.graphs]
    assert any(lowered[0].meta["clq_merges"].merges) or recipe == "svdquant"
    downs = [n.target for g in lowered for n in g.graph.nodes if n.op == "get_attr" and n.target.endswith("_lr_down")]
    assert len(downs) == len(set(downs)) == len(state.layers)
    text = clq_compile.explain(qt)
    assert "+lowrank r4" in text and "MiB packed (with the 16-bit low-rank branches)" in text


def test_the_branch_runs_beside_the_triton_kernels():
    """kernels="triton" (interpreted here): the compiled graph adds each layer's branch to the Triton
    op's output, as the records do on the same kernels."""
    model, qt = calibrated("quarot+lowrank", lowrank_rank=4, kernels="triton")
    state = model_state(qt)
    assert all(layer.lowrank is not None for layer in state.layers.values())
    inputs = tiny_models.make_inputs("pixart", seed=5)
    with torch.no_grad():
        compiled = qt(**inputs).sample
    assert torch.equal(compiled, layers_by_hand(model, state, inputs, kernels="triton"))


@pytest.mark.parametrize("recipe,options", [("svdquant", {"bits": "w4a16"}), ("clq+gptq+lowrank", {"bits": "w8a8"})])
def test_weight_only_and_8_bit_modes_carry_the_branch_the_same_way(recipe, options):
    model, qt = calibrated(recipe, lowrank_rank=4, **options)
    state = model_state(qt)
    assert all(layer.lowrank is not None for layer in state.layers.values())
    inputs = tiny_models.make_inputs("pixart", seed=6)
    with torch.no_grad():
        assert torch.equal(qt(**inputs).sample, layers_by_hand(model, state, inputs))


@pytest.mark.parametrize("recipe", ["rtn+lowrank", "gptq+lowrank", "quarot+lowrank", "quarot+gptq+lowrank",
                                    "lrq-dit+lowrank", "d2quant+lowrank"])
def test_a_plus_lowrank_recipe_is_its_base_on_the_residual_of_the_weights_own_split(recipe):
    """The branch is the leading singular directions of W itself (for these recipes' orthogonal
    rotations, the same as of the rotated W); the rest of the layer is the base recipe's record
    for the residual R = W - up · down (checked whole for the data-free bases; the GPTQ bases'
    Hessians are the recordings', which are released after calibration)."""
    from clq_compile.passes.lowrank import lowrank_split
    from clq_compile.passes.recipes import RECIPES

    model, qt = calibrated(recipe, lowrank_rank=4)
    state = model_state(qt)
    base = recipe.removesuffix("+lowrank")
    weights = {p: model.get_submodule(p).weight for p in state.layers}
    split = {p: lowrank_split(w, 4, w.dtype) for p, w in weights.items()}
    for p, w in weights.items():
        residual, branch = split[p]
        # W = R + up · down to float32 rounding: the split itself changes nothing.
        assert torch.allclose(residual.double() + branch.up.double() @ branch.down.double(), w.double(), atol=1e-5)
        assert torch.equal(state.layers[p].lowrank.down, branch.down) and torch.equal(state.layers[p].lowrank.up, branch.up)
    if base not in ("rtn", "quarot"):  # calibrated bases: their statistics are gone after calibration
        assert all(layer.method.endswith(" +lowrank r4") and not layer.method.startswith("data-free")
                   for layer in state.layers.values())
        return
    configs = parse_options({"bits": "w4a4", "recipe": base}).method_configs()
    expected = RECIPES[base]({p: r for p, (r, _) in split.items()}, configs, None, state.options.execution())
    for p, layer in state.layers.items():
        assert torch.equal(layer.weight.qweight, expected[p].weight.qweight), p
        assert torch.equal(layer.weight.scale, expected[p].weight.scale), p
        assert layer.method == f"{expected[p].method} +lowrank r4"


def test_the_branch_lowers_the_error_and_is_counted_in_memory():
    model, plain = calibrated("clq")
    inputs = tiny_models.make_inputs("pixart", seed=5)
    with torch.no_grad():
        reference = model(**inputs).sample
        err_plain = float((plain(**inputs).sample - reference).norm() / reference.norm())
    plain_bytes = memory_report(plain)["quantized_bytes"]
    _, branch = calibrated("clq+lowrank", lowrank_rank=8)
    with torch.no_grad():
        err_branch = float((branch(**inputs).sample - reference).norm() / reference.norm())
    state = model_state(branch)
    extra = sum(layer.lowrank.nbytes for layer in state.layers.values())
    assert extra == sum(4 * 8 * (layer.weight.qweight.shape[0] + layer.weight.in_features)
                        for layer in state.layers.values())
    assert memory_report(branch)["quantized_bytes"] == pytest.approx(plain_bytes + extra, abs=64)
    assert err_branch < err_plain


@pytest.fixture(scope="module")
def saved_lowrank(tmp_path_factory):
    model, qt = calibrated("clq+lowrank", lowrank_rank=4)
    path = clq_compile.save(qt, tmp_path_factory.mktemp("lowrank") / "pixart.safetensors")
    with torch.no_grad():
        out = qt(**tiny_models.make_inputs("pixart", seed=5)).sample
    return path, out


def test_an_artifact_with_branches_round_trips(saved_lowrank):
    path, out = saved_lowrank
    manifest = json.loads(manifest_text(path))
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["options"]["lowrank_rank"] == 4
    assert all({"lr_down", "lr_up"} <= set(layer["tensors"]) for layer in manifest["layers"].values())
    torch._dynamo.reset()
    loaded = clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path,
                              options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_models.make_inputs("pixart", seed=5)).sample, out)


def _drop_up(m):
    layer = next(iter(m["layers"].values()))
    del layer["tensors"]["lr_up"]


@pytest.mark.parametrize("edit,tensors_edit,match", [
    (_drop_up, None, r"without \{'lr_up'\}|is stored but no layer uses it"),
    (None, "narrow", r"lr_down.*\[4, 64\]|lr_up.*rank"),
])
def test_a_forged_branch_is_refused(saved_lowrank, tmp_path, edit, tensors_edit, match):
    path, _ = saved_lowrank
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    tensors = tensors_of(target)
    if tensors_edit == "narrow":
        name = next(k for k in sorted(tensors) if k.endswith(".lr_down"))
        tensors[name] = tensors[name][:3].contiguous()
    forge(target, edit or (lambda m: None), tensors)
    with pytest.raises(ArtifactError, match=match):
        clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), target)


@pytest.mark.parametrize("options,match", [
    ({"recipe": "clq", "lowrank_rank": 8}, r"lowrank_rank.*recipe 'clq' does not read it"),
    ({"recipe": "svdquant", "lowrank_rank": 0}, r"lowrank_rank.*positive integer"),
    ({"recipe": "svdquant", "lowrank_rank": 8.0}, r"lowrank_rank.*positive integer"),
    ({"recipe": "svdquant", "fold": True}, r"svdquant.*online"),
])
def test_bad_lowrank_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_artifacts_of_recipes_without_a_branch_do_not_record_its_rank():
    assert "lowrank_rank" not in parse_options({"recipe": "clq"}).quantization_dict()
    assert parse_options({"recipe": "svdquant"}).quantization_dict()["lowrank_rank"] == 32
    assert artifact.FORMAT_VERSION >= 5
