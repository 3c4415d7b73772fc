"""The artifact format: quantized layers in safetensors, everything else in a JSON manifest.

A saved model is either one file (a path ending in ``.safetensors``: the manifest sits in the
safetensors header's metadata under ``clq_manifest``) or a directory holding ``manifest.json`` and
``tensors.safetensors``. Nothing is pickled: tensors are raw safetensors, the rest is JSON.

The manifest holds the format version, the package version, the options, every linear layer's
decision (quantized or kept, and why), each quantized layer's scalars (number formats, groups, method,
notes) with the names of its tensors, the measured per-layer errors, a SHA-256 of every stored
tensor, and a fingerprint of the model the artifact was made from: the path, shape, dtype and
SHA-256 of every parameter. Layers that share a tensor (an OBS rotation block) share one entry.
Since format version 2 the manifest also holds `manifest_sha256`, the SHA-256 of its own canonical
JSON (sorted keys, no spaces, without that field), which covers the tensors' hashes in turn: any
edit of the manifest or of a tensor is refused. Version 1 artifacts (no manifest hash) still load.
Since version 3 a layer names its number formats ("w_format": "int4", "a_format": "int8"); versions
1 and 2, which gave bit counts, are read into that form (manifest_schema.py). Version 4 added
low-rank branches, version 5 the twin-log weight formats, version 6 layers quantized per timestep
bucket (a layer's entry is its first bucket's, plus "timestep_edges" and every bucket's entry
under "buckets"; its tensors are stored as "<layer>.b<bucket>.<argument>").

A hash stops accidents, not a forger who recomputes it, so nothing read is trusted: the manifest is
checked against its schema and for consistency with itself and its tensors (manifest_schema.py),
and against the model it is loaded into (deploy.py, and the policy when a graph is captured).

Writes go to a temporary sibling and are renamed into place, so an interrupted save leaves either
the previous artifact or none, never a partial one (a directory artifact's two files are replaced
one by one, the manifest last, and the user's other files in that directory are left alone); reads
check the header, the sizes and every tensor's hash, so a truncated or corrupted file is refused
with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import safetensors.torch
import torch

from clq_compile.kernels.formats import get_format
from clq_compile.kernels.packing import PackedWeight
from clq_compile.passes.configs import QuantizerConfig
from clq_compile.passes.folding import FoldDecision
from clq_compile.passes.layer import ActivationTransform, LowRank, QuantizedLinear, TimestepBuckets
from clq_compile.passes.policy import Decision

from .manifest_schema import ManifestError, check_manifest, check_tensors, dtype_name

FORMAT = "clq-compile artifact"
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST_KEY = "clq_manifest"
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"


class ArtifactError(ValueError):
    """An artifact that cannot be read or does not fit: the message says which and what to do."""


# ---------------------------------------------------------------------------------------------
# Hashes and the model fingerprint


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's values as stored (dtype bytes in row-major order)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's canonical JSON, without its own hash: what `manifest_sha256` covers."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest` with "manifest_sha256", the SHA-256 of its canonical JSON, set."""
    return {**manifest, "manifest_sha256": hashlib.sha256(_canonical(manifest)).hexdigest()}


def parameter_entry(p: torch.Tensor, with_hash: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(p.shape), "dtype": dtype_name(p.dtype)}
    if with_hash:
        entry["sha256"] = tensor_sha256(p)
    return entry


