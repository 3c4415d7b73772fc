"""Timestep buckets (passes/timesteps.py, the bucketed op): edges, row selection, selection inside
the compiled graph, no recompiles over a sampling run, and artifacts."""

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clq_compile
from clq_compile import artifact, stress, tiny_models
from clq_compile.artifact import ArtifactError
from clq_compile.calibration import model_state
from clq_compile.kernels.formats import get_format
from clq_compile.options import parse_options
from clq_compile.passes.configs import (ActivationConfig, QuantizerConfig, TimestepRows,
                                        WeightQuantizerConfig)
from clq_compile.passes.layer import TimestepBuckets
from clq_compile.passes.observers import GraphCalibration
from clq_compile.passes.statistics import LayerStats
from clq_compile.passes.timesteps import bucket_edges, bucket_of, bucketed
from clq_compile.passes.weight_quantization import rtn
from tests.clq_compile.test_artifact_hostile import forge, manifest_text
from tests.clq_compile.test_lowrank_recipes import layers_by_hand as by_hand
from tests.helpers import dynamo_graph


def quantizer(w: str, a: str) -> QuantizerConfig:
    return QuantizerConfig(WeightQuantizerConfig(get_format(w), True, None), ActivationConfig(get_format(a), None))


@given(st.lists(st.integers(0, 20), min_size=1, max_size=40), st.integers(1, 6))
def test_edges_leave_no_bucket_empty(values, buckets):
    t = torch.tensor(values, dtype=torch.float64)
    edges = bucket_edges(t, buckets)
    assert len(edges) <= buckets - 1 and list(edges) == sorted(set(edges))
    ids = bucket_of(t, edges)
    assert set(ids.tolist()) == set(range(len(edges) + 1))
    if len(set(values)) == len(values) >= buckets:
        assert len(edges) == buckets - 1
        counts = torch.bincount(ids).tolist()
        assert max(counts) - min(counts) <= 1 + len(values) // buckets


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([("int4", "int4"), ("int8", "int8"), ("int4", "int8")]),
       st.integers(0, 2**31 - 1))
def test_the_bucketed_op_runs_each_samples_bucket(samples, tokens, formats, seed):
    """Every row gives what its timestep's bucket's own layer gives, for one bucket per call and for
    a batch mixing buckets."""
    g = torch.Generator().manual_seed(seed)
    k, n = 16, 8
    layers = [rtn(torch.randn(n, k, generator=g) * (1 + b), quantizer(*formats)) for b in range(3)]
    layer = bucketed((300.0, 600.0), layers)
    x = torch.randn(samples, tokens, k, generator=g)
    bias = torch.randn(n, generator=g)
    t = torch.randint(0, 1000, (samples,), generator=g).double()
    out = layer.forward(x, bias, "reference", t)
    ids = bucket_of(t, (300.0, 600.0)).tolist()
    for i, b in enumerate(ids):
        assert torch.equal(out[i], layers[b].forward(x[i:i + 1], bias, "reference")[0])
    same = layer.forward(x, bias, "reference", t[:1])
    assert torch.equal(same, layers[ids[0]].forward(x, bias, "reference"))


