"""Capture names every parameter by its path in the user's model, whatever frame Dynamo traced.

After a graph break inside a submodule Dynamo resumes in a frame whose `self` is that submodule,
so the frame's source names are relative to it ("attn1.to_q"): paths must still be
model-absolute, or every block shares one quantized layer.
"""

import warnings

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.calibration import model_state
from tests.helpers import rel_error


def _break(module, args):
    torch._dynamo.graph_break()


def _compile_calibrated(model, bits):
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": bits, "kernels": "reference"})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with clq_compile.calibrating(qt):
            for seed in range(3):
                qt(**tiny_models.make_inputs("dit", seed=100 + seed))
    return qt


@pytest.fixture(scope="module")
def broken_dit():
    """A tiny DiT with a graph break before every block's self-attention."""
    model = tiny_models.build("dit")
    for block in model.transformer_blocks:
        block.attn1.register_forward_pre_hook(_break)
    return model


def test_paths_are_model_absolute_after_a_graph_break_inside_a_block(broken_dit):
    qt = _compile_calibrated(broken_dit, "w8a8")
    state = model_state(qt)
    assert len(state.graphs) > 1
    modules = dict(broken_dit.named_modules())
    for graph in state.graphs:
        for site in graph.analysis.sites:
            assert site.path in modules, site.path
            assert graph.calibration.state[site.weight_index] is modules[site.path].weight
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    # Dynamo runs the root's own tail (proj_out_*) eagerly after the break; every block's linear is captured.
    decided = set(state.site_decisions())
    assert decided <= linears
    assert {n for n in linears if n.startswith("transformer_blocks.")} <= decided
    # The blocks' q projections are separate quantized layers.
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"} <= set(state.layers)
    assert "to_q" not in state.layers
    with torch.no_grad():
        ref = broken_dit(**tiny_models.make_inputs("dit", seed=1)).sample
        out = qt(**tiny_models.make_inputs("dit", seed=1)).sample
    assert rel_error(out, ref) < 0.02
    assert "transformer_blocks.1.attn1.to_q" in clq_compile.explain(qt)


def test_an_artifact_saved_after_a_graph_break_inside_a_block_loads_with_the_same_outputs(broken_dit, tmp_path):
    qt = _compile_calibrated(broken_dit, "w8a8")
    path = tmp_path / "broken.safetensors"
    clq_compile.save(qt, path)
    inputs = tiny_models.make_inputs("dit", seed=2)
    with torch.no_grad():
        expected = qt(**inputs).sample
    torch._dynamo.reset()
    fresh = tiny_models.build("dit")
    fresh.load_state_dict(broken_dit.state_dict())
    for block in fresh.transformer_blocks:
        block.attn1.register_forward_pre_hook(_break)
    loaded = clq_compile.load(fresh, path, options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    state = model_state(loaded)
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"} <= set(state.layers)
    assert set(state.layers) <= set(dict(fresh.named_modules()))


def test_paths_stay_model_absolute_after_an_interrupt_inside_a_block_during_calibration():
    """A KeyboardInterrupt from a forward hook inside a block (Ctrl-C during calibration) leaves
    Dynamo to compile the block's frame on its own at the next call: paths must not become the
    frame's (`attn1.to_q`), shared by every block."""
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    interrupts = [1]

    def interrupt(module, args):
        if interrupts:
            interrupts.pop()
            raise KeyboardInterrupt

    handle = model.transformer_blocks[1].attn1.register_forward_pre_hook(interrupt)
    qt = torch.compile(model, backend="clq", options={"bits": "w8a8", "kernels": "reference"})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt), clq_compile.calibrating(qt):
            qt(**tiny_models.make_inputs("dit", seed=100))
        handle.remove()
        with clq_compile.calibrating(qt):
            for seed in range(3):
                qt(**tiny_models.make_inputs("dit", seed=101 + seed))
        state = model_state(qt)
        modules = dict(model.named_modules())
        assert set(state.layers) <= set(modules)
        assert {f"transformer_blocks.{i}.attn1.to_q" for i in range(len(model.transformer_blocks))} <= set(state.layers)
        ref = model(**tiny_models.make_inputs("dit", seed=1)).sample
        out = qt(**tiny_models.make_inputs("dit", seed=1)).sample
    assert rel_error(out, ref) < 0.02
