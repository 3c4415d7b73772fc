"""Recipe d2quant end to end: DSQ on the down projections, GPTQ everywhere, the mean correction after."""

import pytest
import torch

import clq_compile
from clq_compile import tiny_models
from clq_compile.calibration import model_state
from clq_compile.options import parse_options
from tests.clq_compile.test_lowrank_recipes import calibrated as calibrated_pixart, layers_by_hand


def calibrated(**options):
    return calibrated_pixart(options.pop("recipe", "d2quant"), bits="w3a16", **options)


@pytest.fixture(scope="module")
def d2quant():
    return calibrated()


def test_down_projections_get_dual_scales_and_every_layer_gptq(d2quant):
    model, qt = d2quant
    state = model_state(qt)
    down = [p for p in state.layers if p.endswith("ff.net.2")]
    assert down and all(state.layers[p].method == "d2quant: dsq + gptq" for p in down)
    assert all(state.layers[p].act_mul is not None for p in down)
    others = [layer for p, layer in state.layers.items() if p not in down]
    assert others and all(layer.method == "d2quant: gptq" and layer.act_mul is None for layer in others)
    inputs = tiny_models.make_inputs("pixart", seed=5)
    with torch.no_grad():
        assert torch.equal(qt(**inputs).sample, layers_by_hand(model, state, inputs))


def test_the_mean_correction_is_d2quants_unless_turned_off(d2quant):
    _, qt = d2quant
    assert all(any(n.startswith("mean correction") for n in layer.notes)
               for layer in model_state(qt).layers.values())
    assert "mean correction: bias moved" in clq_compile.explain(qt)
    _, off = calibrated(mean_correction=False)
    assert not any(n.startswith("mean correction") for layer in model_state(off).layers.values() for n in layer.notes)


def test_dual_scales_lower_the_down_projections_error(d2quant):
    """DSQ is kept only where it beats one scale per row on the calibration inputs; with GPTQ on
    top the down projections' measured error stays below plain GPTQ's."""
    _, qt = d2quant
    _, plain = calibrated(recipe="gptq")
    dsq, gptq = model_state(qt).errors, model_state(plain).errors
    down = [p for p in dsq if p.endswith("ff.net.2")]
    assert sum(dsq[p] for p in down) < sum(gptq[p] for p in down)


def test_the_recipes_choice_of_mean_correction():
    assert parse_options({"recipe": "d2quant"}).corrects_means
    assert not parse_options({"recipe": "d2quant", "mean_correction": False}).corrects_means
    assert not parse_options({"recipe": "gptq"}).corrects_means
    assert parse_options({"recipe": "gptq", "mean_correction": True}).corrects_means
    with pytest.raises(ValueError, match="mean_correction.*True or False"):
        parse_options({"mean_correction": "yes"})
