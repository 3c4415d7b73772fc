"""The artifact manifest's schema, and the consistency of what it claims.

An artifact comes from outside the process, so nothing in it is used before it is checked:

1. *Shape of the JSON* (`check_manifest`): every key known, every value of the expected JSON type
   and range, nothing missing. Explicit checker functions below, one per kind of value.
2. *Agreement inside the manifest* (`check_manifest`): the options parse as backend options; every
   quantized layer has a decision that says "quantize" with the same in_features, its number
   formats, groups and zero points are those the options give, its weight is a 2-D parameter [out, in] of the
   fingerprinted model, and every tensor it names is stored.
3. *Agreement with the tensors* (`check_tensors`): each layer's tensors have the dtype and shape its
   scalars imply (qweight as its format stores it: int4 uint8 [N, K/2], int8 int8 [N, K], int3
   uint8 [N, 3K/8], e4m3 float8_e4m3fn [N, K]; w_scale float32 [N, K/group or 1],
   w_zero int8 like w_scale, bias [N], act_mul [K], act_perm a permutation of range(K), act_rotation
   [b, b] with b dividing K, a low-rank branch lr_down [r, K] with lr_up [N, r]), floating values
   are finite, and no stored tensor is unused.

The model itself is checked in deploy.py (each layer is an nn.Linear of that shape) and when a
graph is captured (the model's own policy would quantize it). Every failure is a `ManifestError`
with the JSON path of the offending value, e.g. manifest["layers"]["blocks.0.proj"]["w_format"].

Format version 6 may quantize a layer per timestep bucket: its entry (its first bucket's) adds
"timestep_edges" (finite, strictly ascending) and "buckets" (one layer entry per bucket, one more
than the edges, without low-rank branches), each bucket checked like a layer (`_units`).
Format version 5 may name the twin-log weight formats tlq3 / tlq4 (recipe lrq-dit; per-row
parameters w_scale float32 [N, 4], no zero points, no groups); version 4 did not.
Format version 4 may give a layer a low-rank branch (tensors lr_down, lr_up); version 3 did not.
Format version 3 names each layer's number formats ("w_format": "int4", "a_format": "int8");
versions 1 and 2 gave bit counts ("w_bits": 4, "a_bits": 8, 16 for unquantized activations), which
`check_manifest` checks in their own schema and then returns in the current form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any, Callable, Mapping

import torch

from clq_compile.choices import LRQ_RECIPES
from clq_compile.kernels.formats import FORMATS, get_format
from clq_compile.passes.layer import LOWRANK_ARGS, TENSOR_ARGS

Check = Callable[[Any, tuple], None]


def dtype_name(dtype: torch.dtype) -> str:
    """The name the fingerprint and the messages give a dtype: "float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


class ManifestError(ValueError):
    """A manifest value that is malformed or contradicts another: `where` is its JSON path."""

    def __init__(self, keys: tuple, what: str):
        self.where = "manifest" + "".join(f"[{json.dumps(k)}]" for k in keys)
        super().__init__(f"{self.where} {what}")


# ---------------------------------------------------------------------------------------------
# Checkers: each takes a value and its JSON path, and raises ManifestError when it does not fit.


def _string(value: Any, keys: tuple) -> None:
    if not isinstance(value, str):
        raise ManifestError(keys, f"must be a string; got {value!r:.60}")


def _boolean(value: Any, keys: tuple) -> None:
    if type(value) is not bool:
        raise ManifestError(keys, f"must be true or false; got {value!r:.60}")


def _number(value: Any, keys: tuple) -> None:
    if type(value) not in (int, float):
        raise ManifestError(keys, f"must be a number; got {value!r:.60}")


def _integer(minimum: int) -> Check:
    def check(value: Any, keys: tuple) -> None:
        if type(value) is not int or value < minimum:
            raise ManifestError(keys, f"must be an integer >= {minimum}; got {value!r:.60}")
    return check


def _one_of(*choices: Any) -> Check:
    def check(value: Any, keys: tuple) -> None:
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ManifestError(keys, f"must be one of {', '.join(map(repr, choices))}; got {value!r:.60}")
    return check


