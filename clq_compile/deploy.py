"""Quantize once, load anywhere: `save`, `load` and `release_weights`.

    clq_compile.save(qt, "pixart-w4a4.safetensors")          # after calibrating(qt)
    qt = clq_compile.load(transformer, "pixart-w4a4.safetensors")   # no calibration; runs quantized

The artifact's format is described in artifact.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .artifact import (FORMAT, FORMAT_VERSION, ArtifactError, to_json, fingerprint, fingerprint_differences,
                       hold, layer_manifest, layer_tensors, read_artifact, refuse_other_model, write_artifact)
from .calibration import model_state
from .checks import nothing_selected
from .options import parse_options
from .state import QUANTIZED, ModelState, loaded_state


def _model_fingerprint(qt: torch.nn.Module, state: ModelState) -> dict[str, dict]:
    """The fingerprint of the model `state` was quantized from (kept once taken)."""
    if state.fingerprint is None:
        state.fingerprint = fingerprint(qt._orig_mod.named_parameters())
    return state.fingerprint


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the artifact; got {type(path).__name__}")
    if not os.fspath(path):
        raise ValueError("path is empty; give the path of the artifact (a .safetensors file or a directory)")


def _check_linear_layers(module: torch.nn.Module, manifest: Mapping[str, Any], source: str) -> None:
    """Refuse an artifact's layers that are not nn.Linear modules of `module` with the layer's shape.

    An artifact names its layers by module path; before any weight of `module` is touched, each
    path must lead to a linear layer whose weight is [out_features, in_features] of the layer's
    decision (which the manifest's checks tie to its tensors' shapes).
    """
    for path in sorted(manifest["layers"]):
        try:
            target = module.get_submodule(path)
        except AttributeError:
            target = None
        decision = manifest["decisions"][path]
        shape = (decision["out_features"], decision["in_features"])
        if not isinstance(target, torch.nn.Linear) or (target.out_features, target.in_features) != shape:
            found = "nothing" if target is None else (
                f"a Linear {target.out_features}x{target.in_features}" if isinstance(target, torch.nn.Linear)
                else f"a module of type {type(target).__name__}")
            raise ArtifactError(
                f"the artifact {source} holds a quantized layer {path} of {shape[0]}x{shape[1]}, "
                f"but in this model {path} is {found}, not a linear layer of that shape; refusing it. "
                f"Load it into the model it was quantized from.")


def save(qt: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the quantized layers of `qt` (compiled with backend="clq", quantized) to `path`.

    A path ending in ".safetensors" becomes one file; any other path a directory (manifest.json
    and tensors.safetensors). The write is atomic: an existing artifact at `path` is replaced only
    once the new one is complete (in a directory, file by file; the directory's other files stay).
    The same model, calibration inputs and options give a byte-identical artifact. Returns the
    path written.
    """
    from clq_compile import __version__

    _check_path(path)
    state = model_state(qt)
    if not state.options.quantizes:
        raise ValueError(f"bits={state.options.bits} quantizes nothing, so there is nothing to save")
    if state.phase != QUANTIZED or not state.layers:
        nothing = nothing_selected(state, qt._orig_mod)
        raise RuntimeError(f"nothing to save: {nothing}" if nothing else
                           "nothing to save yet: calibrate the model first (with clq_compile.calibrating(qt)) "
                           "or call it once to quantize data-free")
    state.refuse_changed_weights(contents=True)
    tensors, names = layer_tensors(state.layers)
    decisions = state.site_decisions()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "options": to_json(state.options.quantization_dict()),
        "recipe": state.options.recipe,
        "calibrated": state.calibrations > 0 or bool(state.artifact and state.artifact.manifest["calibrated"]),
        "fingerprint": _model_fingerprint(qt, state),
        "decisions": decisions,
        # The JSON keeps its keys sorted; `explain_artifact` lists the layers in this, the model's, order.
        "layer_order": list(decisions),
        "layers": {p: layer_manifest(state.layers[p], names[p])
                   for p in sorted(state.layers)},
        "errors": {p: float(e) for p, e in sorted(state.errors.items())},
    }
    return write_artifact(path, manifest, tensors, verify=True)


def load(model: torch.nn.Module, path: str | os.PathLike, *, options: Mapping[str, Any] | None = None,
         release_weights: bool = True) -> torch.nn.Module:
    """`model` compiled with backend="clq" and the quantized layers saved at `path`; no calibration.

    The model must be the one the artifact was made from: parameters that differ (missing, extra,
    other shape or values) are listed in the ArtifactError. options: run-time options such as
    {"kernels": "triton"}; any other option must agree with the artifact's. release_weights:
    drop the model's full-precision weights of quantized layers (see `release_weights`), so that
    memory holds the packed weights only; pass False to keep `model` usable as the reference.

    Nothing in the artifact is trusted: it is checked (see artifact.py) before `model` is touched,
    and its layers against the model's own policy when the first call captures the graph; the
    weights are dropped only once every layer has passed (a refused artifact gives them back).
    The artifact is read once: the loaded model never reads it again (the file may change or go).
    """
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(f"load() takes the original, uncompiled model (the one that was quantized); got "
                        f"{type(model).__name__}")
    _check_path(path)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of run-time options such as {{'kernels': 'triton'}}; "
                        f"got {type(options).__name__}")
    if type(release_weights) is not bool:
        raise TypeError(f"release_weights must be True or False; got {release_weights!r:.40}")
    artifact = hold(read_artifact(path))
    opts = parse_options({**(options or {}), "load": path})  # against the held manifest
    refuse_other_model(path, fingerprint_differences(artifact.manifest["fingerprint"],
                                                     fingerprint(model.named_parameters())))
    _check_linear_layers(model, artifact.manifest, opts.load)
    state = loaded_state(model, opts, artifact)
    state.verified.update(name for name, _ in model.named_parameters())
    # The parsed options themselves: the backend and calibrating/explain/save never parse them again.
    qt = torch.compile(model, backend="clq", options=opts)
    if release_weights:
        state.release(model)
    # Writes into the weights kept from now on are refused, as after quantizing (ModelState.watch).
    state.watch({f"{layer}.{kind}": t for layer in state.layers for kind in ("weight", "bias")
                 for t in [getattr(model.get_submodule(layer), kind)] if t is not None})
    return qt


def release_weights(qt: torch.nn.Module) -> int:
    """Drop the full-precision weights of `qt`'s quantized layers; returns how many were dropped.

    Afterwards resident weight memory is the packed size (see memory_report's resident bytes).
    The user's module keeps its parameters' shapes, but their values are gone (NaN): it no longer
    serves as a full-precision reference, and the model cannot be calibrated again. `save(qt)`
    still works: the model's fingerprint is taken before the weights are dropped. A loaded model's
    weights are dropped once its first call has checked the artifact's layers (see `load`).
    """
    state = model_state(qt)
    if state.phase != QUANTIZED or not state.layers:
        nothing = nothing_selected(state, qt._orig_mod)
        raise RuntimeError(f"release_weights() has nothing to release: {nothing}" if nothing else
                           "release_weights() needs a quantized model: calibrate it first, or call it once")
    _model_fingerprint(qt, state)
    if state.artifact is not None:
        _check_linear_layers(qt._orig_mod, state.artifact.manifest, state.options.load)
    return state.release(qt._orig_mod)