def fingerprint(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """{parameter path: {"shape", "dtype", "sha256"}} of a model's parameters."""
    return {name: parameter_entry(p) for name, p in named_parameters}


# A parameter whose dtype alone differs, as `fingerprint_differences` words it and `refuse_other_model` reads it.
_DTYPE_LINE = "dtype: {name} is {here} here, {saved} in the artifact"
_DTYPE_PATTERN = re.compile(r"dtype: (?P<name>\S+) is (?P<here>\S+) here, (?P<saved>\S+) in the artifact")


def fingerprint_differences(expected: Mapping[str, Mapping[str, Any]],
                            found: Mapping[str, Mapping[str, Any]], complete: bool = True) -> list[str]:
    """One line per parameter that differs between the artifact's model and this one.

    `found` entries may lack "sha256" (weights already released): their values are not compared.
    complete=False compares only the parameters in `found` (one captured graph sees a part of
    the model), so parameters missing from it are not reported.
    """
    lines = []
    if complete:
        lines += [f"missing: {name} (in the artifact's model, not in this one)"
                  for name in sorted(set(expected) - set(found))]
    lines += [f"extra: {name} (in this model, not in the artifact's)" for name in sorted(set(found) - set(expected))]
    for name in sorted(set(expected) & set(found)):
        e, f = expected[name], found[name]
        if e["shape"] == f["shape"] and e["dtype"] != f["dtype"]:
            lines.append(_DTYPE_LINE.format(name=name, here=f["dtype"], saved=e["dtype"]))
        elif e["shape"] != f["shape"]:
            lines.append(f"shape/dtype: {name} is {f['dtype']}{f['shape']} here, "
                         f"{e['dtype']}{e['shape']} in the artifact")
        elif "sha256" in f and f["sha256"] != e["sha256"]:
            lines.append(f"values: {name} differs from the artifact's model")
    return lines


def refuse_other_model(path: str | os.PathLike, differences: list[str], shown: int = 20) -> None:
    """Raise ArtifactError listing the parameters that differ, if any do."""
    if not differences:
        return
    casts = [_DTYPE_PATTERN.fullmatch(line) for line in differences]
    if all(casts):
        found = "/".join(sorted({m["here"] for m in casts}))
        saved = "/".join(sorted({m["saved"] for m in casts}))
        raise ArtifactError(
            f"the artifact {os.fspath(path)} was quantized from a {saved} model with these parameters' "
            f"shapes, and this model is {found} ({len(differences)} parameter(s), e.g. {casts[0]['name']}). If it "
            f"is the same model, run it in {saved} (cast it back before loading), or quantize it again in {found}.")
    more = f"\n  ... and {len(differences) - shown} more" if len(differences) > shown else ""
    raise ArtifactError(
        f"the artifact {os.fspath(path)} was made from a different model ({len(differences)} "
        f"parameter(s) differ):\n  " + "\n  ".join(differences[:shown]) + more +
        "\nLoad it into the model it was quantized from (same weights), or quantize this model again.")


# ---------------------------------------------------------------------------------------------
# Writing


def to_json(value: Any) -> Any:
    """Search records (dicts keyed by tuples, tensors, tuples) as plain JSON values."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_json(v) for k, v in value.items()}
        return [[*to_json(k if isinstance(k, tuple) else (k,)), to_json(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return value


def layer_tensors(layers: Mapping[str, QuantizedLinear]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[dict[str, str], ...]]]:
    """Every layer's tensors under a stored name, and per layer one {argument: stored name} per
    timestep bucket (one in all for a layer without buckets), as `layer_manifest` takes them.

    A tensor object shared by several layers is stored once, under the name of the first layer
    (in path order) that uses it.
    """
    stored: dict[str, torch.Tensor] = {}
    by_identity: dict[int, str] = {}
    names: dict[str, tuple[dict[str, str], ...]] = {}

    def store(key: str, layer: QuantizedLinear) -> dict[str, str]:
        found = {}
        for arg, t in layer.saved_tensors().items():
            if t is None:
                continue
            name = by_identity.get(id(t))
            if name is None:
                name = by_identity[id(t)] = f"{key}.{arg}"
                stored[name] = t.detach().to("cpu").contiguous()
            found[arg] = name
        return found

    for path in sorted(layers):
        layer = layers[path]
        if layer.buckets is None:
            names[path] = (store(path, layer),)
        else:
            names[path] = tuple(store(f"{path}.b{b}", bucket) for b, bucket in enumerate(layer.buckets.layers))
    return stored, names


def ordered_decisions(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's {layer path: decision} in the saved model's order (`layer_order`; the
    JSON's sorted order in artifacts written without one)."""
    decisions = manifest["decisions"]
    order = [p for p in manifest.get("layer_order", []) if p in decisions]
    return {p: decisions[p] for p in [*order, *decisions]}


def layer_manifest(layer: QuantizedLinear, tensor_names: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """A layer's manifest entry; `tensor_names`: per timestep bucket {argument: stored name}, as
    `layer_tensors` gives them (none: an entry without tensors, for explain). A layer with timestep
    buckets is its first bucket's entry plus "timestep_edges" and "buckets" (every bucket's entry)."""
    names = list(tensor_names) or [{} for _ in (layer.buckets.layers if layer.buckets is not None else (layer,))]
    w = layer.weight
    entry = {"w_format": w.format.name, "in_features": w.in_features, "w_group": w.group,
             "a_format": layer.a_format.name,
             "a_group": layer.a_group, "method": layer.method, "notes": list(layer.notes),
             "details": to_json({**layer.details, **({"fold": layer.fold.to_json()} if layer.fold else {})}),
             "tensors": names[0]}
    if layer.buckets is not None:
        entry["timestep_edges"] = list(layer.buckets.edges)
        entry["buckets"] = [layer_manifest(b, (n,)) for b, n in zip(layer.buckets.layers, names)]
    return entry


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` into a temporary sibling of `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); an artifact gets the permissions of any new file.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_artifact(path: str | os.PathLike, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                   verify: bool = False) -> Path:
    """Write `tensors` and `manifest` (to which the tensors' hashes are added) to `path`.

    verify: first check the manifest and tensors as loading will (`check_manifest`, `check_tensors`),
    and write nothing when they fail: `save` never writes an artifact that its own load refuses.

    A path ending in ".safetensors" becomes one file; any other path a directory with
    manifest.json and tensors.safetensors (it may exist empty; an existing artifact directory keeps
    its other files).
    The result is byte-identical for identical inputs.
    """
    path = Path(path)
    manifest = seal({**manifest, "tensor_sha256": {k: tensor_sha256(t) for k, t in sorted(tensors.items())}})
    text = json.dumps(manifest, sort_keys=True, indent=1)
    if verify:
        try:
            check_tensors(check_manifest(json.loads(text), manifest["format_version"]), tensors)
        except ManifestError as error:
            raise RuntimeError(f"clq: nothing was written to {path}: the artifact would not load back ({error}). "
                               f"This is a defect of clq-compile; please report it with the model and options."
                               ) from error
    refuse_target(path)
    if path.suffix == ".safetensors":
        _atomic_write(path, safetensors.torch.save(tensors, metadata={MANIFEST_KEY: text}))
        return path
    data = safetensors.torch.save(tensors)
    if path.is_dir():
        # The directory may hold the user's own files too (an evaluation beside the artifact):
        # replace only the artifact's two files, each atomically, the manifest last. Interrupted
        # between the two, the old manifest's hashes refuse the new tensors: never a mixed model.
        _atomic_write(path / TENSORS_FILE, data)
        _atomic_write(path / MANIFEST_FILE, text.encode())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        _atomic_write(staging / TENSORS_FILE, data)
        _atomic_write(staging / MANIFEST_FILE, text.encode())
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def refuse_target(path: Path) -> None:
    """ArtifactError unless an artifact may be written at `path`: a new path, or an artifact written
    before (a .safetensors file whose header holds a clq manifest; an empty directory, or one holding
    manifest.json). Never the user's own files: a model's weights in .safetensors, say."""
    if path.suffix == ".safetensors":
        if path.is_dir():
            raise ArtifactError(f"{path} is a directory; pass a file path ending in .safetensors or a "
                                f"directory path without that suffix")
        if path.exists() and not is_artifact_file(path):
            raise ArtifactError(f"{path} exists and is not a clq-compile artifact (its header holds no clq "
                                f"manifest: a model's own weights, say); choose another path")
    elif path.exists() and not (path.is_dir() and ((path / MANIFEST_FILE).is_file() or not any(path.iterdir()))):
        raise ArtifactError(f"{path} exists and is neither empty nor a clq-compile artifact directory; choose "
                            f"another path (or end it in .safetensors to write a single file)")


def is_artifact_file(path: Path) -> bool:
    """Whether the file at `path` is a safetensors file whose metadata holds a clq manifest (only
    the header is read)."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return MANIFEST_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (not safetensors at all, unreadable, truncated: not an artifact)
        return False


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Artifact:
    """A read artifact: its manifest and (when asked for) its tensors, hashes checked."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] | None = None

    def layers(self, device: torch.device | str | None = None) -> dict[str, QuantizedLinear]:
        """The quantized layers, on `device`; tensors stored once stay shared after loading."""
        if self.tensors is None:
            raise RuntimeError("read the artifact with tensors=True to build its layers")
        moved = {k: t.to(device) if device is not None else t for k, t in self.tensors.items()}

        def build(entry: dict[str, Any]) -> QuantizedLinear:
            t = {arg: moved[name] for arg, name in entry["tensors"].items()}
            weight = PackedWeight(t["qweight"], t["w_scale"], t.get("w_zero"), get_format(entry["w_format"]),
                                  entry["in_features"], entry["w_group"])
            fold = entry.get("details", {}).get("fold")
            online = ActivationTransform(t.get("act_mul"), t.get("act_perm"), t.get("act_rotation"))
            lowrank = LowRank(t["lr_down"], t["lr_up"]) if "lr_down" in t else None
            return QuantizedLinear(weight, get_format(entry["a_format"]), entry["a_group"], online,
                                   t.get("bias"), entry["method"], list(entry["notes"]),
                                   fold=FoldDecision.from_json(fold) if fold else None, lowrank=lowrank)

        layers = {}
        for path, entry in self.manifest["layers"].items():
            if "buckets" in entry:
                # The entry's own fields are its first bucket's (manifest_schema checks it).
                buckets = TimestepBuckets(tuple(entry["timestep_edges"]), tuple(build(b) for b in entry["buckets"]))
                layers[path] = dataclasses.replace(buckets.layers[0], buckets=buckets, method=entry["method"],
                                                   notes=list(entry["notes"]))
            else:
                layers[path] = build(entry)
        return layers


def _corrupt(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path} is not a readable clq-compile artifact: {what}. It may be truncated or "
                         f"corrupted (an interrupted copy?); save it again from the quantized model.")


