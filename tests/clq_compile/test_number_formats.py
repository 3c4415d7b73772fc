"""The float8 and weight-only modes as a user runs them: compile, calibrate, explain, save, load."""

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.artifact import read_manifest
from tests.helpers import rel_error


def calibrated(family, bits, recipe, calls=2, **options):
    torch._dynamo.reset()
    qt = torch.compile(tiny_models.build(family, seed=3), backend="clq",
                       options={"bits": bits, "recipe": recipe, "kernels": "reference", **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(calls):
            qt(**tiny_models.make_inputs(family, seed=100 + seed))
    return qt


def run(model, family, seed=0):
    with torch.no_grad():
        return model(**tiny_models.make_inputs(family, seed=seed)).sample


@pytest.mark.parametrize("family,bits,recipe,options,w_format,a_format", [
    ("dit", "fp8", "clq", {}, "e4m3", "e4m3"),
    ("pixart", "w3a16", "gptq", {"weight_group": 32}, "int3", "none"),
    ("sd3", "w8a16", "smoothquant", {}, "int8", "none"),
    ("flux", "w4a16", "rtn", {"weight_symmetric": False, "weight_group": 32}, "int4", "none"),
])
def test_modes_round_trip_bit_identically_and_show_their_formats(tmp_path, family, bits, recipe, options,
                                                                 w_format, a_format):
    qt = calibrated(family, bits, recipe, **options)
    expected = run(qt, family)
    assert bits in clq_compile.explain(qt).split("\n", 1)[1]  # a layer row shows the mode
    path = clq_compile.save(qt, tmp_path / f"{family}.safetensors")
    layers = read_manifest(path)["layers"]
    assert layers and {(e["w_format"], e["a_format"]) for e in layers.values()} == {(w_format, a_format)}
    torch._dynamo.reset()
    loaded = clq_compile.load(tiny_models.build(family, seed=3), path)
    assert torch.equal(run(loaded, family), expected)


def test_more_bits_give_smaller_errors():
    """w8a16 < w4a16 < w3a16 and fp8 < w4a4 on the same model, inputs and recipe (RTN)."""
    reference = run(tiny_models.build("pixart", seed=3), "pixart")
    errors = {bits: rel_error(run(calibrated("pixart", bits, "rtn"), "pixart"), reference)
              for bits in ("w8a16", "w4a16", "w3a16", "fp8", "w4a4")}
    assert errors["w8a16"] < errors["w4a16"] < errors["w3a16"], errors
    assert errors["fp8"] < errors["w4a4"], errors
    assert errors["w8a16"] > 0, errors  # quantized, not passed through
