"""The artifact format alone: round trips, shared tensors, refusals of damaged files, atomic writes."""

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clq_compile import artifact
from clq_compile.artifact import ArtifactError, read_artifact, read_manifest, write_artifact
from clq_compile.kernels.formats import MODES, mode_name
from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize
from clq_compile.passes.layer import ActivationTransform, QuantizedLinear


def random_layer(g: torch.Generator, n: int, k: int, mode: str, group, symmetric: bool, rotation=None):
    w_format, a_format = MODES[mode]
    w = torch.randn(n, k, generator=g, dtype=torch.float64).float()
    packed = pack_weight(quantize(w, w_format, symmetric=symmetric, group=group))
    perm = torch.randperm(k, generator=g)
    online = ActivationTransform(torch.rand(k, generator=g) + 0.5, perm, rotation)
    return QuantizedLinear(packed, a_format, None, online, method="test", notes=["a note"],
                           details={"clip": (0.9, 1.0)})


def manifest(layers: dict, names: dict) -> dict:
    """A manifest as save() writes it for `layers` (all made with the same options)."""
    first = next(iter(layers.values()))
    options = {"bits": mode_name(first.weight.format, first.a_format), "recipe": "rtn",
               "weight_group": first.weight.group, "weight_symmetric": first.weight.zero is None}
    decisions = {p: {"role": "attn_q", "out_features": l.weight.qweight.shape[0], "in_features": l.weight.in_features,
                     "quantize": True, "reason": "token GEMM"} for p, l in layers.items()}
    fingerprint = {f"{p}.weight": {"shape": [d["out_features"], d["in_features"]], "dtype": "float32",
                                   "sha256": "0" * 64} for p, d in decisions.items()}
    return {"format": artifact.FORMAT, "format_version": artifact.FORMAT_VERSION, "package_version": "test",
            "options": options, "recipe": "rtn", "calibrated": True, "fingerprint": fingerprint,
            "decisions": decisions, "errors": {},
            "layers": {p: artifact.layer_manifest(layers[p], names[p]) for p in layers}}


def save_layers(path, layers):
    tensors, names = artifact.layer_tensors(layers)
    return write_artifact(path, manifest(layers, names), tensors)


def assert_same_layers(a: dict, b: dict):
    assert set(a) == set(b)
    for path in a:
        for name, t in a[path].tensors().items():
            u = b[path].tensors()[name]
            assert (t is None) == (u is None), (path, name)
            if t is not None:
                assert t.dtype == u.dtype and torch.equal(t, u), (path, name)
        for attr in ("format", "in_features", "group"):
            assert getattr(a[path].weight, attr) == getattr(b[path].weight, attr)
        assert (a[path].a_format, a[path].a_group, a[path].method, a[path].notes) == \
            (b[path].a_format, b[path].a_group, b[path].method, b[path].notes)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), k=st.sampled_from([2, 6, 32, 64]),
       mode=st.sampled_from([m for m, (w, _) in MODES.items() if w is not None]), grouped=st.booleans(),
       symmetric=st.booleans(), single_file=st.booleans())
def test_layers_round_trip_exactly(tmp_path_factory, seed, n, k, mode, grouped, symmetric, single_file):
    w_format = MODES[mode][0]
    assume(w_format.width_problem(k) is None)
    g = torch.Generator().manual_seed(seed)
    group = 32 if grouped and k % 32 == 0 and w_format.integer else None
    symmetric = symmetric or not w_format.asymmetric
    rotation = torch.randn(2, 2, generator=g)
    layers = {f"blocks.{i}.proj": random_layer(g, n, k, mode, group, symmetric, rotation) for i in range(2)}
    path = tmp_path_factory.mktemp("a") / ("x.safetensors" if single_file else "x")
    save_layers(path, layers)
    loaded = read_artifact(path).layers()
    assert_same_layers(layers, loaded)
    # One stored copy of the shared rotation, and still one object after loading.
    assert loaded["blocks.0.proj"].act_rotation is loaded["blocks.1.proj"].act_rotation
    assert sum(name.endswith("act_rotation") for name in read_manifest(path)["tensor_sha256"]) == 1


@pytest.fixture
def saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = {"blocks.0.proj": random_layer(g, 4, 32, "w4a4", None, True)}
    return save_layers(tmp_path / "a.safetensors", layers), layers


def test_truncated_file_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    for cut in (4, 40, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="truncated or corrupted"):
            read_artifact(path)