def _json(path: Path, raw: bytes | str, what: str) -> Any:
    """`raw` parsed as JSON; `what` ("its header", "its manifest") names it in the error."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise _corrupt(path, f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise _corrupt(path, f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise _corrupt(path, f"{what} is nested too deeply to be read") from None


def _header(path: Path, raw: bytes) -> dict[str, Any]:
    """A safetensors header's JSON object, each entry's form checked."""
    header = _json(path, raw, "its header")
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _corrupt(path, "its header's __metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise _corrupt(path, f"its header entry {name!r} must have the keys data_offsets, dtype and "
                                 f"shape; it has {keys}")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"its header entry {name!r} has data_offsets {offsets!r:.60}, not [start, end]")
    return header


def _check_safetensors_sizes(path: Path, data: bytes) -> None:
    """Refuse a safetensors file whose header and tensor sizes do not add up to its length."""
    if len(data) < 8:
        raise _corrupt(path, f"{len(data)} bytes, shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise _corrupt(path, f"the header says {length} bytes of JSON but the file has {len(data) - 8}")
    header = _header(path, data[8:8 + length])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != len(data):
        raise _corrupt(path, f"the tensors need {8 + length + end} bytes, the file has {len(data)}")


def _locate(path: Path) -> tuple[str | bytes, Path]:
    """The manifest's JSON text and the file holding the tensors (reading the header only)."""
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}; save one with clq_compile.save(qt, path)")
    if path.is_dir():
        manifest_file = path / MANIFEST_FILE
        if not manifest_file.is_file():
            raise _corrupt(path, f"the directory has no {MANIFEST_FILE}")
        return manifest_file.read_bytes(), path / TENSORS_FILE
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise _corrupt(path, "the safetensors header is cut off")
        header = _header(path, f.read(length))
    text = header.get("__metadata__", {}).get(MANIFEST_KEY)
    if text is None:
        raise ArtifactError(f"{path} is a safetensors file without a clq-compile manifest: not an "
                            f"artifact saved by clq_compile.save")
    return text, path


