"""Artifacts as an attacker or a careless copy would leave them: every edit of the manifest, every
malformed file is refused with an ArtifactError that says what and where, before the model is touched."""

import json
import shutil
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.exc import BackendCompilerFailed

import clq_compile
from clq_compile import artifact, tiny_models
from clq_compile.artifact import ArtifactError, read_artifact, read_manifest
from clq_compile.calibration import model_state
from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize
from clq_compile.options import Options

LAYER = "transformer_blocks.0.attn1.to_q"
OTHER = "transformer_blocks.1.attn1.to_q"
KEPT = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"  # [32, 32], conditioning: kept


def run(model, seed=0):
    with torch.no_grad():
        return model(**tiny_models.make_inputs("dit", seed=seed)).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A calibrated tiny DiT's artifact as one file and as a directory, and its outputs."""
    torch._dynamo.reset()
    qt = torch.compile(tiny_models.build("dit", seed=7), backend="clq",
                       options={"bits": "w4a4", "kernels": "reference", "recipe": "rtn"})
    with torch.no_grad(), clq_compile.calibrating(qt):
        qt(**tiny_models.make_inputs("dit", seed=100))
    root = tmp_path_factory.mktemp("saved")
    return {"file": clq_compile.save(qt, root / "dit.safetensors"), "dir": clq_compile.save(qt, root / "dit"),
            "output": run(qt)}


@pytest.fixture(params=["file", "dir"])
def copy(request, saved, tmp_path):
    """A fresh copy of the saved artifact in one of its two forms."""
    source = saved[request.param]
    target = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


def manifest_text(path) -> str:
    if path.is_dir():
        return (path / artifact.MANIFEST_FILE).read_text()
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])["__metadata__"][artifact.MANIFEST_KEY]


def tensors_of(path) -> dict:
    return safetensors.torch.load_file(path / artifact.TENSORS_FILE if path.is_dir() else path)


def rewrite(path, text: str | bytes, tensors: dict | None = None) -> None:
    """Replace the artifact's manifest text (and tensors), as a hand edit would."""
    tensors = tensors_of(path) if tensors is None else tensors
    if path.is_dir():
        (path / artifact.MANIFEST_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())
        safetensors.torch.save_file(tensors, path / artifact.TENSORS_FILE)
    else:
        path.write_bytes(safetensors.torch.save(tensors, metadata={artifact.MANIFEST_KEY: text}))


def forge(path, edit, tensors: dict | None = None) -> None:
    """Edit the manifest as a deliberate forger would: tensors hashed and the manifest resealed."""
    manifest = json.loads(manifest_text(path))
    tensors = tensors_of(path) if tensors is None else tensors
    edit(manifest)
    manifest["tensor_sha256"] = {k: artifact.tensor_sha256(t) for k, t in sorted(tensors.items())}
    seal = getattr(artifact, "seal", lambda m: m)
    rewrite(path, json.dumps(seal(manifest), sort_keys=True, indent=1), tensors)


def fresh_model():
    torch._dynamo.reset()
    return tiny_models.build("dit", seed=7)


