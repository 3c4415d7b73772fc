"""The state of a compiled model: lifetime (nothing keeps the user's model alive) and weights
changed in place after quantization (noticed, never run stale)."""

import gc
import weakref

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from tests.helpers import rel_error


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="clq", options={"bits": "w8a8", "kernels": "reference", **options})


def _calibrate(qt, family="dit", calls=2):
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(calls):
            qt(**tiny_models.make_inputs(family, seed=100 + seed))


def test_a_compiled_model_is_freed_after_del_and_reset():
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    with torch.no_grad():
        qt(**tiny_models.make_inputs("dit", seed=1))
    refs = [weakref.ref(p) for p in model.parameters()]
    del model, qt
    torch._dynamo.reset()
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def _scaled_weight(model, factor=1.5):
    with torch.no_grad():
        model.transformer_blocks[0].attn1.to_q.weight.mul_(factor)


@pytest.mark.filterwarnings("ignore:clq")
def test_weights_changed_in_place_after_quantization_are_refused_until_calibrated_again():
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    inputs = tiny_models.make_inputs("dit", seed=1)
    _scaled_weight(model)
    with pytest.raises(RuntimeError, match=r"changed in place after quantization.*transformer_blocks\.0\.attn1\.to_q"):
        with torch.no_grad():
            qt(**inputs)
    with pytest.raises(RuntimeError, match="changed in place after quantization"):
        clq_compile.save(qt, "/nonexistent/never-written.clq")
    _calibrate(qt)  # requantizes from the changed weights
    with torch.no_grad():
        assert rel_error(qt(**inputs).sample, model(**inputs).sample) < 0.02


@pytest.mark.filterwarnings("ignore:clq")
def test_a_weight_replaced_through_data_is_noticed_too():
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    weight = model.get_submodule("transformer_blocks.1.ff.net.2").weight
    weight.data = weight.data * 2
    with pytest.raises(RuntimeError, match=r"transformer_blocks\.1\.ff\.net\.2"):
        with torch.no_grad():
            qt(**tiny_models.make_inputs("dit", seed=1))
