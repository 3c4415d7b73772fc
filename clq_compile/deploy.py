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

from clq_compile.passes.layer import QuantizedLinear

from .artifact import (FORMAT, FORMAT_VERSION, ArtifactError, to_json, fingerprint, fingerprint_differences,
                       layer_manifest, layer_tensors, read_artifact, refuse_other_model, write_artifact)
from .calibration import model_state
from .checks import nothing_selected
from .options import parse_options
from .state import QUANTIZED, ModelState, state_for_module


def _model_fingerprint(qt: torch.nn.Module, state: ModelState) -> dict[str, dict]:
    """The fingerprint of the model `state` was quantized from (kept once taken)."""
    if state.fingerprint is None:
        state.fingerprint = fingerprint(qt._orig_mod.named_parameters())
    return state.fingerprint


def _check_path(path: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the artifact; got {type(path).__name__}")


def _check_linear_layers(module: torch.nn.Module, layers: Mapping[str, QuantizedLinear], source: str) -> None:
    """Refuse layers that are not nn.Linear modules of `module` with the layer's shape.

    An artifact names its layers by module path; before any weight of `module` is touched, each
    path must lead to a linear layer whose weight is [out_features, in_features] of the packed one.
    """
    for path, layer in sorted(layers.items()):
        try:
            target = module.get_submodule(path)
        except AttributeError:
            target = None
        shape = (layer.weight.qweight.shape[0], layer.weight.in_features)
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
    state.refuse_changed_weights()
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
        "layers": {p: layer_manifest(state.layers[p], names[p]) for p in sorted(state.layers)},
        "errors": {p: float(e) for p, e in sorted(state.errors.items())},
    }
    return write_artifact(path, manifest, tensors)


def load(model: torch.nn.Module, path: str | os.PathLike, *, options: Mapping[str, Any] | None = None,
         release_weights: bool = True) -> torch.nn.Module:
    """`model` compiled with backend="clq" and the quantized layers saved at `path`; no calibration.

    The model must be the one the artifact was made from: parameters that differ (missing, extra,
    other shape or values) are listed in the ArtifactError. options: run-time options such as
    {"kernels": "triton"}; any other option must agree with the artifact's. release_weights:
    drop the model's full-precision weights of quantized layers (see `release_weights`), so that
    memory holds the packed weights only; pass False to keep `model` usable as the reference.

    Nothing in the artifact is trusted: it is checked (see artifact.py) before `model` is touched.
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
    opts = parse_options({**(options or {}), "load": path})
    artifact = read_artifact(path)
    refuse_other_model(path, fingerprint_differences(artifact.manifest["fingerprint"],
                                                     fingerprint(model.named_parameters())))
    _check_linear_layers(model, artifact.layers(), os.fspath(path))
    state = state_for_module(model, opts, artifact)
    state.verified.update(name for name, _ in model.named_parameters())
    qt = torch.compile(model, backend="clq", options={**(options or {}), "load": opts.load})
    if release_weights:
        _release(model, state)
    return qt


def _release(module: torch.nn.Module, state: ModelState) -> int:
    if state.options.load is not None:
        _check_linear_layers(module, state.layers, state.options.load)
    released = 0
    for layer_path in sorted(state.layers):
        name = f"{layer_path}.weight"
        if name in state.released:
            continue
        weight = module.get_submodule(layer_path).weight
        # Same Parameter object (graphs and the state find it by identity), same shape, dtype and
        # device; its values are one NaN, so running the original module shows it at once.
        weight.data = torch.full((1,), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        state.released.add(name)
        released += 1
    return released


def release_weights(qt: torch.nn.Module) -> int:
    """Drop the full-precision weights of `qt`'s quantized layers; returns how many were dropped.

    Afterwards resident weight memory is the packed size (see memory_report's resident bytes).
    The user's module keeps its parameters' shapes, but their values are gone (NaN): it no longer
    serves as a full-precision reference, and the model cannot be calibrated again. `save(qt)`
    still works: the model's fingerprint is taken before the weights are dropped.
    """
    state = model_state(qt)
    if state.phase != QUANTIZED or not state.layers:
        nothing = nothing_selected(state, qt._orig_mod)
        raise RuntimeError(f"release_weights() has nothing to release: {nothing}" if nothing else
                           "release_weights() needs a quantized model: calibrate it first, or call it once")
    _model_fingerprint(qt, state)
    return _release(qt._orig_mod, state)