def refused_untouched(path, match):
    """load() raises an ArtifactError matching `match` and leaves the model's weights as they were."""
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArtifactError, match=match):
        clq_compile.load(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "load() changed the model"


# ---------------------------------------------------------------------------------------------
# Item 6: the public API's arguments are type-checked


@pytest.mark.parametrize("kwargs,match", [
    ({"release_weights": "no"}, "release_weights must be True or False"),
    ({"release_weights": 0}, "release_weights must be True or False"),
    ({"options": [("kernels", "reference")]}, "options must be a dict"),
])
def test_load_checks_its_arguments_before_touching_the_model(saved, kwargs, match):
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=match):
        clq_compile.load(model, saved["file"], **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paths_must_be_paths(saved):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        clq_compile.load(fresh_model(), 3)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        clq_compile.save(clq_compile.load(fresh_model(), saved["file"]), None)
    with pytest.raises(TypeError, match="compiled"):
        clq_compile.release_weights(fresh_model())


# ---------------------------------------------------------------------------------------------
# Item 7: the manifest is integrity-checked


def _edit_a_format(text):
    assert '"a_format": "int4"' in text
    return text.replace('"a_format": "int4"', '"a_format": "int8"', 1)


def _move_entry(text):
    m = json.loads(text)
    m["layers"][OTHER], m["layers"][LAYER] = m["layers"][LAYER], m["layers"][OTHER]
    return json.dumps(m, sort_keys=True, indent=1)


def _repoint_tensor(text):
    m = json.loads(text)
    m["layers"][LAYER]["tensors"]["qweight"] = m["layers"][OTHER]["tensors"]["qweight"]
    return json.dumps(m, sort_keys=True, indent=1)


@pytest.mark.parametrize("edit", [_edit_a_format, _move_entry, _repoint_tensor])
def test_any_edit_of_the_manifest_is_refused(copy, edit):
    rewrite(copy, edit(manifest_text(copy)))
    with pytest.raises(ArtifactError, match="manifest"):
        read_artifact(copy)
    refused_untouched(copy, "manifest")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_byte_in_the_manifest_is_refused_or_harmless(saved, tmp_path_factory, data):
    """Any byte of manifest.json (or of the single file's header) changed by any bit pattern gives an
    ArtifactError or a manifest equal to the saved one; never another exception."""
    form = data.draw(st.sampled_from(["file", "dir"]))
    source = saved[form]
    target = tmp_path_factory.mktemp("flip") / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    victim = target / artifact.MANIFEST_FILE if form == "dir" else target
    raw = bytearray(victim.read_bytes())
    end = len(raw) if form == "dir" else 8 + struct.unpack("<Q", raw[:8])[0]
    where = data.draw(st.integers(0 if form == "dir" else 8, end - 1))
    raw[where] ^= data.draw(st.integers(1, 255))
    victim.write_bytes(bytes(raw))
    try:
        read = read_artifact(target)
    except ArtifactError:
        return
    assert read.manifest == read_artifact(source).manifest


def test_manifest_hash_is_recorded_and_artifacts_stay_byte_identical(saved, tmp_path):
    manifest = read_manifest(saved["file"])
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 6
    assert manifest["manifest_sha256"] == artifact.seal(manifest)["manifest_sha256"]
    assert read_manifest(saved["dir"]) == manifest


def _as_version(manifest, version):
    """`manifest` as format `version` wrote it: bit counts instead of format names before 3, no hash in 1
    (3 differs from 4 only in having no low-rank branches, which this manifest has none of)."""
    if version == 3:
        return artifact.seal({**manifest, "format_version": 3})
    legacy = {**manifest, "format_version": version, "layers": {}}
    for path, layer in manifest["layers"].items():
        rest = {k: v for k, v in layer.items() if k not in ("w_format", "a_format")}
        legacy["layers"][path] = {**rest, "w_bits": int(layer["w_format"][3:]),
                                  "a_bits": 16 if layer["a_format"] == "none" else int(layer["a_format"][3:])}
    if version == 1:
        del legacy["manifest_sha256"]
        return legacy
    return artifact.seal(legacy)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_format_versions_still_load(copy, saved, version):
    """Version 1 had no manifest hash, versions 1 and 2 bit counts instead of format names, version 3
    no low-rank branches; such a manifest is still checked against its schema and the model."""
    manifest = _as_version(json.loads(manifest_text(copy)), version)
    rewrite(copy, json.dumps(manifest, sort_keys=True, indent=1))
    qt = clq_compile.load(fresh_model(), copy)
    assert torch.equal(run(qt), saved["output"])
    assert read_manifest(copy)["layers"][LAYER]["w_format"] == "int4"
    manifest["layers"]["pos_embed.proj"] = manifest["layers"].pop(LAYER)
    rewrite(copy, json.dumps(artifact.seal(manifest) if version > 1 else manifest, sort_keys=True, indent=1))
    refused_untouched(copy, r"pos_embed\.proj")


def test_an_option_the_artifact_predates_means_what_it_did_then(copy, saved):
    """A manifest written before `cbc_prefix` existed (no such key) was made with the whole prefix
    quantized: it loads as cbc_prefix="all", not as today's default, and refuses a contrary option."""
    forge(copy, lambda m: m["options"].pop("cbc_prefix"))
    qt = clq_compile.load(fresh_model(), copy)
    assert torch.equal(run(qt), saved["output"])
    assert model_state(qt).options.cbc_prefix == "all" != Options().cbc_prefix
    with pytest.raises(ValueError, match=r"cbc_prefix: 'previous' given, 'all' in the artifact"):
        clq_compile.load(fresh_model(), copy, options={"cbc_prefix": "previous"})


# ---------------------------------------------------------------------------------------------
# Item 8: a forged manifest (resealed) is checked against the tensors and the model


def _claim(path, key, value):
    def edit(m):
        m["layers"][path][key] = value
    return edit


def _all_w8a8(m):
    m["options"]["bits"] = "w8a8"
    for layer in m["layers"].values():
        layer.update(w_format="int8", a_format="int8")


def _rename(old, new):
    def edit(m):
        m["layers"][new] = m["layers"].pop(old)
        m["decisions"][new] = {**m["decisions"].get(new, m["decisions"][old]), "quantize": True}
    return edit


@pytest.mark.parametrize("edit,match", [
    (_rename(LAYER, "pos_embed.proj"), r"pos_embed\.proj.*not a linear layer|pos_embed\.proj.*weight"),
    (_rename(LAYER, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table"), "embedding_table"),
    (_rename(LAYER, "transformer_blocks.0.no_such_layer"), "no_such_layer"),
    (_claim(LAYER, "in_features", 64), r"in_features"),
    (_claim(LAYER, "w_format", "int8"), r"w_format"),
    (_claim(LAYER, "w_format", "e4m3"), r"w_format"),
    (_all_w8a8, r"qweight.*int8\[32, 32\]"),
    (_claim(LAYER, "a_format", "int8"), r"a_format"),
    (_claim(LAYER, "w_group", 16), r"w_scale|w_group"),
])
def test_forged_layer_entries_are_refused_before_the_model_is_touched(copy, edit, match):
    forge(copy, edit)
    refused_untouched(copy, match)


def forge_honest_layer(copy, model, path):
    """Add a layer at `path` whose tensors quantize that module's own weight, resealed."""
    weight = model.get_submodule(path).weight.detach()
    packed = pack_weight(quantize(weight, 4, symmetric=True, group=None))
    tensors = {**tensors_of(copy), f"{path}.qweight": packed.qweight, f"{path}.w_scale": packed.scale}

    def edit(m):
        m["layers"][path] = {**m["layers"][LAYER], "in_features": weight.shape[1],
                             "tensors": {"qweight": f"{path}.qweight", "w_scale": f"{path}.w_scale"}}
        m["decisions"][path] = {"role": "attn_q", "out_features": weight.shape[0], "in_features": weight.shape[1],
                                "quantize": True, "reason": "token GEMM"}
    forge(copy, edit, tensors)


def test_a_layer_the_policy_keeps_cannot_be_quantized_by_the_artifact(copy):
    """A conditioning linear of the right shape, with honestly made tensors and a resealed manifest."""
    model = fresh_model()
    forge_honest_layer(copy, model, KEPT)
    with pytest.raises((ArtifactError, BackendCompilerFailed), match="policy"):
        run(clq_compile.load(model, copy, release_weights=False))


def test_a_kept_layer_in_the_artifact_leaves_every_weight_intact(copy, saved):
    """Refused at the first capture, where the policy is known: load() released nothing before."""
    model = fresh_model()
    forge_honest_layer(copy, model, KEPT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qt = clq_compile.load(model, copy)
    with pytest.raises((ArtifactError, BackendCompilerFailed), match="policy"):
        run(qt)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"a refused artifact changed the model's {changed}"
    # The same model takes the honest artifact afterwards.
    if copy.is_dir():
        shutil.copytree(saved["dir"], copy, dirs_exist_ok=True)
    else:
        shutil.copy(saved["file"], copy)
    assert torch.equal(run(clq_compile.load(model, copy)), saved["output"])


def test_weights_are_released_once_the_first_capture_checked_every_layer(copy, saved):
    model = fresh_model()
    qt = clq_compile.load(model, copy)
    assert torch.equal(run(qt), saved["output"])
    report = clq_compile.memory_report(qt)
    assert report["released"] and report["resident_fp_bytes"] < report["quantized_bytes"] / 10
    assert torch.isnan(model.get_submodule(LAYER).weight).all()


def test_a_well_formed_layer_on_an_embedding_is_never_released(copy):
    """An Embedding's 2-D weight passes the manifest's own checks; the model's modules do not."""
    table = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table"
    model = fresh_model()
    forge_honest_layer(copy, model, table)
    refused_untouched(copy, f"{table} is a module of type Embedding, not a linear layer")
    before = model.get_submodule(table).weight.clone()
    qt = torch.compile(model, backend="clq", options={"load": str(copy), "kernels": "reference"})
    run(qt)
    with pytest.raises(ArtifactError, match="not a linear layer"):
        clq_compile.release_weights(qt)
    assert torch.equal(model.get_submodule(table).weight, before)


def _leaves(value, keys=()):
    """(JSON path, value) of every scalar in a manifest."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, keys + (k,))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, keys + (i,))]
    return [(keys, value)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_forged_value_is_refused_or_changes_nothing(saved, tmp_path_factory, data):
    """Any one value of the manifest replaced (by a plain value or another entry's), the manifest
    resealed: load() and the first call give an ArtifactError, or exactly the saved outputs."""
    target = tmp_path_factory.mktemp("forged") / "dit"
    shutil.copytree(saved["dir"], target)
    leaves = _leaves(json.loads(manifest_text(target)))
    keys, _ = data.draw(st.sampled_from([leaf for leaf in leaves if leaf[0][0] != "manifest_sha256"]))
    value = data.draw(st.one_of(st.integers(-1, 300), st.booleans(), st.none(), st.floats(allow_nan=False),
                                st.sampled_from(["w8a8", "clq", "*", "float16", LAYER, OTHER, KEPT]),
                                st.sampled_from([v for _, v in leaves])))

    def edit(m):
        target_ = m
        for k in keys[:-1]:
            target_ = target_[k]
        target_[keys[-1]] = value
    forge(target, edit)
    if keys[0] == "tensor_sha256":  # forge() hashes the tensors again: spoil the value after it
        m = json.loads(manifest_text(target))
        edit(m)
        rewrite(target, json.dumps(artifact.seal(m), sort_keys=True, indent=1))
    try:
        output = run(clq_compile.load(fresh_model(), target))
    except ArtifactError:
        return
    except BackendCompilerFailed as error:
        assert isinstance(error.inner_exception, ArtifactError), error
        return
    assert torch.equal(output, saved["output"]), f"{keys} = {value!r} changed the outputs"


# ---------------------------------------------------------------------------------------------
# Item 9: malformed artifacts give ArtifactError naming what and where


def _header_file(path, header: dict):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))


def test_malformed_safetensors_headers(saved, tmp_path):
    text = manifest_text(saved["file"])
    meta = {"__metadata__": {artifact.MANIFEST_KEY: text}}
    cases = {
        "no_offsets": {**meta, "x": {"dtype": "F32", "shape": [1]}},
        "bad_offsets": {**meta, "x": {"dtype": "F32", "shape": [1], "data_offsets": ["0", None]}},
        "entry_not_object": {**meta, "x": [1, 2]},
        "metadata_not_object": {"__metadata__": 3, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    }
    for name, header in cases.items():
        _header_file(tmp_path / f"{name}.safetensors", header)
        with pytest.raises(ArtifactError, match="header"):
            read_artifact(tmp_path / f"{name}.safetensors")
    deep = tmp_path / "deep.safetensors"
    raw = b"[" * 100_000 + b"]" * 100_000
    deep.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ArtifactError, match="nested"):
        read_manifest(deep)


def test_a_flipped_bit_in_a_header_key_is_refused(copy):
    if copy.is_dir():
        victim = copy / artifact.TENSORS_FILE
    else:
        victim = copy
    raw = victim.read_bytes()
    assert b"data_offsets" in raw
    victim.write_bytes(raw.replace(b"data_offsets", b"data_offsetr", 1))
    with pytest.raises(ArtifactError, match="data_offsets"):
        read_artifact(copy)


def _set(*keys, value):
    def edit(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return edit


@pytest.mark.parametrize("edit,where", [
    (_set("options", "colour", value="red"), r'manifest\["options"\]\["colour"\]'),
    (_set("options", "bits", value="w3a3"), r'manifest\["options"\].*w3a3'),
    (_set("layers", LAYER, "extra", value=1), rf'manifest\["layers"\]\["{LAYER}"\]\["extra"\]'),
    (_drop("layers", LAYER, "in_features"), rf'manifest\["layers"\]\["{LAYER}"\]\["in_features"\]'),
    (_set("layers", LAYER, "in_features", value="32"), rf'\["in_features"\].*an integer'),
    (_set("layers", LAYER, "w_format", value=True), r'\["w_format"\]'),
    (_set("layers", LAYER, "tensors", "qweight", value=["x"]), r'\["tensors"\]\["qweight"\]'),
    (_set("layers", LAYER, "tensors", "colour", value="x"), r'\["tensors"\]\["colour"\]'),
    (_set("layers", LAYER, "details", value={"fold": 3}), r'\["details"\]\["fold"\]'),
    (_set("layers", value=[]), r'manifest\["layers"\].*an object'),
    (_set("fingerprint", "pos_embed.proj.weight", "shape", value="big"), r'\["fingerprint"\]'),
    (_set("decisions", LAYER, "quantize", value="yes"), r'\["decisions"\]'),
    (_set("errors", LAYER, value="small"), r'\["errors"\]'),
    (_set("calibrated", value="yes"), r'manifest\["calibrated"\]'),
    (_drop("fingerprint"), r'manifest\["fingerprint"\]'),
    (_set("surprise", value=1), r'manifest\["surprise"\]'),
])
def test_malformed_manifests_name_the_json_path(copy, edit, where):
    forge(copy, edit)
    with pytest.raises(ArtifactError, match=where):
        read_manifest(copy)
    refused_untouched(copy, where)


def test_unreadable_manifest_text(copy):
    rewrite(copy, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested"):
        read_manifest(copy)
    if copy.is_dir():
        rewrite(copy, b'{"format": "\xff\xfe"}')
        with pytest.raises(ArtifactError, match="UTF-8"):
            read_manifest(copy)


def test_compile_option_load_refuses_forged_artifacts_too(copy):
    forge(copy, _claim(LAYER, "in_features", 64))
    with pytest.raises((ArtifactError, BackendCompilerFailed), match="in_features"):
        run(torch.compile(fresh_model(), backend="clq", options={"load": str(copy)}))


# ---------------------------------------------------------------------------------------------
# Item 10: saving again into a directory artifact keeps the user's other files


def test_saving_again_keeps_other_files_in_the_directory(saved, tmp_path):
    target = tmp_path / "dit"
    shutil.copytree(saved["dir"], target)
    (target / "eval.json").write_text('{"psnr": 30}')
    (target / "notes").mkdir()
    qt = clq_compile.load(fresh_model(), saved["file"], release_weights=False)
    clq_compile.save(qt, target)
    assert (target / "eval.json").read_text() == '{"psnr": 30}' and (target / "notes").is_dir()
    assert sorted(p.name for p in target.iterdir()) == ["eval.json", "manifest.json", "notes", "tensors.safetensors"]
    assert read_manifest(target) == read_manifest(saved["dir"])


def test_save_refuses_a_safetensors_file_that_is_not_an_artifact(saved, tmp_path):
    # A model's own weights file given as the artifact path: refused, its bytes untouched.
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(weights))
    before = weights.read_bytes()
    qt = clq_compile.load(fresh_model(), saved["file"], release_weights=False)
    with pytest.raises(ArtifactError, match="is not a clq-compile artifact"):
        clq_compile.save(qt, weights)
    assert weights.read_bytes() == before
    clq_compile.save(qt, tmp_path / "again.safetensors")
    clq_compile.save(qt, tmp_path / "again.safetensors")  # an artifact file may be replaced
    assert read_manifest(tmp_path / "again.safetensors") == read_manifest(saved["file"])


def test_an_existing_empty_folder_takes_a_directory_artifact(saved, tmp_path):
    # `clq quantize --out FOLDER` accepts an empty folder before the work; save() must too.
    target = tmp_path / "empty"
    target.mkdir()
    qt = clq_compile.load(fresh_model(), saved["file"], release_weights=False)
    clq_compile.save(qt, target)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "tensors.safetensors"]
    assert read_manifest(target) == read_manifest(saved["dir"])
