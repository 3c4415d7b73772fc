"""CBC and CLPS on a real captured graph: segments, quantized-prefix inputs, search objective."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile import stress, tiny_models
from clq_compile.options import parse_options
from clq_compile.passes import cross_block
from clq_compile.passes.cross_block import Components, clq_quantize
from clq_compile.passes.cross_layer_search import clip_candidates, pick_target, search_clip
from clq_compile.passes.lowering import lower
from clq_compile.passes.observers import GraphCalibration, observe
from clq_compile.passes.policy import decide
from clq_compile.passes.segments import SegmentedGraph, fp_linear
from tests.helpers import dynamo_graph


@pytest.fixture(scope="module")
def pixart_calibration():
    model = tiny_models.build("pixart", heads=4, head_dim=16)
    stress.trained_like_weights(model)
    stress.inject_outliers(model, scale=20)
    gm, example_inputs, analysis = dynamo_graph(model, tiny_models.make_inputs("pixart"))
    state = {p.index: example_inputs[p.index] for p in analysis.placeholders if p.kind != "input"}
    calls = []
    for seed in range(3):
        inputs = tiny_models.make_inputs("pixart", seed=seed)
        flat = {"hidden_states": inputs["hidden_states"], "timestep": inputs["timestep"],
                "encoder_hidden_states": inputs["encoder_hidden_states"]}
        calls.append([flat[name] for name in ("hidden_states", "timestep", "encoder_hidden_states")])
    cal = GraphCalibration(gm, analysis, state, calls)
    options = parse_options({"bits": "w4a4", "recipe": "clq"})
    weights = {s.path: state[s.weight_index] for s in analysis.sites if decide(s, options.policy()).quantize}
    return cal, options, weights


def test_input_order_of_the_fixture_matches_the_graph(pixart_calibration):
    cal, _, _ = pixart_calibration
    names = [p.name for p in cal.analysis.placeholders if p.kind == "input"]
    assert names == ["l_hidden_states_", "l_timestep_", "l_encoder_hidden_states_"]


def test_segments_reproduce_the_graph(pixart_calibration):
    cal, _, _ = pixart_calibration
    seg = SegmentedGraph(cal.gm, cal.analysis)
    assert len(seg) == len(cal.analysis.blocks)
    for args in cal.arguments():
        env = seg.start_env(args)
        for s in range(len(seg)):
            env = seg.advance(s, env, fp_linear)
        assert torch.equal(seg.output(env)[0], cal.gm(*args)[0])


@pytest.mark.parametrize("obs_statistics", ["quantized-prefix", "fp"])
def test_cbc_calibrates_each_block_on_the_quantized_prefix(pixart_calibration, monkeypatch, obs_statistics):
    """Statistics of block 1 are taken on block 0 quantized; with obs_statistics="fp", OBS's on the fp prefix."""
    cal, options, weights = pixart_calibration
    options = dataclasses.replace(options, obs_statistics=obs_statistics)
    created: list[list[torch.Tensor]] = []

    class Recording(cross_block.LayerStats):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.inputs = []
            created.append(self.inputs)

        def add(self, x):
            self.inputs.append(x.clone())
            super().add(x)

    monkeypatch.setattr(cross_block, "LayerStats", Recording)
    layers = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())

    # The driver creates one statistics object per layer, segment by segment, in graph order.
    seg = SegmentedGraph(cal.gm, cal.analysis)
    order = [s.path for i in range(len(seg)) for s in seg.segment_sites(i) if s.path in weights]
    recorded = dict(zip(order, created))
    first = next(s for s in cal.analysis.sites if s.block == 1 and s.path in weights)
    block0 = {s.node for s in cal.analysis.sites if s.block == 0 and s.path in weights}

    # Expected: the graph with only block 0 quantized, observed at block 1's first layer.
    prefix = lower(cal.gm, cal.analysis, layers, block0, "reference")
    expected = []
    observe([GraphCalibration(prefix, cal.analysis, cal.state, cal.calls)], {first.path},
            lambda site, x, w, b, y: expected.append(x.clone()))
    fp = []
    observe([cal], {first.path}, lambda site, x, w, b, y: fp.append(x.clone()))
    # The quantized prefix's inputs differ from the full-precision model's: the error did accumulate.
    assert not torch.allclose(fp[0], expected[0])
    want = expected if obs_statistics == "quantized-prefix" else fp
    assert len(recorded[first.path]) == len(want) == len(cal.calls)
    for got, w in zip(recorded[first.path], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_clps_choice_is_never_worse_than_no_clipping(pixart_calibration):
    cal, options, weights = pixart_calibration
    layers = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    searched = [layer for layer in layers.values() if layer.details.get("objective")]
    assert len(searched) >= len(weights) // 2
    for layer in searched:
        values = layer.details["objective"]
        assert values[layer.details["clip"]] <= values[(1.0, 1.0)]
        assert layer.details["target"] in {s.path for s in cal.analysis.sites}


def test_ablations_switch_components_off(pixart_calibration):
    cal, options, weights = pixart_calibration
    no_obs = clq_quantize(weights, options.method_configs(), [cal], Components(obs=False), options.execution())
    assert all(layer.act_rotation is None and layer.act_perm is None for layer in no_obs.values())
    no_clps = clq_quantize(weights, options.method_configs(), [cal], Components(clps=False), options.execution())
    assert all(not layer.details["objective"] and layer.details["clip"] == (1.0, 1.0)
               for layer in no_clps.values())
    full = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    assert any(layer.act_perm is not None for layer in full.values())


def test_data_free_clq_uses_the_block_hadamard():
    options = parse_options({"recipe": "clq"})
    layers = clq_quantize({"a": torch.randn(8, 256)}, options.method_configs(), None, Components(), options.execution())
    assert layers["a"].act_rotation.shape == (128, 128) and layers["a"].act_perm is None
    assert layers["a"].method.startswith("data-free")


@given(st.dictionaries(st.sampled_from(clip_candidates((1.0, 0.9, 0.8, 0.7), False)),
                       st.floats(0, 10), min_size=1))
def test_search_returns_the_argmin_over_a_grid_with_no_clipping(values):
    candidates = clip_candidates((1.0, 0.9, 0.8, 0.7), False)
    assert candidates[0] == (1.0, 1.0) and len(candidates) == 16
    objective = {c: values.get(c, 5.0) for c in candidates}
    best, seen = search_clip(objective.__getitem__, candidates)
    assert seen == objective
    assert objective[best] == min(objective.values()) <= objective[(1.0, 1.0)]


def test_symmetric_candidates_and_targets():
    assert clip_candidates((0.9, 0.8), True) == [(1.0, 1.0), (0.9, 0.9), (0.8, 0.8)]
    assert pick_target({"a": 0.1, "b": 0.3, "c": 0.3}) == "b"
    with pytest.raises(ValueError):
        pick_target({})


@pytest.mark.parametrize("recipe", ["clq", "smoothquant"])
def test_offload_changes_where_activations_wait_not_what_is_chosen(recipe):
    """options['offload'] keeps recordings in CPU memory (as `Offloaded`) and gives the same layers."""
    import clq_compile
    from clq_compile.calibration import model_state
    from clq_compile.passes.observers import Offloaded

    layers = {}
    for offload in (False, True):
        torch._dynamo.reset()
        model = stress.stress_model("pixart", seed=0, heads=2, head_dim=16)
        qt = torch.compile(model, backend="clq", options={"recipe": recipe, "offload": offload})
        state = model_state(qt)
        with torch.no_grad(), clq_compile.calibrating(qt):
            for c in range(2):
                qt(**tiny_models.make_inputs("pixart", seed=c))
            recorded = [v for g in state.graphs for call in g.calibration.calls for v in call]
            assert any(isinstance(v, Offloaded) for v in recorded) == offload
        layers[offload] = state.layers
    assert layers[True].keys() == layers[False].keys()
    for path, layer in layers[True].items():
        for name, t in layer.tensors().items():
            u = layers[False][path].tensors()[name]
            assert (t is None) == (u is None) and (t is None or torch.equal(t, u)), (path, name)
