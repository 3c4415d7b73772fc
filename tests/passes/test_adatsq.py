"""Recipe adatsq (passes/adatsq.py): the beam search's budget and optimality guarantees, and the
recipe end to end: mixed modes per layer and timestep bucket, compiled, saved and loaded."""

import itertools
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clq_compile
from clq_compile import stress
from clq_compile.artifact import ArtifactError
from clq_compile.calibration import model_state
from clq_compile.options import parse_options
from clq_compile.passes.adatsq import average_bits, beam_search, pareto_front
from tests.clq_compile.test_artifact_hostile import forge, manifest_text
from tests.passes.test_timesteps import by_hand, calibrated, pixart_inputs

BITS = [4.0, 6.0, 8.0]


@st.composite
def problems(draw):
    units = draw(st.integers(1, 5))
    errors = [sorted(draw(st.lists(st.floats(0, 10), min_size=3, max_size=3)), reverse=draw(st.booleans()))
              for _ in range(units)]
    costs = draw(st.lists(st.floats(0.1, 10), min_size=units, max_size=units))
    budget = draw(st.floats(4, 8))
    return errors, costs, budget


@settings(deadline=None, max_examples=200)
@given(problems(), st.integers(1, 4))
def test_the_search_keeps_its_budget_and_beats_every_uniform_choice(problem, width):
    errors, costs, budget = problem
    result = beam_search(errors, costs, BITS, budget, width)
    objective = sum(e[m] for e, m in zip(errors, result.state))
    assert result.objective == pytest.approx(objective)
    assert average_bits(result.state, costs, BITS) <= budget + 1e-9
    for m in range(3):
        if average_bits((m,) * len(errors), costs, BITS) <= budget + 1e-9:
            assert result.objective <= sum(e[m] for e in errors) + 1e-9
    # Never better than the true optimum (a check of the bookkeeping), found exactly when the beam is wide.
    feasible = [s for s in itertools.product(range(3), repeat=len(errors))
                if average_bits(s, costs, BITS) <= budget + 1e-9]
    optimum = min(sum(e[m] for e, m in zip(errors, s)) for s in feasible)
    assert result.objective >= optimum - 1e-9
    assert all(a <= budget + 1e-9 for a, _ in result.explored)


def test_a_budget_below_the_cheapest_mode_is_refused():
    with pytest.raises(ValueError, match="below the cheapest"):
        beam_search([[1.0, 0.5, 0.1]], [1.0], BITS, 3.5)


def test_the_pareto_front_keeps_only_undominated_points():
    points = [(4.0, 1.0), (5.0, 1.2), (5.0, 0.5), (6.0, 0.5), (7.0, 0.1)]
    assert pareto_front(points) == [(4.0, 1.0), (5.0, 0.5), (7.0, 0.1)]


@pytest.fixture(scope="module")
def adatsq_w4a8():
    return calibrated("adatsq", bits="w4a8")


def test_adatsq_mixes_modes_within_its_budget_and_beats_uniform_w4a8(adatsq_w4a8):
    model, qt = adatsq_w4a8
    report = clq_compile.search_report(qt)["adatsq"]
    assert report["avg_bits_budget"] == 6.0 and report["chosen"]["avg_bits"] <= 6.0
    uniform = {u["mode"]: u for u in report["uniform"]}
    assert set(uniform) == {"w4a4", "w4a8"}  # w8a8 everywhere costs 8 bits
    assert report["chosen"]["measured"] <= uniform["w4a8"]["measured"]
    state = model_state(qt)
    held = {(b.weight.format.name, b.a_format.name) for layer in state.layers.values()
            for b in (layer.buckets.layers if layer.buckets else [layer])}
    assert len(held) > 1 and held <= {("int4", "int4"), ("int4", "int8"), ("int8", "int8")}
    for timesteps in ([100, 100], [900, 900], [100, 900]):
        inputs = pixart_inputs(5, timesteps)
        with torch.no_grad():
            assert torch.equal(qt(**inputs).sample, by_hand(model, state, inputs))


