"""Capture: parameter paths, linear sites, roles, blocks and the dataflow view."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile import tiny_models
from clq_compile.passes.capture import dotted_path, name_hint, source_path
from tests.helpers import dynamo_graph


def test_source_path_reads_dynamo_sources():
    src = ("L['self'].__dict__['_modules']['transformer_blocks']._modules['3']._modules['attn1']"
           "._modules['to_q']._parameters['weight']")
    assert source_path(src) == "transformer_blocks.3.attn1.to_q.weight"
    assert source_path("L['self'].__dict__['_parameters']['scale_shift_table']") == "scale_shift_table"
    assert source_path("L['fn']._modules['0']._parameters['bias']") == "0.bias"
    assert source_path("L['hidden_states']") is None
    assert source_path("L['args'][0]") is None
    # Module-stack entries mix bracket keys and attribute access, digits included.
    assert dotted_path("L['self'].__dict__['_modules']['transformer_blocks'].0.attn1.to_q") == \
        "transformer_blocks.0.attn1.to_q"


@given(st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=5))
def test_source_path_round_trips_any_module_path(names):
    src = "L['self']" + "".join(f"._modules['{n}']" for n in names[:-1]) + f"._parameters['{names[-1]}']"
    assert source_path(src) == ".".join(names)


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def captured(request):
    family = request.param
    model = tiny_models.build(family)
    gm, example_inputs, analysis = dynamo_graph(model, tiny_models.make_inputs(family))
    return family, model, gm, example_inputs, analysis


def test_every_linear_module_is_a_site_with_its_live_weight(captured):
    family, model, gm, example_inputs, analysis = captured
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # Flux's guidance embedder is not called without guidance; every other linear runs.
    ran = {s.path for s in analysis.sites}
    assert ran <= linears and len(ran) >= len(linears) - 2
    modules = dict(model.named_modules())
    for site in analysis.sites:
        assert example_inputs[site.weight_index] is modules[site.path].weight
        assert (site.out_features, site.in_features) == tuple(modules[site.path].weight.shape)
        if site.bias_index is not None:
            assert example_inputs[site.bias_index] is modules[site.path].bias


def test_placeholders_are_classified(captured):
    family, model, gm, example_inputs, analysis = captured
    params = {id(p) for p in model.parameters()}
    for ph in analysis.placeholders:
        assert (ph.kind == "parameter") == (id(example_inputs[ph.index]) in params)
        if ph.kind == "parameter":
            assert model.get_parameter(ph.path) is example_inputs[ph.index]
    assert "hidden_states" in " ".join(p.name for p in analysis.placeholders if p.kind == "input")


def test_roles_and_blocks(captured):
    family, model, gm, example_inputs, analysis = captured
    roles = {s.path: s.role for s in analysis.sites}
    blocks = [s.block_name for s in analysis.sites if s.block is not None]
    assert analysis.blocks == list(dict.fromkeys(blocks))
    attn = "attn1" if family in ("dit", "pixart") else "attn"
    assert roles[f"transformer_blocks.0.{attn}.to_q"] == "attn_q"
    assert roles[f"transformer_blocks.0.{attn}.to_out.0"] == "attn_out"
    assert roles["transformer_blocks.0.ff.net.0.proj"] == "ff_up"
    assert roles["transformer_blocks.0.ff.net.2"] == "ff_down"
    assert {"conditioning"} <= set(roles.values())
    if family == "pixart":
        assert roles["transformer_blocks.1.attn2.to_k"] == "cross_k"
        assert roles["adaln_single.linear"] == "adaln"
    if family == "flux":
        assert roles["single_transformer_blocks.0.proj_out"] == "single_out"
        assert roles["proj_out"] == "final"
        assert roles["x_embedder"] == "embed"
        assert analysis.blocks == ["transformer_blocks.0", "single_transformer_blocks.0"]
    if family == "sd3":
        assert roles["transformer_blocks.0.attn.add_q_proj"] == "context_q"


def test_dataflow_follows_attention_and_feed_forward(captured):
    family, model, gm, example_inputs, analysis = captured
    node = {s.path: s.node for s in analysis.sites}
    attn = "attn1" if family in ("dit", "pixart") else "attn"
    flow = analysis.dataflow
    for proj in ("to_q", "to_k", "to_v"):
        assert flow.has_edge(node[f"transformer_blocks.0.{attn}.{proj}"],
                             node[f"transformer_blocks.0.{attn}.to_out.0"])
    assert flow.has_edge(node["transformer_blocks.0.ff.net.0.proj"], node["transformer_blocks.0.ff.net.2"])
    # q does not feed k: they read the same input, side by side.
    assert not flow.has_edge(node[f"transformer_blocks.0.{attn}.to_q"], node[f"transformer_blocks.0.{attn}.to_k"])


class _Unnamed(torch.nn.Module):
    """Linears no name rule knows: one reads a [batch, features] vector, one a token stream."""

    def __init__(self):
        super().__init__()
        self.mystery_vector = torch.nn.Linear(8, 8)
        self.mystery_tokens = torch.nn.Linear(8, 8)

    def forward(self, tokens, vector):
        return self.mystery_tokens(tokens) + self.mystery_vector(vector)[:, None]


def test_unknown_layers_are_classified_by_their_input():
    gm, _, analysis = dynamo_graph(_Unnamed(), {"tokens": torch.randn(2, 5, 8), "vector": torch.randn(2, 8)})
    roles = {s.path: s.role for s in analysis.sites}
    assert roles == {"mystery_tokens": "token", "mystery_vector": "conditioning"}


def test_rebinding_other_parameters_reuses_the_structural_analysis(monkeypatch):
    from clq_compile.passes import capture

    model = tiny_models.build("dit")
    gm, example_inputs, analysis = dynamo_graph(model, tiny_models.make_inputs("dit"))
    built = []
    real = capture.Structure
    monkeypatch.setattr(capture, "Structure", lambda *a: built.append(1) or real(*a))
    rebound = capture.rebind(gm, analysis, list(example_inputs), capture.module_names(model))
    assert built == []
    assert [(s.path, s.role) for s in rebound.sites] == [(s.path, s.role) for s in analysis.sites]


def test_every_layer_of_an_embedding_mlp_is_named_an_embedding():
    # Motif's context_embedder and Krea2's txt_in are two linears around an activation.
    for path in ("context_embedder.linear_1", "context_embedder.linear_2", "txt_in.linear_1", "txt_in.linear_2"):
        assert name_hint(path) == "embed", path


def test_an_output_head_traced_in_its_own_frame_is_named_a_final_projection():
    # WanAnimate-2's forward falls back to eager at a graph break, HiDream's breaks before its
    # output layer: their output heads are traced alone, where the graph neither reads the
    # model's inputs nor ends at its return.
    assert name_hint("head.head") == "final"
    assert name_hint("final_layer.linear") == "final"
