"""A compiled tiny PixArt gives the same output on the Triton kernels as on the torch reference."""

import importlib.util
import os

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import clq_compile  # noqa: E402
from clq_compile import tiny_models  # noqa: E402
from clq_compile.kernels import triton_quantize  # noqa: E402

from ..helpers import rel_error  # noqa: E402

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (imported before this module)",
                allow_module_level=True)


def compiled_output(model: torch.nn.Module, inputs: dict, options: dict) -> torch.Tensor:
    """Compile with backend="clq", calibrate on `inputs`, then run them quantized."""
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options=options)
    with torch.no_grad():
        with clq_compile.calibrating(qt):
            qt(**inputs)
        return qt(**inputs).sample


@pytest.mark.parametrize("options", [
    {"bits": "w4a4"},
    {"bits": "w4a8"},
    {"bits": "w8a8"},
    {"bits": "w4a4", "weight_group": 32, "act_group": 32, "weight_symmetric": False},
    # Online rotations: here the kernel's and torch's float32 matmuls happen to agree to the bit;
    # a BLAS that sums in another order could move an activation integer across a tie.
    {"bits": "w4a4", "recipe": "quarot"},
], ids=["w4a4", "w4a8", "w8a8", "w4a4-g32-asym", "w4a4-quarot"])
def test_triton_kernels_give_the_reference_output(options, monkeypatch):
    model = tiny_models.build("pixart")
    inputs = tiny_models.make_inputs("pixart", batch=2)
    ref = compiled_output(model, inputs, {**options, "kernels": "reference"})

    # The op looks for triton only on its way to the kernels, so counting the look-ups shows that the
    # compiled layers took that way.
    lookups = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: lookups.append(name) or find_spec(name, *rest))
    out = compiled_output(model, inputs, {**options, "kernels": "triton"})

    assert "triton" in lookups, "the compiled model never reached the Triton kernels"
    assert out.shape == ref.shape
    assert rel_error(out, ref) <= 1e-5
