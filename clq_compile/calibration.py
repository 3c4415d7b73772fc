"""`calibrating(qt)`: run the compiled model in full precision and record what its graphs see."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from .backend import compiled_options
from .checks import nothing_selected
from .state import ModelState, state_for_module


def model_state(qt: torch.nn.Module) -> ModelState:
    """The quantization state of a module compiled with backend="clq" (TypeError otherwise)."""
    options = compiled_options(qt)
    return state_for_module(qt._orig_mod, options)


@contextmanager
def calibrating(qt: torch.nn.Module) -> Iterator[None]:
    """Record calibration data for `qt` (the module torch.compile returned) inside the block.

    Inside the block every call runs in full precision and its inputs are recorded. Leaving the
    block runs the recipe on the recordings and quantizes; from then on calls run quantized. If
    the block raises, or quantizing on the recordings fails (a NaN or Inf input, say), the
    recordings are dropped and the model is left as it was before the block.

    Calibration belongs to the thread that entered the block: calls from other threads meanwhile
    run what the model ran before it and are not recorded. A second calibrating() on the same
    model while one is active (nested, or from another thread) raises at its entry and leaves the
    active one as it was. When no layer is selected for quantization (no linear layers, or `skip`
    covers them all), leaving the block warns, saying why, and the model stays in full precision.
    """
    state = model_state(qt)
    before = (state.layers, state.errors, state.calibrations, state.reports)
    state.begin_calibration()
    try:
        yield
        nothing = nothing_selected(state, qt._orig_mod) if state.options.quantizes else None
        if nothing:
            state.abort_calibration()
            warnings.warn(f"clq: calibrating() has nothing to calibrate: {nothing}. The model runs in "
                          f"full precision.", stacklevel=3)
        else:
            state.finish_calibration()
    except BaseException:
        if state.layers is not before[0]:
            # The recipe got as far as replacing the layers: restore the previous ones, and let
            # every graph lower again from them when it is next called.
            state.layers, state.errors, state.calibrations, state.reports = before
            for graph in state.graphs:
                graph.lowered = graph.run = None
        state.abort_calibration()
        raise
