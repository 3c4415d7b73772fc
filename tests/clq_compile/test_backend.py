"""The clq backend end to end on diffusers' DiT, PixArt, SD3 and Flux (tiny configs, CPU reference path)."""

import subprocess
import sys
import warnings

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.calibration import model_state
from clq_compile.passes.lowering import merge_name
from tests.helpers import rel_error


def compile_and_calibrate(family, model, bits, calls=3, **options):
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": bits, "kernels": "reference", **options})
    with torch.no_grad(), clq_compile.calibrating(qt):
        for seed in range(calls):
            qt(**tiny_models.make_inputs(family, seed=100 + seed))
    return qt


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def family_model(request):
    return request.param, tiny_models.build(request.param)


def run(model, family, **kw):
    with torch.no_grad():
        return model(**tiny_models.make_inputs(family, **kw)).sample


def test_w16a16_is_exactly_eager(family_model):
    family, model = family_model
    qt = compile_and_calibrate(family, model, "w16a16")
    assert torch.equal(run(qt, family, seed=1), run(model, family, seed=1))
    assert "state=captured" in clq_compile.explain(qt) or "w16a16" in clq_compile.explain(qt)


def test_quantized_errors_and_shapes(family_model):
    family, model = family_model
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = run(model, family, seed=1)

    qt8 = compile_and_calibrate(family, model, "w8a8")
    err8 = rel_error(run(qt8, family, seed=1), ref)
    qt4 = compile_and_calibrate(family, model, "w4a4")
    out4 = run(qt4, family, seed=1)
    err4 = rel_error(out4, ref)

    assert err8 < 0.02
    assert torch.isfinite(out4).all()
    assert err4 > err8 > 0  # quantization really happens, and 4 bits cost more than 8

    state = model_state(qt4)
    assert state.calibrations == 1 and state.phase == "quantized"
    # A new batch size, then a new resolution: Dynamo recompiles, the quantized layers are reused.
    for kw, expected in (({"batch": 2}, 2), ({"batch": 1, "size": 12}, 1)):
        out = run(qt4, family, seed=1, **kw)
        assert out.shape[0] == expected and torch.isfinite(out).all()
        eager = run(model, family, seed=1, **kw)
        assert 0 < rel_error(out, eager) < 0.5
    assert len(state.graphs) >= 2
    assert state.calibrations == 1
    assert all(g.lowered is not None for g in state.graphs)
    # Recompiled graphs read the very same packed tensors (for merged layers, the one tensor whose
    # rows their own qweights view).
    path = next(iter(state.layers))
    own = state.layers[path].weight.qweight
    prefix = path.replace(".", "_")
    qweights = [getattr(g.lowered, next(n.args[1].target for n in g.lowered.graph.nodes
                                        if n.target is torch.ops.clq.quant_linear.default
                                        and n.name.startswith(prefix)))
                for g in state.graphs]
    assert all(t is (own if own._base is None else own._base) for t in qweights)

    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), f"{n} was modified"


def test_graph_is_genuinely_quantized(family_model):
    family, model = family_model
    qt = compile_and_calibrate(family, model, "w4a4")
    run(qt, family)
    (gm, *_) = clq_compile.graphs(qt)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.clq.quant_linear.default]
    state = model_state(qt)
    quantized = {p for p, layer in state.layers.items()}
    merges = gm.meta["clq_merges"].merges
    merged = {p for m in merges for p in m.paths}
    assert merges  # q/k/v at least (tests/passes/test_merging.py)
    assert len(calls) == len([s for s in state.graphs[0].analysis.sites if s.path in quantized]) - sum(
        len(m.paths) - 1 for m in merges)
    for call in calls:
        qweight = getattr(gm, call.args[1].target)
        assert qweight.dtype == torch.uint8  # two int4 per byte
        assert call.args[8] == 2 * qweight.shape[1]
        assert call.args[9:11] == ("int4", "int4")
        # The node is named after the layer (or the merged layers) it replaces.
        assert call.name in {p.replace(".", "_") for p in quantized - merged} | {merge_name(m.paths) for m in merges}
    assert not any(n.target in (torch._C._nn.linear,) and n.name in {c.name for c in calls}
                   for n in gm.graph.nodes)
    assert "clq.quant_linear" in gm.print_readable(print_output=False)