def test_flipped_byte_in_a_tensor_is_refused(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="recorded hash"):
        read_artifact(path)


def test_unknown_format_version_is_refused(tmp_path, saved):
    path, _ = saved
    tensors = safetensors.torch.load_file(path)
    meta = json.loads(read_manifest_text(path))
    meta["format_version"] = 99
    other = tmp_path / "v99.safetensors"
    safetensors.torch.save_file(tensors, other, metadata={artifact.MANIFEST_KEY: json.dumps(meta)})
    with pytest.raises(ArtifactError, match="format version 99.*reads versions 1 and 2"):
        read_manifest(other)


def read_manifest_text(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])["__metadata__"][artifact.MANIFEST_KEY]


def test_plain_safetensors_file_is_not_an_artifact(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    with pytest.raises(ArtifactError, match="without a clq-compile manifest"):
        read_manifest(path)
    with pytest.raises(FileNotFoundError, match="no artifact"):
        read_manifest(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", ["a.safetensors", "adir"])
def test_interrupted_write_keeps_the_previous_artifact(tmp_path, monkeypatch, name):
    g = torch.Generator().manual_seed(1)
    first = {"blocks.0.proj": random_layer(g, 4, 32, "w4a4", None, True)}
    second = {"blocks.0.proj": random_layer(g, 4, 32, "w8a8", None, False)}
    path = save_layers(tmp_path / name, first)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_layers(path, second)
    monkeypatch.undo()
    assert_same_layers(first, read_artifact(path).layers())
    assert sorted(os.listdir(tmp_path)) == [name], "temporary files left behind"
    save_layers(path, second)
    assert_same_layers(second, read_artifact(path).layers())


def test_a_directory_save_interrupted_between_its_two_files_is_refused_not_mixed(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(2)
    path = save_layers(tmp_path / "adir", {"blocks.0.proj": random_layer(g, 4, 32, "w4a4", None, True)})
    replace, renamed = os.replace, []

    def second_fails(src, dst):
        renamed.append(dst)
        if len(renamed) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt):
        save_layers(path, {"blocks.0.proj": random_layer(g, 4, 32, "w8a8", None, False)})
    monkeypatch.undo()
    assert [os.path.basename(d) for d in renamed] == [artifact.TENSORS_FILE, artifact.MANIFEST_FILE]
    assert sorted(os.listdir(path)) == [artifact.MANIFEST_FILE, artifact.TENSORS_FILE]
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        read_artifact(path)


@pytest.mark.parametrize("name", ["a.safetensors", "adir"])
def test_artifacts_get_the_permissions_of_any_new_file(tmp_path, name):
    path = save_layers(tmp_path / name, {"blocks.0.proj": random_layer(torch.Generator(), 4, 32, "w4a4", None, True)})
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if path.is_file() else [path / artifact.MANIFEST_FILE, path / artifact.TENSORS_FILE]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask
    if path.is_dir():
        assert path.stat().st_mode & 0o777 == 0o777 & ~mask


def test_fingerprint_differences_name_each_kind():
    a = artifact.fingerprint([("x", torch.zeros(2)), ("y", torch.zeros(3)), ("z", torch.zeros(1))])
    b = artifact.fingerprint([("x", torch.ones(2)), ("y", torch.zeros(4)), ("w", torch.zeros(1))])
    lines = artifact.fingerprint_differences(a, b)
    assert "missing: z (in the artifact's model, not in this one)" in lines
    assert "extra: w (in this model, not in the artifact's)" in lines
    assert any(line.startswith("values: x") for line in lines)
    assert any(line.startswith("shape/dtype: y") for line in lines)
    assert len(lines) == 4
    half = artifact.fingerprint([("x", torch.zeros(2, dtype=torch.float16))])
    assert artifact.fingerprint_differences({"x": a["x"]}, half) == ["dtype: x is float16 here, float32 in the artifact"]
    # A graph's view of the model: parameters it does not hold are not "missing".
    assert artifact.fingerprint_differences(a, {"x": a["x"]}, complete=False) == []


def test_reading_a_manifest_parses_its_options_once(tmp_path, monkeypatch):
    from clq_compile import options

    path = save_layers(tmp_path / "x", {"blocks.0.proj": random_layer(torch.Generator().manual_seed(0), 4, 32,
                                                                      "w4a4", None, True)})
    parsed = []
    real = options.parse_options
    monkeypatch.setattr(options, "parse_options", lambda value: parsed.append(value) or real(value))
    read_manifest(path)
    assert len(parsed) == 1