def test_mixed_buckets_need_one_row_per_sample_and_finite_timesteps():
    layers = [rtn(torch.randn(8, 16) * (1 + b), quantizer("int4", "int4")) for b in range(2)]
    layer = bucketed((500.0,), layers)
    with pytest.raises(ValueError, match="does not have one row per sample"):
        layer.forward(torch.randn(6, 16), None, "reference", torch.tensor([100.0, 900.0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.forward(torch.randn(2, 16), None, "reference", torch.tensor([100.0, float("nan")]))
    with pytest.raises(ValueError, match="needs the call's timesteps"):
        layer.forward(torch.randn(2, 16), None, "reference")


def test_bucket_records_are_checked_and_share_equal_tensors():
    w = torch.randn(8, 16)
    a, b = rtn(w, quantizer("int4", "int4")), rtn(w * 2, quantizer("int4", "int4"))
    with pytest.raises(ValueError, match="strictly ascending"):
        TimestepBuckets((5.0, 5.0), (a, b, a))
    with pytest.raises(ValueError, match="one layer more than edges"):
        TimestepBuckets((5.0,), (a,))
    with pytest.raises(ValueError, match="share its shape"):
        TimestepBuckets((5.0,), (a, rtn(torch.randn(4, 16), quantizer("int4", "int4"))))
    twice = bucketed((5.0,), [a, rtn(w, quantizer("int4", "int4"))])
    first, second = twice.buckets.layers
    assert second.weight.qweight is first.weight.qweight and twice.nbytes == a.nbytes
    # w · 2 rounds to the same codes with twice the scales: the codes are stored once.
    doubled = bucketed((5.0,), [a, b])
    assert doubled.buckets.layers[1].weight.qweight is a.weight.qweight
    assert doubled.nbytes == a.nbytes + b.weight.scale.numel() * 4


def test_rows_of_weight_zero_are_left_out_of_every_statistic():
    """A bucket's statistics see only its rows: the other bucket's larger rows set no range and are
    never sampled (before, the range stayed unweighted and zero-weight rows could be drawn)."""
    stats = LayerStats(4, hessian=True, max_rows=64)
    x = torch.cat([torch.ones(2, 3, 4), 100 * torch.ones(2, 3, 4)])
    stats.add(x, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(stats.absmax, torch.ones(4))
    assert float(stats.samples.abs().max()) == 1.0
    assert torch.allclose(stats.hessian, 2 * torch.ones(4, 4, dtype=torch.float64))


def calibrated(recipe: str = "gptq", buckets: int = 2, calls=None, **options):
    """The PixArt stress model calibrated per timestep bucket; each call (seed, timestep) one timestep
    for its two images."""
    torch._dynamo.reset()
    model = stress.stress_model("pixart", seed=0, heads=4, head_dim=16)
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "kernels": "reference", "recipe": recipe,
                                                      "timestep_buckets": buckets, **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed, t in calls or enumerate((100, 300, 700, 900)):
            qt(**pixart_inputs(100 + seed, [t, t]))
    return model, qt


def pixart_inputs(seed, timesteps):
    inputs = tiny_models.make_inputs("pixart", batch=len(timesteps), seed=seed)
    return {**inputs, "timestep": torch.tensor(timesteps)}


@pytest.fixture(scope="module")
def gptq_buckets():
    return calibrated("gptq")


def test_the_compiled_graph_selects_each_calls_bucket(gptq_buckets):
    model, qt = gptq_buckets
    state = model_state(qt)
    assert state.layers and all(layer.buckets is not None and layer.buckets.edges == (500.0,)
                                for layer in state.layers.values())
    graph = next(g.lowered for g in state.graphs)
    assert sum(n.target is torch.ops.clq.timestep_bucket.default for n in graph.graph.nodes) == 1
    for timesteps in ([100, 100], [900, 900], [100, 900], [900, 100]):
        inputs = pixart_inputs(5, timesteps)
        with torch.no_grad():
            assert torch.equal(qt(**inputs).sample, by_hand(model, state, inputs))
    with torch.no_grad():
        low, high = (qt(**pixart_inputs(5, [t, t])).sample for t in (100, 900))
        mixed = qt(**pixart_inputs(5, [100, 900])).sample
    assert torch.equal(mixed[0], low[0]) and torch.equal(mixed[1], high[1])


def test_a_buckets_layer_is_the_recipe_calibrated_on_that_buckets_calls(gptq_buckets):
    """GPTQ's Hessian of bucket 0 holds only the rows of timesteps below the edge: exactly what
    calibrating on those calls alone gives."""
    _, qt = gptq_buckets
    layers = model_state(qt).layers
    for bucket, calls in ((0, ((0, 100), (1, 300))), (1, ((2, 700), (3, 900)))):
        _, alone = calibrated("gptq", buckets=1, calls=calls)
        for path, layer in model_state(alone).layers.items():
            assert torch.equal(layers[path].buckets.layers[bucket].weight.qweight, layer.weight.qweight)


def test_a_sampling_run_compiles_each_graph_once(gptq_buckets):
    _, qt = gptq_buckets
    inputs = pixart_inputs(7, [999, 999])
    with torch.no_grad():
        qt(**inputs)
        graphs = len(model_state(qt).graphs)
        torch._dynamo.utils.counters.clear()
        stress.sample(qt, inputs, steps=20)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(model_state(qt).graphs) == graphs  # the fixture is shared: count what this run added


def test_clq_bucketed_round_trips_through_an_artifact(tmp_path):
    model, qt = calibrated("clq")
    path = tmp_path / "buckets.safetensors"
    clq_compile.save(qt, path)
    manifest = json.loads(manifest_text(path))
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 6
    entries = [e for e in manifest["layers"].values() if "buckets" in e]
    assert entries and all(len(e["buckets"]) == 2 and e["timestep_edges"] == [500.0] for e in entries)
    inputs = pixart_inputs(5, [100, 900])
    with torch.no_grad():
        expected = qt(**inputs).sample
    torch._dynamo.reset()
    loaded = clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path,
                              options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    assert "per timestep bucket (2)" in clq_compile.explain_artifact(path)


def test_the_memory_report_counts_every_buckets_tensors_once():
    _, qt = calibrated("clq")
    tensors = {}
    for layer in model_state(qt).layers.values():
        for record in layer.buckets.layers:
            for t in (record.weight.qweight, record.weight.scale, record.weight.zero, record.act_mul,
                      record.act_perm, record.act_rotation, record.bias):
                if t is not None:
                    tensors[id(t)] = t
    assert len(tensors) > 2 * len(model_state(qt).layers)  # the buckets' own records
    assert clq_compile.memory_report(qt)["quantized_bytes"] == sum(t.numel() * t.element_size()
                                                                   for t in tensors.values())


@pytest.fixture(scope="module")
def saved_buckets(tmp_path_factory):
    _, qt = calibrated("gptq")
    path = tmp_path_factory.mktemp("buckets") / "a.safetensors"
    clq_compile.save(qt, path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.pop("timestep_edges"), "without their edges"),
    (lambda e: e.update(timestep_edges=[500.0, 400.0]), "buckets for 2 edges"),
    (lambda e: e.update(timestep_edges=[float("inf")]), "finite"),
    (lambda e: e["buckets"][1].update(a_format="int8"), "a_format"),
    (lambda e: e.update(w_group=32), "first bucket"),
    # A third bucket (self-consistent: its own edge, a copy of the second) where the options give two.
    (lambda e: (e["buckets"].append(dict(e["buckets"][1])), e["timestep_edges"].append(e["timestep_edges"][-1] + 1)),
     r"holds 3 timestep buckets, more than the artifact's options quantize with \(2"),
])
def test_forged_buckets_are_refused(saved_buckets, tmp_path, edit, match):
    path = tmp_path / "a.safetensors"
    shutil.copy(saved_buckets, path)

    def forged(manifest):
        edit(next(e for e in manifest["layers"].values() if "buckets" in e))

    forge(path, forged)
    torch._dynamo.reset()
    with pytest.raises(ArtifactError, match=match):
        clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path)


def test_one_timestep_or_no_calibration_keeps_one_bucket_and_says_so():
    _, qt = calibrated("gptq", calls=((0, 400), (1, 400)))
    layers = model_state(qt).layers.values()
    assert all(layer.buckets is None for layer in layers)
    assert all("one timestep bucket: the recorded calls have no timestep input, or one timestep" in layer.notes
               for layer in layers)


def test_layers_whose_rows_are_not_the_samples_keep_one_bucket():
    """A module called twice in one graph has no one timestep per row."""
    from clq_compile.passes.timesteps import bucketable

    model = tiny_models.build("dit", seed=3)
    gm, example, analysis = dynamo_graph(model, tiny_models.make_inputs("dit", batch=2))
    order = [p.source for p in analysis.placeholders if p.kind == "input"]
    state = {p.index: example[p.index] for p in analysis.placeholders if p.kind != "input"}
    calls = [[tiny_models.make_inputs("dit", batch=2, seed=s)[name] for name in order] for s in range(2)]
    cal = GraphCalibration(gm, analysis, state, calls)
    paths = {s.path for s in analysis.sites}
    ok = bucketable([cal], paths)
    twice = {p for p in paths if sum(s.path == p for s in analysis.sites) > 1}
    assert ok and not ok & twice
    no_timestep = GraphCalibration(gm, analysis, state, [[None if name == "timestep" else v
                                                          for name, v in zip(order, c)] for c in calls])
    assert bucketable([no_timestep], paths) == set()


def test_row_selection_masks_one_buckets_rows():
    from clq_compile.passes.fisher import row_weights

    model = tiny_models.build("dit", seed=3)
    gm, example, analysis = dynamo_graph(model, tiny_models.make_inputs("dit", batch=2))
    order = [p.source for p in analysis.placeholders if p.kind == "input"]
    state = {p.index: example[p.index] for p in analysis.placeholders if p.kind != "input"}
    calls = [[torch.tensor([100, 800]) if name == "timestep" else tiny_models.make_inputs("dit", batch=2)[name]
              for name in order]]
    cal = GraphCalibration(gm, analysis, state, calls)
    site = next(s for s in analysis.sites if s.path.endswith("attn1.to_v"))
    for bucket, expected in ((0, [1.0, 0.0]), (1, [0.0, 1.0])):
        w = row_weights([cal], [site.path], "uniform", TimestepRows((500.0,), bucket))
        assert w.get(0, site.path, 0, 2).tolist() == expected
        assert w.get(0, site.path, 0, 5) is None  # rows that are not the samples: unknown
    assert row_weights([cal], [site.path], "uniform", None) is None


@pytest.mark.parametrize("options, match", [
    ({"timestep_buckets": 0}, "from 1 to 16"),
    ({"timestep_buckets": 2.0}, "from 1 to 16"),
    ({"timestep_buckets": 2, "fold": True}, "fold"),
    ({"timestep_buckets": 2, "recipe": "clq+lowrank"}, "low-rank"),
    ({"timestep_buckets": 2, "recipe": "gptq", "mean_correction": True}, "mean correction"),
])
def test_bad_bucket_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)