def test_explain_lists_every_layer_with_its_decision(family_model):
    family, model = family_model
    qt = compile_and_calibrate(family, model, "w4a4")
    text = clq_compile.explain(qt)
    state = model_state(qt)
    for site in state.graphs[0].analysis.sites:
        assert site.path in text
    lines = {line.split()[0]: line for line in text.splitlines()[3:]}
    for path, error in state.errors.items():
        assert "quantized" in lines[path] and f"{error:.4f}" in lines[path]
        assert 0 < error < 1
    assert any("kept: conditioning GEMM" in line for line in lines.values())
    # The terms of the method column are spelled out under the table, the score formula included.
    assert "score_c = max_t|x_tc| / mean_c' max_t|x_tc'|" in text and "CLPS target" in text


def test_data_free_quantization_warns_once():
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4"})
    with pytest.warns(UserWarning, match="without calibration data") as record:
        out = run(qt, "dit")
        run(qt, "dit", batch=2)
    assert sum("without calibration" in str(w.message) for w in record) == 1
    assert torch.isfinite(out).all()
    assert model_state(qt).calibrations == 0
    assert 0 < rel_error(out, run(model, "dit")) < 0.5


def test_another_model_of_the_same_class_and_options_gets_its_own_state():
    """Dynamo serves a second model of one class and shapes with the graph compiled for the first
    (it guards on parameter shapes, not identity): the second must still quantize its own weights,
    calibrate on its own calls and show its own layers, not run the first one's."""
    first, second = tiny_models.build("pixart", seed=0), tiny_models.build("pixart", seed=1)
    qa = compile_and_calibrate("pixart", first, "w8a8")
    qb = torch.compile(second, backend="clq", options={"bits": "w8a8", "kernels": "reference"})
    with pytest.warns(UserWarning, match="without calibration data"):
        data_free = run(qb, "pixart", seed=1)
    assert rel_error(data_free, run(second, "pixart", seed=1)) < 0.02
    with torch.no_grad(), clq_compile.calibrating(qb):
        for seed in range(3):
            qb(**tiny_models.make_inputs("pixart", seed=100 + seed))
    assert rel_error(run(qb, "pixart", seed=1), run(second, "pixart", seed=1)) < 0.02
    assert model_state(qb) is not model_state(qa) and model_state(qb).calibrations == 1
    assert "graphs=1" in clq_compile.explain(qb).splitlines()[0]
    assert rel_error(run(qa, "pixart", seed=1), run(first, "pixart", seed=1)) < 0.02


