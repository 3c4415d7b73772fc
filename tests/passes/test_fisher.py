"""Fisher-guided calibration weights (passes/fisher.py) against float64 finite differences and Jacobians."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch.utils._pytree import tree_flatten

from clq_compile import tiny_models
from clq_compile.passes.fisher import (bucket_means, fisher_weights, probe_value,
                                       row_sensitivities)
from clq_compile.passes.observers import GraphCalibration
from clq_compile.passes.statistics import LayerStats
from tests.helpers import dynamo_graph

INPUTS = ("hidden_states", "timestep", "class_labels")


@pytest.fixture(scope="module")
def calibration():
    """The tiny DiT's graph in float64 with three recorded calls of two images each."""
    model = tiny_models.build("dit", seed=3).double()
    gm, example, analysis = dynamo_graph(model, tiny_models.make_inputs("dit", batch=2, dtype=torch.float64))
    state = {p.index: example[p.index] for p in analysis.placeholders if p.kind != "input"}
    order = [p.source for p in analysis.placeholders if p.kind == "input"]
    assert sorted(order) == sorted(INPUTS)
    calls = []
    for seed in range(3):
        inputs = tiny_models.make_inputs("dit", batch=2, seed=seed, dtype=torch.float64)
        calls.append([inputs[name] for name in order])
    return GraphCalibration(gm, analysis, state, calls)


def token_site(cal):
    return next(s for s in cal.analysis.sites if s.path.endswith("attn1.to_v"))


def test_the_gradient_is_the_finite_difference_of_the_probed_output(calibration):
    """With every linear watched (as fisher_weights watches them), a layer's gradient is the
    derivative through all the layers after it."""
    site = next(s for s in calibration.analysis.sites if s.path.endswith("0.attn1.to_q"))
    sites = {s.node: s for s in calibration.analysis.sites}
    args = next(calibration.arguments())
    value, grads = probe_value(calibration, args, probe=7, sites=sites)
    g = grads[site.node]
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-5
    plus, _ = probe_value(calibration, args, 7, sites, {site.node: eps * u})
    minus, _ = probe_value(calibration, args, 7, sites, {site.node: -eps * u})
    finite = float((plus - minus) / (2 * eps))
    assert finite == pytest.approx(float((g * u).sum()), rel=1e-6)
    assert float(value) != 0.0 and float(g.abs().max()) > 0


def test_probes_estimate_each_rows_squared_jacobian(calibration):
    """Hutchinson over many probes ≈ ‖∂f/∂y[b]‖²_F / (entries of y[b]) from the full float64 Jacobian."""
    site = token_site(calibration)
    sites = {site.node: site}
    args = next(calibration.arguments())
    _, grads = probe_value(calibration, args, 0, sites)
    shape = grads[site.node].shape

    class Through(torch.fx.Interpreter):  # adds delta to the site's output, keeping the gradient path
        def run_node(self, n):
            out = super().run_node(n)
            return out + self.delta if n.name == site.node else out

    def output(delta):
        interpreter = Through(calibration.gm)
        interpreter.delta = delta
        outs, _ = tree_flatten(interpreter.run(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))
        return torch.cat([o.reshape(-1) for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()])

    jacobian = torch.autograd.functional.jacobian(output, torch.zeros(shape, dtype=torch.float64))
    exact = jacobian.reshape(jacobian.shape[0], shape[0], -1).square().sum(dim=(0, 2)) / shape[1:].numel()
    calls = GraphCalibration(calibration.gm, calibration.analysis, calibration.state, calibration.calls[:1])
    estimate = row_sensitivities(calls, [site.path], probes=400)[site.path][0]
    assert torch.allclose(estimate, exact, rtol=0.15)


@given(st.lists(st.floats(0, 10), min_size=1, max_size=30), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_bucket_means_average_values_of_one_quantile_bucket(values, buckets, seed):
    v = torch.tensor(values, dtype=torch.float64)
    keys = torch.randint(0, 5, (len(values),), generator=torch.Generator().manual_seed(seed)).double()
    out = bucket_means(v, keys, buckets)
    edges = torch.quantile(keys, torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]).unique()
    ids = torch.bucketize(keys, edges).tolist()
    for i, bucket in enumerate(ids):
        same = [values[j] for j, b in enumerate(ids) if b == bucket]
        assert float(out[i]) == pytest.approx(sum(same) / len(same))


def test_weights_average_one_and_rows_of_one_bucket_share_a_weight(calibration):
    site = token_site(calibration)
    weights = fisher_weights([calibration], [site.path], probes=2, buckets=2)
    w = torch.stack([weights.get(0, site.path, c) for c in range(len(calibration.calls))])
    assert w.shape == (3, 2) and float(w.double().mean()) == pytest.approx(1.0, rel=1e-6)
    t = torch.stack(calibration.timesteps())
    edges = torch.quantile(t.reshape(-1), torch.tensor([0.5], dtype=torch.float64)).unique()
    ids = torch.bucketize(t.reshape(-1), edges)
    for b in ids.unique():
        assert w.reshape(-1)[ids == b].unique().numel() == 1
    assert weights.get(0, "no.such.layer", 0) is None


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_a_weighted_hessian_is_the_weighted_mean_of_outer_products(d0, tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(d0, tokens, k, generator=g) for _ in range(2)]
    ws = [torch.rand(d0, generator=g) + 0.1 for _ in range(2)]
    stats = LayerStats(k, hessian=True)
    for x, w in zip(xs, ws):
        stats.add(x, w)
    num = sum((w.double()[:, None, None, None] * x.double()[..., :, None] * x.double()[..., None, :]).sum(dim=(0, 1))
              for x, w in zip(xs, ws))
    den = sum(float(w.double().sum()) * tokens for w in ws)
    assert torch.allclose(stats.hessian, 2 * num / den, rtol=1e-10, atol=1e-12)
    plain, ones = LayerStats(k, hessian=True), LayerStats(k, hessian=True)
    for x in xs:
        plain.add(x)
        ones.add(x, torch.ones(d0))
    assert torch.allclose(plain.hessian, ones.hessian, rtol=1e-12)