def _parse_manifest(path: Path, text: str | bytes) -> dict[str, Any]:
    """The manifest from its JSON text: format, version, hash, schema and consistency checked."""
    manifest = _json(path, text, "its manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} does not hold a clq-compile manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path} has artifact format version {version!r:.40}; this clq-compile reads versions "
            f"{' and '.join(map(str, READABLE_VERSIONS))}. Quantize the model again with this version, or "
            f"install the clq-compile version {manifest.get('package_version')!r:.40} that wrote it.")
    try:
        recorded = seal(manifest)["manifest_sha256"]
    except RecursionError:
        raise _corrupt(path, "its manifest is nested too deeply to be read") from None
    if version >= 2 and manifest.get("manifest_sha256") != recorded:
        raise ArtifactError(
            f"{path}: its manifest does not match its recorded hash (manifest_sha256), so it was "
            f"changed after it was saved; refusing to use it. Save the artifact again from the "
            f"quantized model (do not edit artifacts by hand).")
    try:
        manifest = check_manifest(manifest, version)
    except ManifestError as error:
        raise ArtifactError(f"{path} has a manifest that clq-compile does not accept: {error}. It was not "
                            f"written by clq_compile.save as it is; save it again from the quantized model.") from None
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at `path`, checked (see _parse_manifest); tensors not read."""
    path = Path(path)
    return _parse_manifest(path, _locate(path)[0])


def read_artifact(path: str | os.PathLike) -> Artifact:
    """The manifest and the tensors of the artifact at `path`, every tensor's hash and form checked."""
    path = Path(path)
    text, tensors_file = _locate(path)
    manifest = _parse_manifest(path, text)
    if not tensors_file.is_file():
        raise _corrupt(path, f"{tensors_file.name} is missing")
    data = tensors_file.read_bytes()
    _check_safetensors_sizes(tensors_file, data)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error type for malformed files
        raise _corrupt(path, f"safetensors could not read it ({error})") from None
    expected = manifest["tensor_sha256"]
    if set(expected) != set(tensors):
        raise _corrupt(path, "the stored tensors do not match the manifest's list")
    bad = sorted(k for k, t in tensors.items() if tensor_sha256(t) != expected[k])
    if bad:
        raise _corrupt(path, f"{len(bad)} tensor(s) do not match their recorded hash, e.g. {bad[0]}")
    try:
        check_tensors(manifest, tensors)
    except ManifestError as error:
        raise ArtifactError(f"{path} holds tensors that contradict its manifest: {error}. Save it again "
                            f"from the quantized model.") from None
    return Artifact(path, manifest, tensors)


