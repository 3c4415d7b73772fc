"""bench/families.py on the families whose structure differs (tiny configs, the reference kernels)."""

import pytest
import torch

from tests.bench.bench_scripts import import_bench

(families,) = import_bench("families")


# Breaks its graph inside every block on its own (Dynamo traces each block's frame separately).
GRAPH_BREAK_FAMILY = "MochiTransformer3DModel"

# Layers whose decision once went wrong ({path: quantized}): the time embedding, modulation and
# embeddings are kept, the token GEMMs next to them quantized.
DECISIONS = {
    "Cosmos3OmniTransformer": {
        "proj_in": False, "time_embedder.linear_1": False, "proj_out": False,
        "layers.0.self_attn.to_q": True, "layers.0.self_attn.add_q_proj": True, "layers.0.mlp.up_proj": True},
    "Ideogram4Transformer2DModel": {
        "input_proj": False, "llm_cond_proj": False, "t_embedding.mlp_in": False, "adaln_proj": False,
        "layers.0.adaln_modulation": False, "final_layer.linear": False,
        "layers.0.attention.to_q": True, "layers.0.feed_forward.w2": True},
    "ChromaTransformer2DModel": {
        "x_embedder": False, "context_embedder": False, "distilled_guidance_layer.in_proj": False,
        "distilled_guidance_layer.layers.0.linear_1": False, "proj_out": False,
        "transformer_blocks.0.attn.to_q": True, "single_transformer_blocks.0.proj_mlp": True},
    "HiDreamImageTransformer2DModel": {  # routed MoE experts process tokens: quantized
        "x_embedder.proj": False, "caption_projection.0.linear": False,
        "t_embedder.timestep_embedder.linear_1": False, "double_stream_blocks.0.block.adaLN_modulation.1": False,
        "double_stream_blocks.0.block.ff_i.experts.0.w1": True, "double_stream_blocks.0.block.ff_i.shared_experts.w1": True,
        "double_stream_blocks.0.block.attn1.to_q": True},
    "QwenImageTransformer2DModel": {
        "img_in": False, "txt_in": False, "transformer_blocks.0.img_mod.1": False, "norm_out.linear": False,
        "transformer_blocks.0.attn.to_q": True, "transformer_blocks.0.img_mlp.net.2": True},
    "Krea2Transformer2DModel": {
        "img_in": False, "txt_in.linear_1": False, "txt_in.linear_2": False, "time_embed.linear_1": False,
        "time_mod_proj": False, "final_layer.linear": False,
        "text_fusion.refiner_blocks.0.attn.to_q": True, "transformer_blocks.0.attn.to_q": True},
}


@pytest.mark.parametrize("name", families.CI_FAMILIES)
def test_family_compiles_and_quantizes(name):
    torch.set_num_threads(1)
    row = families.measure(name, calls=1, cells=(("w8a8", "rtn"),))
    assert row["eager"] and row["w16a16_identical"]
    assert 0 < row["w8a8_rtn"] < 0.05
    assert row["quantized"] > 0
    # Kept layers are the ones the policy promises to keep, whatever the family calls them.
    assert all("kept in 16 bit" in reason or "odd" in reason for reason in row["kept"]), row["kept"]
    model, _ = families.build(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for path, quantized in DECISIONS.get(name, {}).items():
        assert path in linears and path not in row["uncaptured"], path
        assert (path not in row["kept_layers"]) == quantized, (path, row["kept_layers"].get(path))
    if name == GRAPH_BREAK_FAMILY:
        assert row["graphs"] > 1
        assert set(row["kept_layers"]) <= linears  # model-absolute paths, not a block's frame's


def test_every_exported_class_is_measured_or_skipped_with_a_reason():
    exported = families.exported_classes()
    assert set(families.SPECS) <= set(exported)
    assert set(families.NOT_A_DIT) | set(families.NOT_BUILT) <= set(exported)
