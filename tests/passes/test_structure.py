"""Structural roles: kept layers are found from the graph, whatever the model is called or wrapped in."""

import warnings

import pytest
import torch
from torch import nn

from clq_compile import tiny_models
from clq_compile.calibration import model_state


def decisions(model, *args, reasons=False, **kwargs):
    """{path: (role, quantize)} after one data-free w8a8 call of `model` compiled with backend="clq"
    (reasons: (role, quantize, reason))."""
    torch._dynamo.reset()
    qt = torch.compile(model, backend="clq", options={"bits": "w8a8", "kernels": "reference"})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        qt(*args, **kwargs)
    return {p: (d["role"], d["quantize"], *((d["reason"],) if reasons else ()))
            for p, d in model_state(qt).site_decisions().items()}


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_wrapping_the_model_changes_no_decision(family):
    bare = decisions(tiny_models.build(family), **tiny_models.make_inputs(family))
    wrapped = decisions(Wrapper(tiny_models.build(family)), **tiny_models.make_inputs(family))
    assert wrapped == {f"inner.{p}": d for p, d in bare.items()}


class Block(nn.Module):
    """A transformer block with per-token modulation (a [B, T, C] conditioning stream chunked into
    shift / scale / gate), a fused q/k/v projection, a gated MLP and a routed expert on 2-D tokens."""

    def __init__(self, width=32):
        super().__init__()
        self.modulation = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.gated_up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(2 * width, width)
        self.expert = nn.Linear(width, width)

    def forward(self, x, per_token_conditioning):
        shift, scale, gate = self.modulation(per_token_conditioning).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        x = x + gate * self.out(attn)
        a, b = self.gated_up(x).chunk(2, dim=-1)
        x = x + self.down(a * torch.nn.functional.gelu(b))
        flat = x.reshape(-1, x.shape[-1])
        routed = flat[::2]  # the tokens a router sent to this expert: [tokens, C], no batch dimension
        return x + self.expert(routed).repeat_interleave(2, dim=0).reshape(x.shape)


class Model(nn.Module):
    def __init__(self, width=32, latent=8):
        super().__init__()
        self.img_in = nn.Linear(latent, width)
        self.time_in = nn.Linear(1, width)
        self.table = nn.Parameter(torch.randn(16, width))
        self.approximator = nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, latent)

    def forward(self, latents, timestep):
        x = self.img_in(latents)
        # Per-token conditioning from the timestep and a learned table only (as in Chroma).
        conditioning = self.approximator(self.time_in(timestep[:, None, None]) + self.table)
        for block in self.blocks:
            x = block(x, conditioning)
        # `type_as` reads only the latents' dtype (as Wan's output modulation does): the head does
        # not read the model input.
        return self.head(x + conditioning.type_as(latents))


def test_roles_come_from_the_graph_structure():
    torch.manual_seed(0)
    found = decisions(Model().eval(), torch.randn(2, 16, 8), torch.rand(2))
    roles = {p: r for p, (r, _) in found.items()}
    assert roles["img_in"] == "embed"
    assert roles["time_in"] == "conditioning" and roles["approximator"] == "conditioning"
    assert roles["head"] == "final"
    for b in range(2):
        # Its rows are the tokens (per-token conditioning), not the batch: a different reason.
        assert roles[f"blocks.{b}.modulation"] == "adaln_token"
        for name in ("qkv", "out", "gated_up", "down", "expert"):
            assert found[f"blocks.{b}.{name}"] == ("token", True), name


def test_a_modulation_says_whether_it_has_a_row_per_image_or_per_token():
    torch.manual_seed(0)
    per_token = decisions(Model().eval(), torch.randn(2, 16, 8), torch.rand(2), reasons=True)
    assert "one row per token" in per_token["blocks.0.modulation"][2]
    pixart = decisions(tiny_models.build("pixart"), **tiny_models.make_inputs("pixart"), reasons=True)
    assert pixart["adaln_single.linear"][0] == "adaln" and "one row per image" in pixart["adaln_single.linear"][2]


class RoutedExpert(nn.Module):
    """A mixture-of-experts layer whose experts run in their own graph (a graph break, as a
    data-dependent router causes) on [tokens, C] inputs: no batch dimension left to see."""

    def __init__(self, width=32):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        torch._dynamo.graph_break()
        routed = [expert(flat[i::2]) for i, expert in enumerate(self.experts)]
        return torch.stack(routed, 1).reshape(x.shape)