# The artifacts live loaded models hold, by the path they were read from: a loaded model's options
# are parsed against its own manifest, read once, never against what the file holds by then.
_HELD: weakref.WeakValueDictionary[str, Artifact] = weakref.WeakValueDictionary()


def _key(path: str | os.PathLike) -> str:
    return os.path.abspath(path)


def hold(artifact: Artifact) -> Artifact:
    """Make `artifact` what `held` answers for its path for as long as something (a loaded model's
    state) keeps it; a later read of the same path held in turn replaces it (load() reads afresh).

    So while a model loaded from a path lives, `options={"load": path}` means the artifact read
    then, even if the file has changed since: the loaded model never changes under its user.
    """
    _HELD[_key(artifact.path)] = artifact
    return artifact


def held(path: str | os.PathLike) -> Artifact | None:
    """The artifact read from `path` that a live loaded model holds, if any (see `hold`)."""
    return _HELD.get(_key(path))


def loaded_decision(path: str, policy: Decision, artifact_path: str, layer: QuantizedLinear,
                    quantizers: tuple[QuantizerConfig, ...]) -> Decision:
    """The decision for layer `path`, held by the artifact at `artifact_path`, given what the model's
    own `policy` decides for it: an artifact may only hold layers the policy would quantize, in
    formats the options give the layer's role in this model (`quantizers`; conditioning_bits, and
    adatsq's modes), every timestep bucket of it."""
    if not policy.quantize:
        raise ArtifactError(
            f"the artifact {artifact_path} holds a quantized {path}, but this model's policy keeps that "
            f"layer ({policy.reason}); refusing the artifact. Quantize the model again with this version.")
    expected = {(q.weight.format.name, q.activation.format.name) for q in quantizers}
    for held in (layer.buckets.layers if layer.buckets is not None else (layer,)):
        held_as = (held.weight.format.slot.name, held.a_format.name)
        if held_as not in expected:
            raise ArtifactError(
                f"the artifact {artifact_path} holds {path} as {'/'.join(held_as)} weights/activations, but "
                f"its options give that layer's role in this model {' or '.join('/'.join(e) for e in sorted(expected))}; "
                f"refusing the artifact.")
    return Decision(True, "loaded from the artifact")
