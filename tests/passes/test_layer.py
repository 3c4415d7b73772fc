"""QuantizedLinear: a layer record is built once and read, never edited."""

import dataclasses

import pytest
import torch

from clq_compile.kernels.formats import get_format
from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize
from clq_compile.passes.layer import ActivationTransform, QuantizedLinear


def test_a_layer_record_cannot_be_edited_after_it_is_built():
    notes, details = ["a note"], {"clip": (1.0, 1.0)}
    layer = QuantizedLinear(pack_weight(quantize(torch.randn(4, 32), 4)), get_format("int4"), None,
                            notes=notes, details=details)
    notes.append("later")
    details.update(clip=(0.5, 0.5))
    assert layer.notes == ("a note",) and layer.details["clip"] == (1.0, 1.0)
    with pytest.raises(TypeError):
        layer.details["clip"] = (0.9, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.method = "edited"


def test_an_activation_transform_applies_its_parts_in_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    mul, perm = torch.rand(8, generator=g, dtype=torch.float64) + 0.5, torch.randperm(8, generator=g)
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    t = ActivationTransform(mul, perm, rotation)
    expected = ((x * mul)[..., perm].reshape(3, 2, 2, 4) @ rotation).reshape(x.shape)
    assert torch.allclose(t.apply(x), expected, rtol=0, atol=1e-12)
    assert ActivationTransform().identity and ActivationTransform().apply(x) is x
