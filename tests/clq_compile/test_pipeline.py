"""clq_compile/pipeline.py: the four stages, driven by hand, make the model the backend makes."""

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.backend import compiled_call
from clq_compile.calibration import model_state
from clq_compile.options import parse_options
from clq_compile.passes.capture import module_names
from clq_compile.passes.observers import GraphCalibration
from clq_compile.passes.structure import GraphContext
from clq_compile.pipeline import capture_graph, decide_layers, lower_graph, quantize_layers

OPTIONS = {"bits": "w4a4", "kernels": "reference", "recipe": "clq", "conditioning_bits": "w8a16"}


def by_hand(model: torch.nn.Module, inputs: dict, options: dict):
    """Stages 1-4 on the one graph Dynamo captures of `model`, calibrated on `inputs`: (layers,
    errors, the lowered graph's output on `inputs`, the captured graph's output)."""
    opts = parse_options(options)
    graphs = []

    def backend(gm, example_inputs):
        _, call_inputs, batch = compiled_call()
        graphs.append((gm, example_inputs, GraphContext(call_inputs, True, batch)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    (gm, args, context), = graphs
    analysis = capture_graph(gm, args, module_names(model), context)
    decisions = decide_layers(analysis.sites, opts)
    quantized = frozenset(node for node, d in decisions.items() if d.quantize)
    calibration = GraphCalibration(gm, analysis, {p.index: args[p.index] for p in analysis.placeholders
                                                  if p.kind != "input"})
    calibration.calls.append([args[i] for i in analysis.input_indices])
    sites = [analysis.site(n) for n in quantized]
    layers, errors = quantize_layers({s.path: args[s.weight_index] for s in sites},
                                     {s.path: s.role for s in analysis.sites}, opts, [calibration])
    lowered, run = lower_graph(gm, analysis, layers, quantized, opts, None)
    with torch.no_grad():
        return layers, errors, run(*args), gm(*args)


def first(outputs) -> torch.Tensor:
    """The sample a captured graph returns (its first output)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_stages_by_hand_give_the_backends_model(family):
    inputs = tiny_models.make_inputs(family, seed=100)
    layers, errors, out, reference = by_hand(tiny_models.build(family), inputs, OPTIONS)

    torch._dynamo.reset()
    qt = torch.compile(tiny_models.build(family), backend="clq", options=OPTIONS)
    with torch.no_grad(), clq_compile.calibrating(qt):
        qt(**inputs)
    state = model_state(qt)
    assert set(state.layers) == set(layers) and state.errors == errors
    methods = {layer.method for layer in layers.values()}
    assert "rtn (conditioning_bits)" in methods and len(methods) > 1  # both halves of stage 3 ran
    for path, layer in layers.items():
        ours = state.layers[path]
        assert torch.equal(ours.weight.qweight, layer.weight.qweight), path
        assert torch.equal(ours.weight.scale, layer.weight.scale), path
    with torch.no_grad():
        compiled = qt(**inputs)
    out, reference = first(out), first(reference)
    assert torch.equal(compiled.sample, out)
    # ...and the quantized model is a model of the full-precision one, not a copy of it.
    assert not torch.equal(out, reference) and torch.allclose(out, reference, atol=0.5)

