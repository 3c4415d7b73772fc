"""Merging: layers reading one activation share its quantization and one GEMM, bit for bit."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clq_compile
from clq_compile import tiny_models
from clq_compile.options import parse_options
from clq_compile.passes.layer import ActivationTransform
from clq_compile.passes.lowering import lower
from clq_compile.passes.merging import plan_merges
from clq_compile.passes.policy import decide
from clq_compile.passes.recipes import run_recipe
from clq_compile.passes.weight_quantization import rtn
from tests.helpers import dynamo_graph

# What each tiny family merges, per block, as module-path suffixes.
EXPECTED = {
    "dit": {("attn1.to_q", "attn1.to_k", "attn1.to_v")},
    "pixart": {("attn1.to_q", "attn1.to_k", "attn1.to_v"),
               # every block's cross-attention key and value read the one projected caption
               ("attn2.to_k", "attn2.to_v") * 2},
    "sd3": {("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    "flux": {("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")},
}
_GRAPHS: dict = {}


def graph_of(family: str):
    """(model, inputs, gm, example_inputs, analysis) of a tiny model, batch 2; captured once."""
    if family not in _GRAPHS:
        model = tiny_models.build(family)
        inputs = tiny_models.make_inputs(family, batch=2)
        _GRAPHS[family] = (model, inputs, *dynamo_graph(model, inputs))
    return _GRAPHS[family]


def quantized(family: str, options: dict):
    model, inputs, gm, example_inputs, analysis = graph_of(family)
    opts = parse_options(options)
    chosen = {s.node for s in analysis.sites if decide(s, opts.policy()).quantize}
    weights = {s.path: example_inputs[s.weight_index] for s in analysis.sites if s.node in chosen}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = run_recipe(opts.recipe, weights, opts.method_configs(), None, opts.execution())
    return layers, chosen


def suffixes(paths):
    return tuple(p.split(".", 2)[2] if p.startswith(("transformer_blocks.", "single_transformer_blocks."))
                 else p for p in paths)


@settings(max_examples=12)
@given(st.sampled_from(tiny_models.FAMILIES), st.sampled_from(["w4a4", "w4a8", "w8a8"]),
       st.sampled_from(["rtn", "quarot"]), st.sampled_from([None, 32]), st.booleans())
def test_merged_output_equals_unmerged_output(family, bits, recipe, group, symmetric):
    model, inputs, gm, example_inputs, analysis = graph_of(family)
    layers, chosen = quantized(family, {"bits": bits, "recipe": recipe, "weight_group": group,
                                        "act_group": group, "weight_symmetric": symmetric})
    separate = lower(gm, analysis, layers, chosen, "reference", merge=False)(*example_inputs)
    merged_gm = lower(gm, analysis, layers, chosen, "reference")
    merged = merged_gm(*example_inputs)
    for a, b in zip(merged, separate):
        assert torch.equal(a, b)
    plan = merged_gm.meta["clq_merges"]
    assert {suffixes(m.paths) for m in plan.merges} == EXPECTED[family]
    assert plan.kept_apart == {}
    calls = [n for n in merged_gm.graph.nodes if n.target is torch.ops.clq.quant_linear.default]
    assert len(calls) == len(chosen) - sum(len(m.paths) - 1 for m in plan.merges)
    # The members now hold views of the merged weights; unmerged lowering still gives the same.
    again = lower(gm, analysis, layers, chosen, "reference", merge=False)(*example_inputs)
    assert all(torch.equal(a, b) for a, b in zip(again, separate))
    # Dynamo's graph is untouched and still computes the full-precision model.
    with torch.no_grad():
        expected = model(**inputs).sample
    assert torch.allclose(gm(*example_inputs)[0], expected, atol=1e-5)


def test_merged_weights_cost_no_memory_and_are_shared_by_later_lowerings():
    _, _, gm, _, analysis = graph_of("dit")
    layers, chosen = quantized("dit", {"bits": "w4a4", "recipe": "rtn"})
    first = lower(gm, analysis, layers, chosen, "reference")
    qkv = [layers[f"transformer_blocks.0.attn1.to_{x}"].weight.qweight for x in "qkv"]
    base = qkv[0]._base
    assert base is not None and all(q._base is base for q in qkv)
    second = lower(gm, analysis, layers, chosen, "reference")
    name = "transformer_blocks_0_attn1_to_q_to_k_to_v_qweight"
    assert getattr(first, name) is base and getattr(second, name) is base


def test_a_differing_transform_is_kept_apart_and_said_why():
    _, _, gm, example_inputs, analysis = graph_of("dit")
    layers, chosen = quantized("dit", {"bits": "w4a4", "recipe": "rtn"})
    k = "transformer_blocks.1.attn1.to_k"
    layers[k] = dataclasses.replace(layers[k], online=ActivationTransform(mul=torch.full((32,), 2.0)))
    layers[k] = dataclasses.replace(
        layers[k], weight=rtn(torch.randn(32, 32), parse_options({"bits": "w4a4"}).method_configs().quantizer).weight)
    plan = plan_merges(gm, analysis, layers, chosen)
    assert {m.paths for m in plan.merges if "transformer_blocks.1" in m.paths[0]} == {
        ("transformer_blocks.1.attn1.to_q", "transformer_blocks.1.attn1.to_v")}
    assert "multipliers differ" in plan.kept_apart[k]
    separate = lower(gm, analysis, layers, chosen, "reference", merge=False)(*example_inputs)
    merged = lower(gm, analysis, layers, chosen, "reference")(*example_inputs)
    assert torch.equal(merged[0], separate[0])


class Reshaping(torch.nn.Module):
    """q, k, v of one input; q's output viewed with its token axes merged (needs dense memory)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        q = self.q(x).view(-1, x.shape[-1])
        return q.sum(0) + self.k(x).view(x.shape[0], x.shape[1], 2, -1).sum((0, 1)).flatten() + self.v(x).sum((0, 1))