def test_bad_row_weights_are_refused():
    with pytest.raises(ValueError, match="row weights"):
        LayerStats(4).add(torch.randn(2, 3, 4), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="row weights"):
        LayerStats(4).add(torch.randn(2, 3, 4), torch.ones(3))


@pytest.mark.parametrize("recipe", ["gptq", "clq+gptq"])
def test_fisher_weighting_reaches_the_hessians_of_the_recipes(recipe, monkeypatch):
    """Through the backend: every layer's statistics get row weights (on the recipes' statistics
    and under CBC alike), GPTQ's weights change, and the artifact options record the option."""
    from clq_compile.calibration import model_state
    from tests.clq_compile.test_lowrank_recipes import calibrated

    _, uniform = calibrated(recipe)
    plain = {p: layer.weight.qweight for p, layer in model_state(uniform).layers.items()}
    weighted = []
    add = LayerStats.add

    def spy(self, x, weights=None):
        weighted.append(weights is not None)
        return add(self, x, weights)

    monkeypatch.setattr(LayerStats, "add", spy)
    _, fisher = calibrated(recipe, calibration_weighting="fisher")
    state = model_state(fisher)
    assert weighted and all(weighted)
    assert state.options.quantization_dict()["calibration_weighting"] == "fisher"
    assert any(not torch.equal(layer.weight.qweight, plain[p]) for p, layer in state.layers.items())


def test_bad_weighting_is_refused():
    from clq_compile.options import parse_options

    with pytest.raises(ValueError, match="calibration_weighting.*'uniform', 'fisher'"):
        parse_options({"calibration_weighting": "time"})


@given(st.sampled_from(["l2", "l1"]), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_the_search_objective_weighs_rows_as_a_float64_sum(norm, rows, width, seed):
    from clq_compile.passes.observers import RelativeError

    g = torch.Generator().manual_seed(seed)
    y, e, w = torch.randn(rows, 3, width, generator=g), torch.randn(rows, 3, width, generator=g), torch.rand(rows, generator=g)
    meter = RelativeError(norm)
    meter.add("n", y, e, w)
    size = (lambda t: t.abs()) if norm == "l1" else (lambda t: t.square())
    err = (w.double()[:, None, None] * size(e.double() - y.double())).sum()
    ref = (w.double()[:, None, None] * size(y.double())).sum()
    expected = float(err / ref) ** (1.0 if norm == "l1" else 0.5)
    assert meter.result()["n"] == pytest.approx(expected, rel=1e-5)


def test_fisher_weighting_weighs_the_clps_objective(monkeypatch):
    from clq_compile.passes import cross_layer_search
    from tests.clq_compile.test_lowrank_recipes import calibrated

    seen = []
    measure = cross_layer_search.relative_errors

    def spy(outputs, references, nodes, norm, weights=None):
        seen.append(weights is not None and all(weights(c, n, references[c][n].shape[0]) is not None for c in range(len(outputs))
                                                for n in nodes))
        return measure(outputs, references, nodes, norm, weights)

    monkeypatch.setattr(cross_layer_search, "relative_errors", spy)
    calibrated("clq", calibration_weighting="fisher")
    assert seen and all(seen)
    seen.clear()
    calibrated("clq")
    assert seen and not any(seen)


def test_a_module_called_twice_keeps_uniform_weights(calibration):
    """Two sites of one path (a shared module called twice) have no single row weight per call."""
    import dataclasses

    site = token_site(calibration)
    other = next(s for s in calibration.analysis.sites if s.path.endswith("attn1.to_q"))
    twice = [dataclasses.replace(s, path=site.path) if s.node == other.node else s for s in calibration.analysis.sites]
    analysis = dataclasses.replace(calibration.analysis, sites=twice)
    cal = GraphCalibration(calibration.gm, analysis, calibration.state, calibration.calls)
    weights = fisher_weights([cal], [site.path], probes=1)
    assert weights.get(0, site.path, 0) is None


def test_sensitivities_of_calls_recorded_under_inference_mode(calibration):
    """Calibrating under torch.inference_mode() records inference tensors, and enable_grad alone
    does not lift inference mode: the probes must still see the gradients (not zeros)."""
    paths = [s.path for s in calibration.analysis.sites]
    expected = row_sensitivities(calibration, paths, probes=2)
    with torch.inference_mode():
        calls = [[a.clone() for a in call] for call in calibration.calls]
        recorded = GraphCalibration(calibration.gm, calibration.analysis, calibration.state, calls)
        got = row_sensitivities(recorded, paths, probes=2)
    assert got.keys() == expected.keys() and all(float(v.abs().max()) > 0 for v in got.values())
    assert all(torch.equal(got[p], expected[p]) for p in expected)