def _optional(inner: Check) -> Check:
    def check(value: Any, keys: tuple) -> None:
        if value is not None:
            inner(value, keys)
    return check


def _sha256(value: Any, keys: tuple) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ManifestError(keys, f"must be a SHA-256 in hexadecimal; got {value!r:.80}")


def _list_of(item: Check) -> Check:
    def check(value: Any, keys: tuple) -> None:
        if not isinstance(value, list):
            raise ManifestError(keys, f"must be a list; got {value!r:.60}")
        for i, v in enumerate(value):
            item(v, keys + (i,))
    return check


def _object(keys: tuple, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(keys, f"must be an object; got {value!r:.60}")
    return value


def _map_of(item: Check) -> Check:
    """An object with any string keys, each value checked by `item`."""
    def check(value: Any, keys: tuple) -> None:
        for k, v in _object(keys, value).items():
            item(v, keys + (k,))
    return check


def _record(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """An object with exactly the `required` keys and any of the `optional` ones."""
    optional = optional or {}

    def check(value: Any, keys: tuple) -> None:
        value = _object(keys, value)
        for k in value:
            if k not in required and k not in optional:
                raise ManifestError(keys + (k,), f"is not a key this version knows (known: "
                                                 f"{', '.join(sorted({**required, **optional}))})")
        for k, item in required.items():
            if k not in value:
                raise ManifestError(keys + (k,), "is missing")
            item(value[k], keys + (k,))
        for k, item in optional.items():
            if k in value:
                item(value[k], keys + (k,))
    return check


def _details(value: Any, keys: tuple) -> None:
    """A search's free-form record; only "fold" is read back: {"producers" or "consumers": [paths]}."""
    if "fold" in _object(keys, value):
        fold = _object(keys + ("fold",), value["fold"])
        if len(fold) != 1 or next(iter(fold)) not in ("producers", "consumers"):
            raise ManifestError(keys + ("fold",), f'must be {{"producers": [...]}} or {{"consumers": [...]}}; '
                                                  f"got {fold!r:.80}")
        _list_of(_string)(*fold.values(), keys + ("fold", *fold))


def _options(value: Any, keys: tuple) -> None:
    """The options that decided the layers: known keys (their values are parsed in check_manifest)."""
    from clq_compile.options import RUNTIME_KEYS, Options

    known = {f.name for f in fields(Options) if f.name not in RUNTIME_KEYS}
    for k in _object(keys, value):
        if k not in known:
            raise ManifestError(keys + (k,), "is not an option this version knows")


def _layer_fields(optional_tensors: tuple[str, ...]) -> dict[str, Callable]:
    return {"in_features": _integer(1), "w_group": _optional(_integer(1)), "a_group": _optional(_integer(1)),
            "method": _string, "notes": _list_of(_string), "details": _details,
            "tensors": _record({"qweight": _string, "w_scale": _string}, {a: _string for a in optional_tensors})}


# The recipes whose layers may hold non-uniform (twin-log) weights.
NON_UNIFORM_RECIPES = LRQ_RECIPES
_OP_TENSORS = tuple(a for a in TENSOR_ARGS if a not in ("qweight", "w_scale"))
_WEIGHT_FORMATS = tuple(name for name, f in FORMATS.items() if f.quantizes)
_FORMAT_FIELDS = {"w_format": _one_of(*_WEIGHT_FORMATS), "a_format": _one_of(*FORMATS)}
# Version 4 adds the low-rank branch's tensors.
_LAYER = _record({**_layer_fields(_OP_TENSORS + LOWRANK_ARGS), **_FORMAT_FIELDS})
_V3_LAYER = _record({**_layer_fields(_OP_TENSORS), **_FORMAT_FIELDS})
_LEGACY_LAYER = _record({**_layer_fields(_OP_TENSORS), "w_bits": _one_of(4, 8), "a_bits": _one_of(4, 8, 16)})

_FIELDS = {
    "format": _string, "format_version": _integer(1), "package_version": _string, "options": _options,
    "recipe": _string, "calibrated": _boolean,
    "fingerprint": _map_of(_record({"shape": _list_of(_integer(0)), "dtype": _string, "sha256": _sha256})),
    "decisions": _map_of(_record({"role": _string, "out_features": _integer(1), "in_features": _integer(1),
                                  "quantize": _boolean, "reason": _string})),
    "layers": _map_of(_LAYER), "errors": _map_of(_number), "tensor_sha256": _map_of(_sha256),
}
_ORDER = {"layer_order": _list_of(_string)}  # optional: explain_artifact's row order
# Version 1 had no hash of the manifest itself; versions 1 and 2 gave bit counts, not formats.
_LEGACY = {**_FIELDS, "layers": _map_of(_LEGACY_LAYER)}
_SCHEMAS = {1: _record(_LEGACY, _ORDER), 2: _record({**_LEGACY, "manifest_sha256": _sha256}, _ORDER),
            3: _record({**_FIELDS, "layers": _map_of(_V3_LAYER), "manifest_sha256": _sha256}, _ORDER),
            4: _record({**_FIELDS, "manifest_sha256": _sha256}, _ORDER)}
_SCHEMAS[5] = _SCHEMAS[4]  # version 5 adds the twin-log weight formats (checked in check_manifest)
# Version 6: a layer quantized per timestep bucket adds its bucket edges and every bucket's entry.
_BUCKETED_LAYER = _record({**_layer_fields(_OP_TENSORS + LOWRANK_ARGS), **_FORMAT_FIELDS},
                          {"timestep_edges": _list_of(_number), "buckets": _list_of(_LAYER)})
_SCHEMAS[6] = _record({**_FIELDS, "layers": _map_of(_BUCKETED_LAYER), "manifest_sha256": _sha256}, _ORDER)
# What a layer's first bucket must repeat at the top of its entry.
_BUCKET_SHARED = ("w_format", "a_format", "in_features", "w_group", "a_group", "tensors")


def _units(path: str, layer: Mapping[str, Any]) -> list[tuple[tuple, Mapping[str, Any]]]:
    """(keys, entry) of what runs for a layer: the layer itself, or each of its timestep buckets.
    Raises ManifestError when the buckets and their edges disagree."""
    keys = ("layers", path)
    if "buckets" not in layer and "timestep_edges" not in layer:
        return [(keys, layer)]
    if "buckets" not in layer or "timestep_edges" not in layer:
        raise ManifestError(keys, "gives timestep buckets without their edges, or edges without buckets")
    edges, buckets = layer["timestep_edges"], layer["buckets"]
    if len(buckets) != len(edges) + 1 or len(edges) < 1:
        raise ManifestError(keys + ("buckets",), f"holds {len(buckets)} buckets for {len(edges)} edges; a "
                                                 f"layer needs one bucket more than edges, and at least one edge")
    if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ManifestError(keys + ("timestep_edges",), f"are {edges!r:.200}: not finite and strictly ascending")
    for k in _BUCKET_SHARED:
        if layer[k] != buckets[0][k]:
            raise ManifestError(keys + (k,), f"is {layer[k]!r:.200} but the layer's first bucket has {buckets[0][k]!r:.200}")
    for b, bucket in enumerate(buckets):
        if bucket["in_features"] != layer["in_features"]:
            raise ManifestError(keys + ("buckets", b, "in_features"), f"is {bucket['in_features']}, not the layer's "
                                                                      f"{layer['in_features']}")
        if any(a in bucket["tensors"] for a in LOWRANK_ARGS):
            raise ManifestError(keys + ("buckets", b, "tensors"), "names a low-rank branch, which buckets do not keep")
    return [(keys + ("buckets", b), bucket) for b, bucket in enumerate(buckets)]


def _current_form(manifest: dict[str, Any], version: int) -> dict[str, Any]:
    """A schema-checked manifest of `version` with its layers in the current form (version 3's
    layers are version 4's without a low-rank branch)."""
    if version >= 3:
        return manifest

    def formats(layer: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in layer.items() if k not in ("w_bits", "a_bits")}
        return {**rest, "w_format": f"int{layer['w_bits']}",
                "a_format": "none" if layer["a_bits"] == 16 else f"int{layer['a_bits']}"}

    return {**manifest, "layers": {p: formats(layer) for p, layer in manifest["layers"].items()}}


# ---------------------------------------------------------------------------------------------
# The checks


def check_manifest(manifest: dict[str, Any], version: int) -> dict[str, Any]:
    """Refuse a manifest of format `version` that is malformed or contradicts itself (steps 1-2);
    return it in the current version's form."""
    from clq_compile.options import parse_options

    _SCHEMAS[version](manifest, ())
    manifest = _current_form(manifest, version)
    try:
        options = parse_options(manifest["options"])
    except (TypeError, ValueError) as error:
        raise ManifestError(("options",), f"are not valid options: {error}") from None
    if manifest["recipe"] != options.recipe:
        raise ManifestError(("recipe",), f"is {manifest['recipe']!r} but the options say {options.recipe!r}")
    if not options.quantizes and manifest["layers"]:
        raise ManifestError(("layers",), f"holds quantized layers, but bits={options.bits!r} quantizes none")
    policy = options.policy()
    for path, layer in manifest["layers"].items():
        keys = ("layers", path)
        decision = manifest["decisions"].get(path)
        if decision is None or not decision["quantize"] or decision["in_features"] != layer["in_features"]:
            raise ManifestError(keys, f"is not a layer the artifact decided to quantize with in_features "
                                      f"{layer['in_features']} (its decision: {decision!r:.200})")
        weight = manifest["fingerprint"].get(f"{path}.weight")
        shape = [decision["out_features"], layer["in_features"]]
        if weight is None or weight["shape"] != shape:
            raise ManifestError(keys, f"names no linear weight {shape} of the model: the model's "
                                      f"{path}.weight is {weight['shape'] if weight else 'absent'}")
        units = _units(path, layer)
        if len(units) > 1 and len(units) > options.buckets:
            # Fewer are legal (calibration timesteps that fill fewer buckets, adatsq's unsplit layers).
            raise ManifestError(keys + ("buckets",), f"holds {len(units)} timestep buckets, more than the "
                                                     f"artifact's options quantize with ({options.buckets}: "
                                                     f"timestep_buckets)")
        for unit_keys, unit in units:
            _check_unit(unit_keys, unit, decision["role"], options, policy, version, manifest["tensor_sha256"])
    return manifest


def _check_unit(keys: tuple, layer: Mapping[str, Any], role: str, options, policy, version: int,
                stored: Mapping[str, str]) -> None:
    """Refuse a layer (or one of its timestep buckets) whose formats the options do not give, or
    whose tensors are not stored."""
    fmt = get_format(layer["w_format"])
    if not fmt.uniform and (version < 5 or options.recipe not in NON_UNIFORM_RECIPES):
        raise ManifestError(keys + ("w_format",), f"is {fmt.name!r}, which only recipes "
                            f"{' and '.join(NON_UNIFORM_RECIPES)} write, from format version 5 (this is "
                            f"version {version}, recipe {options.recipe!r})")
    # A layer's formats follow from the options and its role (conditioning_bits; adatsq's modes).
    held = {**layer, "w_format": fmt.slot.name}  # tlq4 takes int4's place
    mismatches = []
    for quantizer in policy.layer_quantizers(role):
        expected = {"w_format": quantizer.weight.format.name, "a_format": quantizer.activation.format.name,
                    "w_group": quantizer.weight.group, "a_group": quantizer.activation.group}
        mismatches.append(next(((k, v) for k, v in expected.items() if held[k] != v), None))
        if mismatches[-1] is None:
            break
    else:
        k, v = mismatches[0]
        raise ManifestError(keys + (k,), f"is {layer[k]!r} but the artifact's options give {v!r}")
    if ("w_zero" in layer["tensors"]) == options.weight_symmetric:
        raise ManifestError(keys + ("tensors",), "has a w_zero only when weights are asymmetric "
                                                 f"(weight_symmetric={options.weight_symmetric})")
    for arg, name in layer["tensors"].items():
        if name not in stored:
            raise ManifestError(keys + ("tensors", arg), f"names {name!r}, which is not stored")


def _expected_tensors(layer: Mapping[str, Any], n: int) -> dict[str, tuple[tuple[torch.dtype, ...], tuple]]:
    """{argument: (allowed dtypes, shape)} of a layer's tensors from its scalars."""
    k, group = layer["in_features"], layer["w_group"]
    floating = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    fmt = get_format(layer["w_format"])
    scale_shape = fmt.scale_shape(n, k, group or None)
    dtype, width = fmt.storage(k)
    return {"qweight": ((dtype,), (n, width)),
            "w_scale": ((torch.float32,), scale_shape), "w_zero": ((torch.int8,), scale_shape),
            "bias": (floating, (n,)), "act_mul": (floating, (k,)), "act_perm": ((torch.int64,), (k,)),
            "act_rotation": (floating, None), "lr_down": (floating, None), "lr_up": (floating, None)}


def _free_shape(arg: str, t: torch.Tensor, k: int, n: int, rank: int) -> tuple[bool, str]:
    """Whether `t` fits argument `arg`, whose shape the scalars do not fix, and what would."""
    if arg == "act_rotation":  # square blocks whose size divides K
        return t.dim() == 2 and t.shape[0] == t.shape[1] > 0 and k % t.shape[0] == 0, f"[b, b] with b dividing {k}"
    shape = (rank, k) if arg == "lr_down" else (n, rank)
    return t.dim() == 2 and tuple(t.shape) == shape and 1 <= rank <= min(n, k), f"{list(shape)} (rank 1..{min(n, k)})"


def check_tensors(manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse layers whose tensors are not what their scalars say (step 3)."""
    used: set[str] = set()
    units = [(keys, layer, manifest["decisions"][path]["out_features"])
             for path, entry in manifest["layers"].items() for keys, layer in _units(path, entry)]
    for keys, layer, n in units:
        k = layer["in_features"]
        fmt = get_format(layer["w_format"])
        problem = fmt.width_problem(k)
        if problem:
            raise ManifestError(keys + ("w_format",), f"cannot store in_features {k}: {problem}")
        for what, g in (("w_group", layer["w_group"]), ("a_group", layer["a_group"])):
            if g and k % g:
                raise ManifestError(keys + (what,), f"needs in_features divisible by {g}; it is {k}")
        try:
            fmt.scale_shape(n, k, layer["w_group"] or None)
        except ValueError as e:
            raise ManifestError(keys + ("w_group",), str(e)) from None
        if "w_zero" in layer["tensors"] and not fmt.asymmetric:
            raise ManifestError(keys + ("tensors", "w_zero"), f"{fmt.name} weights have no zero points")
        expected = _expected_tensors(layer, n)
        branch = [a for a in LOWRANK_ARGS if a in layer["tensors"]]
        if branch and len(branch) != len(LOWRANK_ARGS):
            raise ManifestError(keys + ("tensors",), f"names {branch[0]} without {set(LOWRANK_ARGS) - set(branch)}: "
                                                     f"a low-rank branch needs both")
        down = tensors[layer["tensors"]["lr_down"]] if branch else None
        rank = down.shape[0] if down is not None and down.dim() == 2 else 0
        for arg, name in layer["tensors"].items():
            t, (dtypes, shape) = tensors[name], expected[arg]
            used.add(name)
            if shape is None:
                fits, want = _free_shape(arg, t, k, n, rank)
            else:
                fits, want = tuple(t.shape) == shape, str(list(shape))
            if t.dtype not in dtypes or not fits:
                raise ManifestError(keys + ("tensors", arg),
                                    f"names {name!r}, a {dtype_name(t.dtype)}{list(t.shape)} tensor; the layer's "
                                    f"scalars need {' or '.join(map(dtype_name, dtypes))}{want}")
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                raise ManifestError(keys + ("tensors", arg), f"names {name!r}, which holds Inf or NaN")
            if arg == "act_perm" and not torch.equal(torch.sort(t).values, torch.arange(k)):
                raise ManifestError(keys + ("tensors", arg), f"names {name!r}, which is not a permutation of 0..{k - 1}")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ManifestError(("tensor_sha256", unused[0]), f"is stored but no layer uses it ({len(unused)} unused)")
