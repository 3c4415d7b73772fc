"""A compiled tiny PixArt gives the same output on the Triton kernels as on the torch reference.

Where a layer rotates its activations online, the kernel and torch sum each rotated value in
another order (and the order torch uses depends on the CPU's BLAS), so a value that lies on a
rounding midpoint can quantize to neighbouring integers on the two sides. Every layer the Triton
kernels run is therefore checked on its own: its activation integers equal the reference's except
at such ties (within the rotation's float32 error bound), and its output equals the reference
GEMM's given the kernel's integers and scales. The whole model's output equals the reference's
wherever no integer crossed a tie.
"""

import importlib.util
import os

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

import clq_compile  # noqa: E402
from clq_compile import tiny_models  # noqa: E402
from clq_compile.kernels import reference, triton_linear, triton_quantize  # noqa: E402
from clq_compile.kernels.formats import get_format  # noqa: E402
from clq_compile.kernels.packing import unpack_int4  # noqa: E402
from clq_compile.kernels.quantize import Quantized, quantize_activation  # noqa: E402

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
    # The search runs every candidate through the interpreted kernels: two ratios keep it searching
    # on them at a third of the default grid's time.
    options = {"clps_grid": (1.0, 0.9), **options}
    model = tiny_models.build("pixart")
    inputs = tiny_models.make_inputs("pixart", batch=2)
    ref = compiled_output(model, inputs, {**options, "kernels": "reference"})

    # The op looks for triton only on its way to the kernels, so counting the look-ups shows that the
    # compiled layers took that way.
    lookups = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: lookups.append(name) or find_spec(name, *rest))
    layers = LayerCheck(monkeypatch)
    out = compiled_output(model, inputs, {**options, "kernels": "triton"})

    assert "triton" in lookups, "the compiled model never reached the Triton kernels"
    assert layers.calls > 0
    assert out.shape == ref.shape
    if layers.ties == 0:
        assert rel_error(out, ref) <= 1e-5


class LayerCheck:
    """Wraps the Triton linear layer: checks each call against the reference (module docstring)."""

    def __init__(self, monkeypatch):
        self.kernel, self.quantize = triton_linear.quant_linear_triton, triton_linear.quantize_activation_triton
        self.calls = self.ties = 0
        self.quantized = None
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(triton_linear, "quant_linear_triton", self)
        monkeypatch.setattr(triton_linear, "quantize_activation_triton", self.record)

    def record(self, *args):
        """The quantize kernel as the layer calls it, keeping what it returned."""
        self.quantized = self.quantize(*args)
        return self.quantized

    def __call__(self, *args):
        self.quantized = None
        out = self.kernel(*args)
        x, transform, k, a_format, a_group = args[0], args[5:8], args[8], args[10], args[12]
        fmt = get_format(a_format)
        self.calls += 1
        if not (fmt.quantizes and fmt.name.startswith("int")):
            assert rel_error(out, reference.quant_linear_reference(*args)) <= 1e-5
            return out
        rows = x.reshape(-1, k)
        assert self.quantized is not None, "an integer layer ran without the quantize kernel"
        codes, scale = self.quantized
        codes = (unpack_int4(codes) if fmt.bits == 4 else codes).to(torch.int16)
        self.ties += check_ties(rows, transform, fmt, a_group or None, codes, scale)
        # The reference GEMM on the kernel's own integers and scales.
        given = Quantized(codes, scale, None, fmt, a_group or None)
        with self.monkeypatch.context() as m:
            m.setattr(reference, "quantize_activation", lambda *_: given)
            assert rel_error(out, reference.quant_linear_reference(*args)) <= 1e-5
        return out


def check_ties(rows, transform, fmt, group, codes, scale) -> int:
    """How many of the kernel's activation integers differ from the reference's; asserts each
    lies on a rounding midpoint within both sides' float32 error.

    The scaled value v = T(x) / s rounds to an integer. The rotation's float32 sums err by at most
    γ_b · (|x'| · |H|) (x' the multiplied, permuted input, b the block, γ_b = (1 + u)^b − 1) on
    either side, the scales differ by ρ relative, and the division or reciprocal adds an ulp of v.
    """
    act_mul, act_perm, act_rotation = transform
    exact = reference.transform_activation(rows.float(), act_mul, act_perm, act_rotation)
    ref = quantize_activation(exact, fmt, group)
    differ = codes != ref.q
    if not differ.any():
        return 0
    assert act_rotation is not None, "activation integers differ without a rotation to explain it"
    u = 2.0**-24
    b = act_rotation.shape[0]
    moved = reference.transform_activation(rows.float(), act_mul, act_perm, None)
    spread = (moved.abs().reshape(len(rows), -1, b) @ act_rotation.abs().float()).reshape(moved.shape)
    per_value = ref.scale.repeat_interleave(codes.shape[1] // ref.scale.shape[1], dim=1)
    v = exact / per_value
    rho = ((scale.double() - ref.scale.double()).abs() / ref.scale.double()).max()
    noise = 2 * (((1 + u) ** b - 1) * spread / per_value + (rho + 4 * u) * v.abs())
    midpoint = (v - v.floor() - 0.5).abs()
    assert ((codes - ref.q).abs()[differ] == 1).all()
    assert (midpoint[differ] <= noise[differ]).all(), "an activation integer differs away from a tie"
    return int(differ.sum())
