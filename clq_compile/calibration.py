"""`calibrating(qt)`: run the compiled model in full precision and record what its graphs see."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .backend import compiled_options
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
    the block raises, nothing is quantized and the recordings are dropped.
    """
    state = model_state(qt)
    state.begin_calibration()
    try:
        yield
    except BaseException:
        state.abort_calibration()
        raise
    state.finish_calibration()