def test_the_choice_is_the_measured_best_of_the_reranked_states(adatsq_w4a8):
    _, qt = adatsq_w4a8
    report = clq_compile.search_report(qt)["adatsq"]
    measured = report["measured"]
    chosen = [m for m in measured if m["chosen"]]
    assert len(chosen) == 1 and chosen[0]["measured"] == min(m["measured"] for m in measured)
    assert all(a <= 6.0 + 1e-9 for a, _ in report["explored"])


@pytest.fixture(scope="module")
def saved_adatsq(adatsq_w4a8, tmp_path_factory):
    _, qt = adatsq_w4a8
    path = tmp_path_factory.mktemp("adatsq") / "a.safetensors"
    clq_compile.save(qt, path)
    inputs = pixart_inputs(5, [100, 900])
    with torch.no_grad():
        return path, inputs, qt(**inputs).sample


def test_a_mixed_artifact_loads_and_runs_the_same(saved_adatsq):
    path, inputs, expected = saved_adatsq
    torch._dynamo.reset()
    loaded = clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path,
                              options={"kernels": "reference"})
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)
    assert "w4a4/" in clq_compile.explain_artifact(path) or "/w8a8" in clq_compile.explain_artifact(path)


def test_a_forged_mode_outside_adatsq_modes_is_refused(saved_adatsq, tmp_path):
    path = tmp_path / "a.safetensors"
    shutil.copy(saved_adatsq[0], path)

    def edit(manifest):
        manifest["options"]["adatsq_modes"] = ["w4a4", "w4a8"]

    forge(path, edit)
    manifest = json.loads(manifest_text(path))
    if not any(b["w_format"] == "int8" for e in manifest["layers"].values() for b in e.get("buckets", [e])):
        pytest.skip("the search chose no w8a8 layer")
    torch._dynamo.reset()
    with pytest.raises(ArtifactError, match="w_format"):
        clq_compile.load(stress.stress_model("pixart", seed=0, heads=4, head_dim=16), path)


def test_without_calibration_adatsq_is_its_base_at_bits():
    torch._dynamo.reset()
    model = stress.stress_model("pixart", seed=0, heads=4, head_dim=16)
    qt = torch.compile(model, backend="clq", options={"bits": "w4a8", "kernels": "reference", "recipe": "adatsq"})
    with pytest.warns(UserWarning, match="without calibration"), torch.no_grad():
        qt(**pixart_inputs(5, [100, 900]))
    layers = model_state(qt).layers.values()
    assert all(layer.buckets is None and (layer.weight.format.name, layer.a_format.name) == ("int4", "int8")
               and any("no calibration data" in n for n in layer.notes) for layer in layers)


@pytest.mark.parametrize("options, match", [
    ({"recipe": "adatsq", "bits": "fp8"}, "bits must be one of adatsq_modes"),
    ({"recipe": "adatsq", "avg_bits": 3.0}, "from 4"),
    ({"recipe": "adatsq", "avg_bits": "6"}, "from 4"),
    ({"recipe": "clq", "avg_bits": 6.0}, "recipe adatsq"),
    ({"recipe": "adatsq", "adatsq_modes": ["w4a4"]}, "at least two"),
    ({"recipe": "adatsq", "adatsq_modes": "w4a4"}, "list of bits modes"),
    ({"recipe": "adatsq", "adatsq_modes": ["w4a4", "w4a16"]}, "adatsq_modes"),
    ({"recipe": "adatsq", "adatsq_base": "svdquant"}, "adatsq_base"),
    ({"recipe": "adatsq", "adatsq_modes": ["w4a4", "fp8"], "act_group": 32}, "rowwise"),
])
def test_bad_adatsq_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_the_budget_defaults_to_the_bits_modes_own():
    assert parse_options({"recipe": "adatsq", "bits": "w4a8"}).method_configs().adatsq.avg_bits == 6.0
    assert parse_options({"recipe": "adatsq", "bits": "w4a4", "avg_bits": 4.5}).method_configs().adatsq.avg_bits == 4.5
    assert parse_options({"recipe": "adatsq"}).buckets == 4
    assert parse_options({"recipe": "adatsq", "timestep_buckets": 1}).buckets == 1