class MoEModel(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.time_in = nn.Linear(1, width)
        self.blocks = nn.ModuleList([RoutedExpert(width)])

    def forward(self, x, timestep):
        x = x + self.time_in(timestep[:, None, None])
        return self.blocks[0](x)


def test_routed_experts_on_token_rows_are_token_gemms_in_a_graph_of_their_own():
    torch.manual_seed(0)
    found = decisions(MoEModel().eval(), torch.randn(1, 16, 32), torch.rand(1))
    assert found["time_in"] == ("conditioning", False)
    assert found["blocks.0.experts.0"] == ("token", True) and found["blocks.0.experts.1"] == ("token", True)


class PackedSequenceModel(nn.Module):
    """Text ids and patch tokens written into one packed [tokens, C] buffer (no batch dimension),
    as Cosmos3-Omni does: the text comes from an embedding lookup of 1-D ids, both streams enter
    the buffer by in-place index writes (`[...] =`, `index_put_`), the timestep is given per token, and the prediction is
    read back at the positions an index input names, masked by an integer indicator input. The
    patches arrive as [1, tokens, latent]: the call's batch size is 1."""

    def __init__(self, width=32, latent=8, vocab=16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.proj_in = nn.Linear(latent, width)
        self.time_in = nn.Linear(1, width)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(text_q=nn.Linear(width, width),
                                                        image_q=nn.Linear(width, width)))])
        self.proj_out = nn.Linear(width, latent)

    def forward(self, input_ids, text_indexes, patches, image_indexes, timesteps, indicator):
        text, patches = self.embed_tokens(input_ids), patches.flatten(0, 1)
        x = text.new_zeros(len(input_ids) + len(patches), text.shape[-1])
        x[text_indexes] = text
        x.index_put_((image_indexes,), self.proj_in(patches) + self.time_in(timesteps[:, None]))
        block = self.blocks[0]
        n = len(input_ids)
        x = x + torch.cat([block.text_q(x[:n]), block.image_q(x[n:])])
        return self.proj_out(x[image_indexes] * (indicator[image_indexes, None] == 2))


def test_a_packed_sequence_written_in_place_carries_its_tokens():
    torch.manual_seed(0)
    found = decisions(PackedSequenceModel().eval(), torch.tensor([1, 2, 3]), torch.arange(3),
                      torch.randn(1, 4, 8), torch.arange(3, 7), torch.rand(4), torch.tensor([3, 3, 3, 2, 2, 2, 2]))
    assert found["blocks.0.text_q"] == ("token", True) and found["blocks.0.image_q"] == ("token", True)
    assert found["proj_in"] == ("embed", False) and found["time_in"] == ("conditioning", False)
    assert found["proj_out"] == ("final", False)


class EmbeddingMLPModel(nn.Module):
    """A context embedding made of two linears around an activation (under a name no rule knows,
    as LTX-2's audio_caption_projection), and a refiner layer outside the numbered blocks reading
    the patch embedding (as Z-Image's noise_refiner): only the former is an embedding. With
    `graph_break`, the embeddings are traced in a graph of their own, without any block (as
    QwenImage-2.1's `.item()` before its blocks does)."""

    def __init__(self, width=32, latent=8, text=16, graph_break=False):
        super().__init__()
        self.graph_break = graph_break
        self.patches_in = nn.Linear(latent, width)
        self.audio_text = nn.ModuleDict(dict(first=nn.Linear(text, width), second=nn.Linear(width, width)))
        self.refiner = nn.ModuleList([nn.ModuleDict(dict(q=nn.Linear(width, width), k=nn.Linear(width, width),
                                                         v=nn.Linear(width, width)))])
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(mix=nn.Linear(width, width)))])
        self.head = nn.Linear(width, latent)

    def forward(self, latents, text):
        x = self.patches_in(latents)
        refiner = self.refiner[0]
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        x = x + torch.nn.functional.scaled_dot_product_attention(refiner.q(h), refiner.k(h), refiner.v(h))
        context = self.audio_text.second(torch.nn.functional.gelu(self.audio_text.first(text)))
        if self.graph_break:
            torch._dynamo.graph_break()
        x = torch.cat([context, x], 1)
        x = x + self.blocks[0].mix(x)
        return self.head(x[:, text.shape[1]:])


@pytest.mark.parametrize("graph_break", [False, True])
def test_every_layer_of_an_embedding_mlp_is_an_embedding_and_a_refiner_is_not(graph_break):
    torch.manual_seed(0)
    found = decisions(EmbeddingMLPModel(graph_break=graph_break).eval(), torch.randn(1, 16, 8), torch.randn(1, 6, 16))
    assert found["patches_in"] == ("embed", False)
    assert found["audio_text.first"] == ("embed", False) and found["audio_text.second"] == ("embed", False)
    for name in ("q", "k", "v"):
        assert found[f"refiner.0.{name}"] == ("token", True), name
    assert found["blocks.0.mix"] == ("token", True) and found["head"] == ("final", False)


class UnprojectedTextModel(nn.Module):
    """Text tokens joining the stream as given, with no projection (ErnieImage when the text width
    is the model's): the last layer reads a model input through the residual stream alone."""

    def __init__(self, width=32, latent=8):
        super().__init__()
        self.patches_in = nn.Linear(latent, width)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(mix=nn.Linear(width, width)))])
        self.head = nn.Linear(width, latent)

    def forward(self, latents, text):
        x = torch.cat([self.patches_in(latents), text], 1)
        x = x + self.blocks[0].mix(x)
        return self.head(x[:, :latents.shape[1]])


def test_the_layer_feeding_the_output_is_the_final_projection_even_when_it_reads_an_input():
    torch.manual_seed(0)
    found = decisions(UnprojectedTextModel().eval(), torch.randn(1, 16, 8), torch.randn(1, 6, 32))
    assert found["patches_in"] == ("embed", False) and found["blocks.0.mix"] == ("token", True)
    assert found["head"] == ("final", False)
