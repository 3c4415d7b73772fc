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


def calibration_of(model):
    """(GraphCalibration of 3 recorded calls, options, {path: weight} the policy quantizes) of a
    PixArt-like `model`."""
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


@pytest.fixture(scope="module")
def pixart_calibration():
    model = tiny_models.build("pixart", heads=4, head_dim=16)
    stress.trained_like_weights(model)
    stress.inject_outliers(model, scale=20)
    return calibration_of(model)


@pytest.fixture(scope="module")
def three_blocks():
    """A PixArt-like model of three blocks: "previous" and "all" prefixes differ from block 2 on."""
    model = tiny_models.build("pixart", heads=4, head_dim=16, blocks=3)
    assert len(model.transformer_blocks) == 3
    stress.trained_like_weights(model)
    stress.inject_outliers(model, scale=20)
    return calibration_of(model)


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


def recording_stats(monkeypatch) -> list[list[torch.Tensor]]:
    """The inputs every LayerStats CBC creates is given, one list per object, in creation order."""
    created: list[list[torch.Tensor]] = []

    class Recording(cross_block.LayerStats):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.inputs = []
            created.append(self.inputs)

        def add(self, x, weights=None):
            self.inputs.append(x.clone())
            super().add(x, weights)

    monkeypatch.setattr(cross_block, "LayerStats", Recording)
    return created


def inputs_with(cal, layers, blocks, path) -> list[torch.Tensor]:
    """The inputs of layer `path` on the recorded calls with the layers of `blocks` quantized."""
    quantized = {s.node for s in cal.analysis.sites if s.block in blocks and s.path in layers}
    graph = lower(cal.gm, cal.analysis, layers, quantized, "reference") if quantized else cal.gm
    seen = []
    observe([GraphCalibration(graph, cal.analysis, cal.state, cal.calls)], {path},
            lambda site, x, w, b, y: seen.append(x.clone()))
    return seen


def recorded_inputs(cal, weights, created) -> dict[str, list[torch.Tensor]]:
    # The driver creates one statistics object per layer, segment by segment, in graph order.
    seg = SegmentedGraph(cal.gm, cal.analysis)
    order = [s.path for i in range(len(seg)) for s in seg.segment_sites(i) if s.path in weights]
    return dict(zip(order, created))


@pytest.mark.parametrize("obs_statistics", ["quantized-prefix", "fp"])
def test_cbc_calibrates_each_block_on_the_quantized_prefix(pixart_calibration, monkeypatch, obs_statistics):
    """Statistics of block 1 are taken on block 0 quantized; with obs_statistics="fp", OBS's on the fp prefix."""
    cal, options, weights = pixart_calibration
    options = dataclasses.replace(options, obs_statistics=obs_statistics)
    created = recording_stats(monkeypatch)
    layers = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    recorded = recorded_inputs(cal, weights, created)
    first = next(s for s in cal.analysis.sites if s.block == 1 and s.path in weights)

    # Expected: the graph with only block 0 quantized, observed at block 1's first layer.
    expected = inputs_with(cal, layers, {0}, first.path)
    fp = inputs_with(cal, layers, set(), first.path)
    # The quantized prefix's inputs differ from the full-precision model's: the error did accumulate.
    assert not torch.allclose(fp[0], expected[0])
    want = expected if obs_statistics == "quantized-prefix" else fp
    assert len(recorded[first.path]) == len(want) == len(cal.calls)
    for got, w in zip(recorded[first.path], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["all", "previous"])