def test_past_dynamos_recompile_limit_calibrating_says_the_model_is_not_compiled(monkeypatch):
    """Each model of a class compiled with other options is one more compiled version of its
    forward; past the limit Dynamo runs the model eagerly, and no clq graph sees the calls."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    for search_calls in (1, 2, 3):
        model = tiny_models.build("dit", seed=search_calls)
        qt = torch.compile(model, backend="clq", options={"bits": "w8a8", "recipe": "rtn", "search_calls": search_calls})
        if search_calls < 3:
            with torch.no_grad(), clq_compile.calibrating(qt):
                qt(**tiny_models.make_inputs("dit"))
    with pytest.raises(RuntimeError, match=r"recompile_limit = 2.*runs this model eagerly, in full precision"):
        with torch.no_grad(), clq_compile.calibrating(qt):
            qt(**tiny_models.make_inputs("dit"))
    assert "not compiled: Dynamo holds 2 compiled versions" in clq_compile.explain(qt)
    torch._dynamo.reset()


def test_skip_patterns_keep_layers():
    model = tiny_models.build("pixart")
    qt = compile_and_calibrate("pixart", model, "w8a8", skip=["*.attn2.*"], quantize_cross_kv=False)
    state = model_state(qt)
    assert not any(".attn2." in p for p in state.layers)
    assert "matches skip pattern '*.attn2.*'" in clq_compile.explain(qt)


def test_a_skip_pattern_that_matches_no_layer_warns_once():
    model = tiny_models.build("pixart")
    with pytest.warns(UserWarning, match=r"skip pattern 'attn2' matched none of the \d+ linear layers") as record:
        qt = compile_and_calibrate("pixart", model, "w8a8", skip=["attn2", "*.attn1.*"])
        run(qt, "pixart", batch=2)  # a recompile quantizes nothing again, and does not warn again
    assert sum("skip pattern" in str(w.message) for w in record) == 1
    assert not any("'*.attn1.*'" in str(w.message) for w in record)
    assert not any(".attn1." in p for p in model_state(qt).layers)


def test_grouped_asymmetric_weights_run():
    model = tiny_models.build("sd3")
    qt = compile_and_calibrate("sd3", model, "w4a8", weight_group=32, act_group=32, weight_symmetric=False)
    err = rel_error(run(qt, "sd3", seed=1), run(model, "sd3", seed=1))
    layer = next(iter(model_state(qt).layers.values()))
    assert layer.weight.zero is not None and layer.weight.group == 32 and layer.a_group == 32
    assert 0 < err < 0.1


def test_calibrating_without_calls_raises_and_keeps_full_precision():
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4"})
    with pytest.raises(RuntimeError, match="recorded no calls"):
        with clq_compile.calibrating(qt):
            pass
    assert model_state(qt).phase == "captured"
    with clq_compile.calibrating(qt):
        run(qt, "dit")
    assert model_state(qt).calibrations == 1


def test_calibrating_needs_a_clq_compiled_module():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="torch.compile"):
        with clq_compile.calibrating(model):
            pass
    other = torch.compile(model, backend="eager")
    with pytest.raises(TypeError, match="other than 'clq'"):
        clq_compile.explain(other)
    # The two other ways of compiling: each named, with the one that works.
    with pytest.raises(TypeError, match=r"torch.compile\(model.forward\) gives a function"):
        clq_compile.explain(torch.compile(model.forward, backend="clq"))
    in_place = torch.nn.Linear(4, 4)
    in_place.compile(backend="clq")
    with pytest.raises(TypeError, match=r"compiled in place \(model.compile\(backend='clq'\)\)"):
        with clq_compile.calibrating(in_place):
            pass


def test_model_without_linear_layers_warns_and_runs():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4"})
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="no linear layers"):
        out = qt(x)
    assert torch.equal(out, model(x))


def test_backend_resolves_through_the_entry_point_without_importing_the_package():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 16))\n"
        "qt = torch.compile(m, backend='clq', options={'bits': 'w8a8'})\n"
        "x = torch.randn(1, 8, 16)\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "out = qt(x)\n"
        "assert 'clq_compile' in sys.modules\n"
        "assert not torch.equal(out, m(x))\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_no_warning_after_calibration():
    model = tiny_models.build("dit")
    qt = compile_and_calibrate("dit", model, "w4a4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run(qt, "dit")


def test_memory_report_counts_packed_bytes():
    model = tiny_models.build("pixart", heads=4, head_dim=32)
    qt = compile_and_calibrate("pixart", model, "w4a4", recipe="rtn")
    report = clq_compile.memory_report(qt)
    modules = dict(model.named_modules())
    for path, (fp_bytes, packed) in report["per_layer"].items():
        w = modules[path].weight
        assert fp_bytes == w.numel() * 4
        # 4-bit integers plus one float32 scale per output channel.
        assert packed == w.numel() // 2 + w.shape[0] * 4
    assert report["quantized_bytes"] < 0.3 * report["bf16_bytes"]
    assert "MiB packed" in clq_compile.explain(qt)


def test_inductor_path_compiles_the_rewritten_graph():
    """What runs on CUDA by default: the lowered graph through Inductor, the op kept opaque."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(1, 8, 32)
    eager = torch.compile(model, backend="clq", options={"bits": "w8a8", "recipe": "rtn", "inductor": "never"})
    with clq_compile.calibrating(eager):
        eager(x)
    expected = eager(x)
    torch._dynamo.reset()
    inductor = torch.compile(model, backend="clq", options={"bits": "w8a8", "recipe": "rtn", "inductor": "always"})
    with clq_compile.calibrating(inductor):
        inductor(x)
    out = inductor(x)
    graph = model_state(inductor).graphs[0]
    assert graph.run is not graph.lowered  # Inductor's compiled callable, not the FX graph
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
