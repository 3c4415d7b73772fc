"""The state of a compiled model: lifetime (nothing keeps the user's model alive) and weights
changed in place after quantization (noticed, never run stale)."""

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clq_compile
from clq_compile import tiny_models
from clq_compile.state import content_checksum
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


_TO_Q = "transformer_blocks.0.attn1.to_q"


def _through_data(model, how):
    """An in-place write through `.data`, which bumps no version counter and moves no pointer."""
    weight = model.get_submodule(_TO_Q).weight
    if how == "mul_":
        weight.data.mul_(2)
    elif how == "copy_":
        weight.data.copy_(model.get_submodule("transformer_blocks.1.attn1.to_q").weight.data)
    else:  # two rows swapped: the sum of the values stays
        weight.data[[0, 1]] = weight.data[[1, 0]].clone()


@pytest.mark.filterwarnings("ignore:clq")
@pytest.mark.parametrize("how", ["mul_", "copy_", "swap"])
def test_a_write_through_data_before_the_first_quantized_call_is_refused(how):
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    _through_data(model, how)
    with pytest.raises(RuntimeError, match=rf"changed in place after quantization.*{_TO_Q}"):
        with torch.no_grad():
            qt(**tiny_models.make_inputs("dit", seed=1))


@pytest.mark.filterwarnings("ignore:clq")
def test_a_write_through_data_is_refused_by_save_and_explain_then_calibrated_away(tmp_path):
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    inputs = tiny_models.make_inputs("dit", seed=1)
    with torch.no_grad():
        qt(**inputs)
    _through_data(model, "mul_")
    for act in (lambda: clq_compile.save(qt, tmp_path / "never.safetensors"), lambda: clq_compile.explain(qt)):
        with pytest.raises(RuntimeError, match=rf"changed in place after quantization.*{_TO_Q}"):
            act()
    assert not (tmp_path / "never.safetensors").exists()
    _calibrate(qt)  # requantizes from the changed weights, as after an ordinary in-place write
    with torch.no_grad():
        assert rel_error(qt(**inputs).sample, model(**inputs).sample) < 0.02
    clq_compile.save(qt, tmp_path / "after.safetensors")


@pytest.mark.filterwarnings("ignore:clq")
def test_a_write_through_data_after_load_is_refused(tmp_path):
    qt = _compile(tiny_models.build("dit", seed=3))
    _calibrate(qt)
    path = clq_compile.save(qt, tmp_path / "dit.safetensors")
    torch._dynamo.reset()
    model = tiny_models.build("dit", seed=3)
    loaded = clq_compile.load(model, path, release_weights=False, options={"kernels": "reference"})
    _through_data(model, "mul_")
    with pytest.raises(RuntimeError, match=rf"changed in place after quantization.*{_TO_Q}.*into the unchanged"):
        with torch.no_grad():
            loaded(**tiny_models.make_inputs("dit", seed=1))


def test_a_graphs_quantized_sites_are_computed_once():
    qt = _compile(tiny_models.build("dit"))
    _calibrate(qt)
    from clq_compile.calibration import model_state

    (graph,) = model_state(qt).graphs
    assert graph.quantized_sites is graph.quantized_sites
    assert graph.quantized_sites == {n for n, d in graph.decisions.items() if d.quantize}


def _wrapped(n: int) -> int:
    """`n` as int64 arithmetic leaves it (two's complement, mod 2^64)."""
    return (n + 2**63) % 2**64 - 2**63


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_the_content_checksum_is_its_integer_definition_and_sees_any_one_value_changed(shape, seed, dtype):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * 1e3
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.view(as_int).reshape(shape[0], -1).tolist()
    rows = [sum(r) for r in bits]
    cols = [sum(c) for c in zip(*bits)]
    expected = (sum(rows), sum(i * r for i, r in enumerate(rows, 1)), sum(j * c for j, c in enumerate(cols, 1)))
    assert content_checksum(t) == tuple(map(_wrapped, expected))
    changed = t.clone()
    changed.view(as_int).view(-1)[seed % t.numel()] ^= 1 << (seed % 8)  # one bit of one value flipped
    assert content_checksum(changed) != content_checksum(t)


@pytest.mark.filterwarnings("ignore:clq")
def test_a_model_cast_after_quantization_is_named_as_a_cast():
    model = tiny_models.build("dit")
    qt = _compile(model)
    _calibrate(qt)
    model.half()
    with pytest.raises(RuntimeError, match=r"the model was cast \(float32 to float16.*made from the float32 weights.*"
                                           r"calibrate again"):
        with torch.no_grad():
            qt(**tiny_models.make_inputs("dit", seed=1, dtype=torch.float16))
    model.float()
    clq_compile.release_weights(qt)
    model.bfloat16()
    with pytest.raises(RuntimeError, match=r"cast \(float32 to bfloat16.*cannot be calibrated again"):
        with torch.no_grad():
            qt(**tiny_models.make_inputs("dit", seed=1, dtype=torch.bfloat16))