def test_cbc_prefix_says_which_blocks_before_are_quantized(three_blocks, monkeypatch, prefix):
    """Block 2 is calibrated on blocks 0 and 1 quantized ("all"), or on block 1 alone quantized
    on the full-precision model's input to it ("previous")."""
    cal, options, weights = three_blocks
    options = dataclasses.replace(options, cbc_prefix=prefix)
    created = recording_stats(monkeypatch)
    layers = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    first = next(s for s in cal.analysis.sites if s.block == 2 and s.path in weights)
    got = recorded_inputs(cal, weights, created)[first.path]
    both, previous = inputs_with(cal, layers, {0, 1}, first.path), inputs_with(cal, layers, {1}, first.path)
    assert not torch.allclose(both[0], previous[0])  # the two prefixes do differ here
    want = both if prefix == "all" else previous
    assert len(got) == len(want) == len(cal.calls)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_clps_max_variance_targets_the_reached_layer_of_largest_output_variance(pixart_calibration, monkeypatch):
    """clps_target="max-variance" scores the reached layers by their output variance (no search
    run before the choice) and targets the largest; the choice differs from "peak-error" somewhere."""
    from clq_compile.passes import cross_layer_search

    cal, options, weights = pixart_calibration
    scored: list[dict] = []
    variances = cross_layer_search.output_variances

    def spy(references, nodes):
        scored.append(variances(references, nodes))
        return scored[-1]

    monkeypatch.setattr(cross_layer_search, "output_variances", spy)
    chosen = clq_quantize(weights, dataclasses.replace(options, clps_target="max-variance").method_configs(),
                          [cal], Components(), options.execution())
    peak = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    searched = [p for p, layer in chosen.items() if layer.details["target"] is not None]
    assert len(scored) == len(searched) >= len(weights) // 2
    paths = {s.node: s.path for s in cal.analysis.sites}
    for path, values in zip(searched, scored):
        assert chosen[path].details["target"] == paths[max(values, key=values.get).name]
        assert all(v >= 0 for v in values.values())
    assert any(chosen[p].details["target"] != peak[p].details["target"] for p in searched)


def test_clps_norm_l1_scores_the_candidates_in_l1(pixart_calibration, monkeypatch):
    """clps_norm="l1": every error CLPS measures is ||Y - Ŷ||₁ / ||Y||₁."""
    from clq_compile.passes import cross_layer_search

    cal, options, weights = pixart_calibration
    norms = []
    measure = cross_layer_search.relative_errors

    def spy(outputs, references, nodes, norm, weights=None):
        norms.append(norm)
        return measure(outputs, references, nodes, norm, weights)

    monkeypatch.setattr(cross_layer_search, "relative_errors", spy)
    l1 = clq_quantize(weights, dataclasses.replace(options, clps_norm="l1").method_configs(), [cal],
                      Components(), options.execution())
    assert norms and set(norms) == {"l1"}
    norms.clear()
    l2 = clq_quantize(weights, options.method_configs(), [cal], Components(), options.execution())
    assert norms and set(norms) == {"l2"}
    differs = [p for p in l1 if l1[p].details["objective"] and l1[p].details["objective"] != l2[p].details["objective"]]
    assert differs


# Activations' scale: the meters sum float32 squares, which underflow below about 1e-19.
ACTIVATION = st.floats(-1e3, 1e3).filter(lambda v: v == 0 or abs(v) >= 1e-6)


@given(st.lists(st.lists(ACTIVATION, min_size=1, max_size=6), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_relative_errors_and_variances_against_float64(columns, seed):
    """relative_errors in L2 and L1 and output_variances, against float64 sums."""
    from clq_compile.passes.cross_layer_search import output_variances, relative_errors

    g = torch.Generator().manual_seed(seed)
    refs = [{"t": torch.tensor(c, dtype=torch.float32)} for c in columns]
    outs = [{"t": r["t"] + torch.randn(r["t"].shape, generator=g)} for r in refs]
    y = torch.cat([r["t"].double() for r in refs])
    e = torch.cat([o["t"].float().double() for o in outs]) - y
    for norm, want in (("l2", e.norm() / y.norm()), ("l1", e.abs().sum() / y.abs().sum())):
        got = relative_errors(outs, refs, ["t"], norm)["t"]
        if float(y.abs().sum()) == 0:
            assert got == 0.0
        else:
            assert got == pytest.approx(float(want), rel=1e-5)
    assert output_variances(refs, ["t"])["t"] == pytest.approx(float(y.var(unbiased=False)), rel=1e-6, abs=1e-6)


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