def test_a_view_merging_axes_gets_a_dense_copy():
    model = Reshaping()
    gm, example_inputs, analysis = dynamo_graph(model, {"x": torch.randn(2, 5, 32)})
    opts = parse_options({"bits": "w8a8"}).method_configs().quantizer
    layers = {s.path: rtn(example_inputs[s.weight_index], opts) for s in analysis.sites}
    chosen = {s.node for s in analysis.sites}
    merged_gm = lower(gm, analysis, layers, chosen, "reference")
    dense = [n for n in merged_gm.graph.nodes if n.op == "call_method" and n.target == "contiguous"]
    assert len(dense) == 1  # q's: k's view only splits the last axis
    (out,) = merged_gm(*example_inputs)
    (separate,) = lower(gm, analysis, layers, chosen, "reference", merge=False)(*example_inputs)
    assert torch.equal(out, separate)


def test_explain_says_what_was_merged_and_what_was_not():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        model = tiny_models.build("dit")
        qt = torch.compile(model, backend="clq", options={"bits": "w4a8", "recipe": "smoothquant"})
        with clq_compile.calibrating(qt):
            for seed in range(2):
                qt(**tiny_models.make_inputs("dit", seed=seed))
        text = clq_compile.explain(qt)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("transformer_blocks.")}
    # SmoothQuant chooses each layer's multiplier from its own weight: nothing shares.
    assert "not merged: reads the same input as" in rows["transformer_blocks.0.attn1.to_k"]
    assert "multipliers differ" in rows["transformer_blocks.0.attn1.to_q"]

    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "recipe": "rtn"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt(**tiny_models.make_inputs("dit"))
    rows = {line.split()[0]: line for line in clq_compile.explain(qt).splitlines()
            if line.startswith("transformer_blocks.")}
    assert ("merged with transformer_blocks.0.attn1.to_q, transformer_blocks.0.attn1.to_v"
            in rows["transformer_blocks.0.attn1.to_k"])
    assert "merged" not in rows["transformer_blocks.0.attn1.to_out.0"]


@pytest.mark.parametrize("family", ["flux"])
def test_merged_model_saves_and_loads_per_layer(family, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        model = tiny_models.build(family)
        inputs = tiny_models.make_inputs(family)
        qt = torch.compile(model, backend="clq", options={"bits": "w4a4", "recipe": "rtn"})
        out = qt(**inputs).sample
        clq_compile.save(qt, tmp_path / "m.safetensors")
        torch._dynamo.reset()
        loaded = torch.compile(model, backend="clq", options={"load": str(tmp_path / "m.safetensors")})
        again = loaded(**inputs).sample
    assert torch.equal(out, again)
