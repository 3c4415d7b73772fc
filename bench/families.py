"""Every transformer family of the installed diffusers, compiled with backend="clq" on a tiny config.

    python bench/families.py                       # every family with a tiny config; writes bench/results/families.{json,md}
    python bench/families.py --only Sana,Wan --timeout 300 --out /tmp/families

For each transformer class diffusers exports: build it from a tiny config (shaped after diffusers'
own model tests, written here by hand; classes without one are listed as skipped, with why),
run it eagerly, then compiled with backend="clq":

- `w16a16`: bit-identical to eager (the backend must not change an unquantized model);
- `w8a8` and `w4a4` with recipes `rtn` and `clq`: calibrated on 2 inputs, relative error
  ||out - eager|| / ||eager|| on a third, fresh input;
- how many linear layers are quantized and kept, with each kept layer's reason;
- the linear layers that run but are in no compiled graph (Dynamo ran them eagerly, in full
  precision: after a graph break inside a loop, say), counted and named, and how many linears
  the tiny config's forward never calls;
- how many graphs Dynamo handed the backend.

Each family runs in its own process with a time limit, so a crash, a hang or an exception in
one family is recorded in its row and the table is still written. Weights are freshly
initialized (random), so the errors show that the pipeline works on each structure, not the
quality a trained checkpoint would get.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = (("w8a8", "rtn"), ("w8a8", "clq"), ("w4a4", "rtn"), ("w4a4", "clq"))

Inputs = Callable[[Callable[..., torch.Tensor]], dict[str, Any]]


@dataclass(frozen=True)
class Spec:
    """How to build one family: its class, a tiny config and a function making one call's inputs
    from `randn(*shape)` (the latter draws from the call's seed)."""

    cls: str
    config: dict[str, Any]
    inputs: Inputs


def _ids(*axes: int) -> torch.Tensor:
    """[prod(axes), len(axes)] position ids, one row per token of a grid with these axis lengths."""
    return torch.cartesian_prod(*(torch.arange(n) for n in axes)).reshape(-1, len(axes)).float()


def _steps(batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), 500.0)


def _flux_ids(side: int = 4) -> torch.Tensor:
    """Flux-style image position ids [side * side, 3]: (0, row, column)."""
    return torch.cat([torch.zeros(side * side, 1), _ids(side, side)], 1)


# Wan 2.1 and SkyReels-V2 share their structure and this tiny config.
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_inputs(randn) -> dict[str, Any]:
    return dict(hidden_states=randn(1, 4, 2, 8, 8), encoder_hidden_states=randn(1, 6, 16), timestep=_steps())


def _ideogram4_inputs(randn) -> dict[str, Any]:
    """A packed sequence of 4 text tokens then a 2 x 2 grid of image tokens; each stream is zero
    where the other one lies (indicators 3: text, 2: image; image positions offset by 65536)."""
    text, image = 4, 4
    hidden = torch.cat([torch.zeros(1, text, 16), randn(1, image, 16)], 1)
    context = torch.cat([randn(1, text, 24), torch.zeros(1, image, 24)], 1)
    positions = torch.cat([torch.arange(text)[:, None].expand(text, 3),
                           65536 + torch.cat([torch.zeros(image, 1), _ids(2, 2)], 1).long()])
    return dict(hidden_states=hidden, encoder_hidden_states=context, timestep=torch.full((1,), 0.5),
                position_ids=positions[None], segment_ids=torch.ones(1, text + image, dtype=torch.long),
                indicator=torch.tensor([[3] * text + [2] * image]))


def _krea2_inputs(randn) -> dict[str, Any]:
    """A 2 x 2 grid of image tokens, 4 text tokens read from 3 text-encoder layers (the last one
    padding)."""
    positions = torch.cat([torch.zeros(4, 3), torch.cat([torch.zeros(4, 1), _ids(2, 2)], 1)])
    return dict(hidden_states=randn(1, 4, 16), encoder_hidden_states=randn(1, 4, 3, 16),
                timestep=torch.full((1,), 0.5), position_ids=positions,
                encoder_attention_mask=torch.tensor([[True, True, True, False]]))


def _cosmos3_inputs(randn) -> dict[str, Any]:
    """2 text tokens then a 2 x 2 latent frame of vision tokens, in one packed sequence."""
    vision = torch.arange(2, 6)
    return dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
                position_ids=torch.zeros(3, 6, dtype=torch.long), und_len=2, sequence_length=6,
                vision_tokens=[randn(1, 2, 1, 2, 2)], vision_token_shapes=[(1, 2, 2)],
                vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                vision_timesteps=torch.full((4,), 0.5), vision_noisy_frame_indexes=[torch.tensor([0])])


def _bria_fibo_inputs(context: torch.Tensor, latents: torch.Tensor) -> dict[str, Any]:
    """A 4 x 4 latent grid and 8 text tokens; the two text-encoder layers are slices of the context."""
    return dict(hidden_states=latents, encoder_hidden_states=context, img_ids=_flux_ids()[:, :3],
                txt_ids=torch.zeros(8, 3), timestep=torch.ones(1),
                text_encoder_layers=[context[:, :, :32], context[:, :, :32]])


def _minimax_h3_layout(text: int, audio: int, video: int) -> dict[str, torch.Tensor]:
    """One packed sequence of text, audio and video rows: their indexes, modality tags (0 video,
    1 text, 2 audio), which of two timesteps each row reads (audio its own) and (t, h, w) positions."""
    length = text + audio + video
    text_at, audio_at, video_at = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_at], tags[audio_at] = 1, 2
    step = torch.zeros(length, dtype=torch.long)
    step[audio_at] = 1
    positions = torch.zeros(length, 3)
    positions[:, 0] = torch.arange(length)
    positions[video_at, 1], positions[video_at, 2] = torch.arange(video) % 4.0, torch.arange(video) % 2.0
    return dict(timestep=torch.tensor([0.7, 0.3]), timestep_indices=step, token_tags=tags, position_ids=positions,
                video_indices=video_at, audio_indices=audio_at, text_indices=text_at)


def _real_rope(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [length, dim] of 1-D rotary positions 0..length-1, halves not interleaved."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return get_1d_rotary_pos_embed(dim, length, use_real=True, repeat_interleave_real=False)


def _wan_animate2_cache(layers: int):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    return WanAnimate2KVCache(layers)


_SANA_WM_REFINER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
                        rope_double_precision=False)


def _sana_wm_refiner_rope() -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of a 2-frame 4 x 4 latent window, built as the refiner's pipeline builds them (by a
    method of the model, here of a throwaway instance of the same config)."""
    import diffusers

    model = diffusers.SanaWMLTX2RefinerTransformer3DModel(**_SANA_WM_REFINER)
    return model.build_rotary_emb_for_absolute_positions(batch_size=1, frame_positions=[0, 1], height=4, width=4,
                                                         device=torch.device("cpu"), fps=24.0)


def _tiny(family: str) -> Spec:
    """The four families of clq_compile/tiny_models.py, built as there."""
    classes = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
               "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
    return Spec(classes[family], {"family": family}, lambda randn: {"family": family})


# Keyed by class name.
SPECS: dict[str, Spec] = {s.cls: s for s in (
    _tiny("dit"),
    _tiny("pixart"),
    _tiny("sd3"),
    _tiny("flux"),
    Spec(
        "SanaTransformer2DModel",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
             cross_attention_dim=32, caption_channels=16, sample_size=8),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 16),
                           timestep=_steps())),
    Spec(
        "WanTransformer3DModel",
        _WAN,
        _wan_inputs),
    Spec(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None),
        lambda randn: dict(hidden_states=randn(1, 4, 1, 4, 4), timestep=_steps(),
                           encoder_hidden_states=randn(1, 6, 16), pooled_projections=randn(1, 8),
                           encoder_attention_mask=torch.ones(1, 6), guidance=_steps())),
    Spec(
        "HiDreamImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
             attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8,
             num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
             max_resolution=(16, 16), llama_layers=(0, 1), force_inference_output=True),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states_t5=randn(1, 6, 8),
                           encoder_hidden_states_llama3=randn(2, 1, 6, 4), pooled_embeds=randn(1, 8),
                           timesteps=_steps())),
    Spec(
        "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        lambda randn: dict(hidden_states=randn(1, 16, 16), encoder_hidden_states=randn(1, 6, 16),
                           encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.long), timestep=_steps() / 1000,
                           img_shapes=[(1, 4, 4)])),
    Spec(
        "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8],
             approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_flux_ids(), txt_ids=torch.zeros(8, 3),
                           timestep=_steps() / 1000)),
    Spec(
        "Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
             axes_dims_rope=[4, 4, 4, 4]),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_ids(1, 4, 4, 1)[None], txt_ids=_ids(1, 1, 1, 8)[None],
                           timestep=_steps() / 1000, guidance=_steps() / 1000)),
    Spec(
        "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=8),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), encoder_hidden_states=randn(1, 8, 16),
                           timestep=_steps(), encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool))),
    Spec(
        "NucleusMoEImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False,
             capacity_factors=[8.0, 8.0]),
        lambda randn: dict(hidden_states=randn(1, 16, 16), encoder_hidden_states=randn(1, 6, 16),
                           encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.long), timestep=_steps() / 1000,
                           img_shapes=[(1, 4, 4)])),
    Spec(
        "PRXTransformer2DModel",
        dict(in_channels=16, patch_size=2, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=2,
             depth=2, axes_dim=[16, 16], theta=10_000),
        lambda randn: dict(hidden_states=randn(1, 16, 8, 8), encoder_hidden_states=randn(1, 6, 64),
                           timestep=_steps() / 1000)),
    Spec(
        "MotifVideoTransformer3DModel",
        dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_single_layers=1, num_decoder_layers=0, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
             qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4,
             rope_theta=256.0, rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=False,
             enable_text_cross_attention_single=False),
        lambda randn: dict(hidden_states=randn(1, 33, 1, 4, 4), timestep=_steps(),
                           encoder_hidden_states=randn(1, 6, 32))),
    Spec(
        "HunyuanVideo15Transformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
        lambda randn: dict(hidden_states=randn(1, 4, 1, 4, 4), timestep=_steps(),
                           encoder_hidden_states=randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                           encoder_hidden_states_2=randn(1, 4, 8), encoder_attention_mask_2=torch.ones(1, 4),
                           image_embeds=torch.zeros(1, 3, 12))),
    Spec(
        "LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
             num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
        lambda randn: dict(hidden_states=randn(1, 2 * 4 * 4, 4), encoder_hidden_states=randn(1, 6, 16),
                           timestep=_steps(), encoder_attention_mask=torch.ones(1, 6).bool(),
                           num_frames=2, height=4, width=4)),
    Spec(
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=6),
        lambda randn: dict(hidden_states=randn(1, 1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 8),
                           timestep=_steps())),
    Spec(
        "AuraFlowTransformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
             out_channels=4, pos_embed_max_size=64),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 8, 32),
                           timestep=_steps())),
    Spec(
        "Lumina2Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
             num_attention_heads=2, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
             scaling_factor=1.0, axes_dim_rope=(8, 4, 4), axes_lens=(64, 64, 64), cap_feat_dim=16),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 16),
                           timestep=_steps() / 1000, encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool))),
    Spec(
        "SkyReelsV2Transformer3DModel",
        _WAN,
        _wan_inputs),
    Spec(
        "LatteTransformer3DModel",
        dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        lambda randn: dict(hidden_states=randn(1, 4, 1, 8, 8), encoder_hidden_states=randn(1, 6, 8),
                           timestep=_steps(), enable_temporal_attentions=True)),
    Spec(
        "CogView4Transformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 8),
                           timestep=_steps(), original_size=torch.tensor([[64, 64]]),
                           target_size=torch.tensor([[64, 64]]), crop_coords=torch.tensor([[0, 0]]))),
    Spec(
        "BriaTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 8, 8]),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_flux_ids(), txt_ids=torch.zeros(8, 3),
                           timestep=_steps() / 1000)),
    Spec(
        "OvisImageTransformer2DModel",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_flux_ids(), txt_ids=torch.zeros(8, 3),
                           timestep=_steps() / 1000)),
    Spec(
        "LongCatImageTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_flux_ids(), txt_ids=torch.zeros(8, 3),
                           timestep=_steps() / 1000, guidance=torch.full((1,), 3.5))),
    Spec(
        "WanVACETransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0], vace_in_channels=12),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), encoder_hidden_states=randn(1, 6, 16),
                           control_hidden_states=randn(1, 12, 2, 8, 8), timestep=_steps())),
    Spec(
        "SanaVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
             mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
             norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        _wan_inputs),
    Spec(
        "ChronoEditTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
             rope_max_seq_len=64, pos_embed_seq_len=None, rope_temporal_skip_len=8),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), timestep=_steps(),
                           encoder_hidden_states=randn(1, 6, 32), encoder_hidden_states_image=None)),
    Spec(
        "AllegroTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=1,
             cross_attention_dim=32, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), encoder_hidden_states=randn(1, 6, 8),
                           timestep=_steps())),
    Spec(
        "EasyAnimateTransformer3DModel",
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), timestep=_steps(), timestep_cond=None,
                           encoder_hidden_states=randn(1, 6, 16), encoder_hidden_states_t5=None,
                           inpaint_latents=None, control_latents=None)),
    # Without the padding-mask channel: concatenating it resizes the mask with torchvision, which
    # is not a dependency here.
    Spec(
        "CosmosTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
        lambda randn: dict(hidden_states=randn(1, 4, 1, 8, 8), timestep=_steps(),
                           encoder_hidden_states=randn(1, 6, 16), attention_mask=torch.ones(1, 6), fps=30)),
    Spec(
        "CogView3PlusTransformer2DModel",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
             sample_size=8),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 8),
                           original_size=torch.tensor([[64, 64]]), target_size=torch.tensor([[64, 64]]),
                           crop_coords=torch.tensor([[0, 0]]), timestep=_steps())),
    Spec(
        "Ideogram4Transformer2DModel",
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
             adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5),
        _ideogram4_inputs),
    Spec(
        "Krea2Transformer2DModel",
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
             text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2),
             rope_theta=1000.0, norm_eps=1e-5),
        _krea2_inputs),
    Spec(
        "Cosmos3OmniTransformer",
        dict(head_dim=8, hidden_act="relu2", hidden_size=16, intermediate_size=32, latent_channel=2,
             latent_patch_size=1, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
             patch_latent_dim=2, qk_norm_for_text=False, rms_norm_eps=1e-5, rope_axes_dim=[2, 1, 1],
             rope_theta=1e8, vocab_size=32),
        _cosmos3_inputs),
    Spec(
        "HunyuanDiT2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
             text_len_t5=4, activation_fn="gelu-approximate"),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 4, 8),
                           text_embedding_mask=torch.ones(1, 4), encoder_hidden_states_t5=randn(1, 4, 8),
                           text_embedding_mask_t5=torch.ones(1, 4), timestep=_steps(),
                           image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]]),
                           style=torch.zeros(1, dtype=torch.long),
                           image_rotary_emb=(torch.ones(1, 8), torch.zeros(1, 8)))),
    Spec(
        "ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=1,
             n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
             axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        lambda randn: dict(x=[randn(16, 1, 8, 8)], cap_feats=[randn(8, 16)], t=torch.zeros(1))),
    Spec(
        "LTX2VideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
             audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
             caption_channels=16, rope_double_precision=False),
        lambda randn: dict(hidden_states=randn(1, 2 * 4 * 4, 4), audio_hidden_states=randn(1, 9, 4),
                           encoder_hidden_states=randn(1, 6, 16), audio_encoder_hidden_states=randn(1, 6, 16),
                           timestep=_steps(), encoder_attention_mask=torch.ones(1, 6).bool(), num_frames=2,
                           height=4, width=4, audio_num_frames=9, fps=25.0)),
    Spec(
        "OmniGenTransformer2DModel",
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
             pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]}),
        # 24 text ids with one 8 x 8 input image's 16 patch tokens at positions 0-15, then the time
        # token and the 16 output patch tokens: 41 positions.
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), timestep=torch.full((1,), 0.5),
                           input_ids=torch.arange(24)[None] % 10, input_img_latents=[randn(1, 4, 8, 8)],
                           input_image_sizes={0: [[0, 16]]}, attention_mask=torch.ones(1, 41, 41),
                           position_ids=torch.arange(41)[None])),
    Spec(
        "LuminaNextDiT2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
             num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False,
             qk_norm=True, cross_attention_dim=32, scaling_factor=1.0),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 32),
                           timestep=torch.full((1,), 0.5), encoder_mask=torch.ones(1, 6),
                           image_rotary_emb=randn(16, 16, 4), cross_attention_kwargs={})),
    # The continuous-input spatial transformer of Stable Diffusion's UNets (linear in/out projections).
    Spec(
        "Transformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8, cross_attention_dim=16,
             use_linear_projection=True, num_layers=1),
        lambda randn: dict(hidden_states=randn(1, 32, 4, 4), encoder_hidden_states=randn(1, 6, 16))),
    Spec(
        "DreamLiteTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8, cross_attention_dim=16,
             use_linear_projection=True, num_layers=1),
        lambda randn: dict(hidden_states=randn(1, 32, 4, 4), encoder_hidden_states=randn(1, 6, 16))),
    Spec(
        "Flux3Transformer2DModel",
        dict(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_channels=256, axes_dims_rope=(4, 4, 4, 4)),
        lambda randn: dict(hidden_states=randn(1, 16, 4), encoder_hidden_states=randn(1, 8, 32),
                           img_ids=_ids(1, 4, 4, 1), txt_ids=_ids(1, 1, 1, 8), timestep=_steps() / 1000)),
    Spec(
        "QwenImage21Transformer2DModel",
        dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=16, mlp_ratio=2, axes_dims_rope=(8, 4, 4)),
        # 6 text tokens, then 4 image slots of the vision-language sequence, each standing for 2 x 2 of
        # the 4 x 4 target image's tokens.
        lambda randn: dict(hidden_states=randn(1, 16, 16), encoder_hidden_states=randn(1, 6, 16),
                           timestep=torch.full((1,), 0.5), img_shapes=[[(1, 4, 4)]],
                           img_mask=torch.tensor([[False] * 6 + [True] * 4]),
                           encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.bool))),
    Spec(
        "Kandinsky5Transformer3DModel",
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
        # Channels-last latents [batch, frames, height, width, channels].
        lambda randn: dict(hidden_states=randn(1, 1, 8, 8, 4), encoder_hidden_states=randn(1, 6, 16),
                           timestep=_steps(), pooled_projections=randn(1, 8),
                           visual_rope_pos=[torch.arange(1), torch.arange(4), torch.arange(4)],
                           text_rope_pos=torch.arange(6))),
    Spec(
        "HunyuanVideoFramepackTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
             has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
        lambda randn: dict(hidden_states=randn(1, 4, 3, 4, 4), timestep=_steps(), encoder_hidden_states=randn(1, 6, 16),
                           pooled_projections=randn(1, 8), encoder_attention_mask=torch.ones(1, 6),
                           guidance=_steps(), image_embeds=randn(1, 6, 16), indices_latents=torch.ones(3),
                           latents_clean=randn(1, 4, 2, 4, 4), indices_latents_clean=torch.ones(2),
                           latents_history_2x=randn(1, 4, 2, 4, 4), indices_latents_history_2x=torch.ones(2),
                           latents_history_4x=randn(1, 4, 8, 4, 4), indices_latents_history_4x=torch.ones(8))),
    Spec(
        "ConsisIDTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
             is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
             LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
             LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
        lambda randn: dict(hidden_states=randn(1, 1, 4, 8, 8), encoder_hidden_states=randn(1, 8, 8),
                           timestep=_steps(), id_vit_hidden=[torch.ones(1, 2, 2)], id_cond=torch.ones(1, 2))),
    Spec(
        "ErnieImageTransformer2DModel",
        dict(hidden_size=16, num_attention_heads=1, num_layers=1, ffn_hidden_size=16, in_channels=16,
             out_channels=16, patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6,
             qk_layernorm=True),
        lambda randn: dict(hidden_states=randn(1, 16, 4, 4), timestep=torch.ones(1), text_bth=randn(1, 6, 16),
                           text_lens=torch.tensor([6]))),
    Spec(
        "GlmImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=randn(1, 6, 32),
                           prior_token_id=torch.tensor([3]), prior_token_drop=torch.zeros(1, dtype=torch.bool),
                           timestep=_steps(), target_size=torch.tensor([[8.0, 8.0]]),
                           crop_coords=torch.tensor([[0.0, 0.0]]))),
    Spec(
        "HeliosTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
             guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False),
        lambda randn: dict(hidden_states=randn(1, 4, 2, 8, 8), timestep=_steps(), encoder_hidden_states=randn(1, 6, 16),
                           indices_hidden_states=torch.ones(1, 2), indices_latents_history_short=torch.ones(1, 1),
                           indices_latents_history_mid=torch.ones(1, 1), indices_latents_history_long=torch.ones(1, 4),
                           latents_history_short=randn(1, 4, 1, 8, 8), latents_history_mid=randn(1, 4, 1, 8, 8),
                           latents_history_long=randn(1, 4, 4, 8, 8))),
    Spec(
        "JoyImageEditTransformer3DModel",
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
             rope_dim_list=[4, 6, 6], theta=256),
        lambda randn: dict(hidden_states=randn(1, 16, 1, 4, 4), encoder_hidden_states=randn(1, 6, 16),
                           timestep=torch.ones(1))),
    Spec(
        "JoyImageEditPlusTransformer3DModel",
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
             rope_dim_list=[4, 6, 6], theta=256),
        # Two 2 x 2 latent patches of one frame each (an edited image and its reference).
        lambda randn: dict(hidden_states=randn(1, 2, 16, 1, 2, 2), encoder_hidden_states=randn(1, 6, 16),
                           timestep=torch.ones(1), shape_list=[[(1, 1, 1), (1, 1, 1)]])),
    Spec(
        "BriaFiboTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
             axes_dims_rope=[0, 4, 4]),
        lambda randn: _bria_fibo_inputs(randn(1, 8, 64), randn(1, 16, 16))),
    Spec(
        "AnyFlowTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
             gate_value=0.25, deltatime_type="r"),
        lambda randn: dict(hidden_states=randn(1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                           r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=randn(1, 6, 16))),
    Spec(
        "AnyFlowFARTransformer3DModel",
        dict(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
             attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
             num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r"),
        lambda randn: dict(hidden_states=randn(1, 4, 4, 8, 8), timestep=torch.full((1, 4), 500.0),
                           r_timestep=torch.full((1, 4), 250.0), encoder_hidden_states=randn(1, 6, 16),
                           chunk_partition=[2, 2])),
    Spec(
        "AceStepTransformer1DModel",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
             rms_norm_eps=1e-6, sliding_window=16),
        lambda randn: dict(hidden_states=randn(1, 8, 8), timestep=torch.full((1,), 0.5),
                           timestep_r=torch.full((1,), 0.25), encoder_hidden_states=randn(1, 6, 32),
                           context_latents=randn(1, 8, 16))),
    Spec(
        "LongCatAudioDiTTransformer",
        dict(dit_dim=64, dit_depth=2, dit_heads=4, dit_text_dim=32, latent_dim=8, text_conv=False),
        lambda randn: dict(hidden_states=randn(1, 16, 8), encoder_hidden_states=randn(1, 6, 32),
                           encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
                           attention_mask=torch.ones(1, 16, dtype=torch.bool), timestep=torch.ones(1))),
    Spec(
        "MiniMaxMusic3Transformer1DModel",
        dict(in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8,
             ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8),
        lambda randn: dict(hidden_states=randn(1, 8, 16), encoder_hidden_states=randn(1, 16, 16),
                           timestep=torch.full((1,), 0.5))),
    Spec(
        "StableAudio3DiTModel",
        dict(io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=12,
             local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
             use_differential_attention=False),
        lambda randn: dict(hidden_states=randn(1, 8, 16), timestep=torch.full((1,), 0.5),
                           encoder_hidden_states=randn(1, 4, 16), global_hidden_states=randn(1, 12))),
    Spec(
        "MiniMaxH3Transformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=2,
             ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
             time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2),
        lambda randn: dict(hidden_states=randn(1, 8, 16), audio_hidden_states=randn(1, 6, 6),
                           encoder_hidden_states=randn(1, 4, 8), **_minimax_h3_layout(text=4, audio=6, video=8))),
    Spec(
        "HunyuanImageTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8)),
        lambda randn: dict(hidden_states=randn(1, 4, 4, 4), timestep=_steps(), encoder_hidden_states=randn(1, 6, 16),
                           encoder_attention_mask=torch.ones(1, 6))),
    Spec(
        "StableAudioDiTModel",
        dict(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
             global_states_input_dim=12, cross_attention_input_dim=10),
        # Rotary embeddings over the 8 audio frames and the one global token, as the pipeline makes them.
        lambda randn: dict(hidden_states=randn(1, 4, 8), timestep=_steps(), encoder_hidden_states=randn(1, 6, 10),
                           global_hidden_states=randn(1, 1, 12), rotary_embedding=_real_rope(4, 9))),
    Spec(
        "WanAnimateTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
             out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
             motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
             motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
             inject_face_latents_blocks=2),
        # 20 pose frames (21 latent frames with the reference) and 77 face frames, as the model's
        # segment lengths require.
        lambda randn: dict(hidden_states=randn(1, 12, 21, 8, 8), timestep=_steps().long(),
                           encoder_hidden_states=randn(1, 6, 16), encoder_hidden_states_image=randn(1, 4, 16),
                           pose_hidden_states=randn(1, 4, 20, 8, 8), face_pixel_values=randn(1, 3, 77, 16, 16))),
    Spec(
        "WanAnimate2Transformer3DModel",
        dict(patch_size=(1, 2, 2), text_len=16, in_dim=36, dim=128, ffn_dim=256, freq_dim=64, text_dim=32,
             out_dim=16, num_heads=4, num_layers=2, cross_attn_norm=True, use_img_emb=True),
        # The reference pass, which fills a fresh key/value cache: 2 latent frames of 2 x 2 patches.
        lambda randn: dict(hidden_states=[randn(16, 2, 4, 4)], timestep=torch.ones(1),
                           encoder_hidden_states=[randn(8, 32)], condition_latents=[randn(20, 2, 4, 4)],
                           encoder_hidden_states_image=randn(1, 4, 1280), kv_cache=_wan_animate2_cache(2),
                           kv_cache_mode="extract", seq_len=8, offset_grid_sizes=torch.tensor([[2, 2, 2]]))),
    Spec(
        "Kandinsky6Transformer3DModel",
        dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
             model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
             in_audio_dim=4, out_audio_dim=4),
        # Channels-last video latents and an audio track of 6 frames.
        lambda randn: dict(hidden_states=randn(1, 1, 8, 8, 4), encoder_hidden_states=randn(1, 6, 16),
                           pooled_projections=randn(1, 8), timestep=_steps(), audio_hidden_states=randn(1, 6, 4))),
    Spec(
        "Kandinsky6SRTransformer3DModel",
        dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=64,
             num_visual_blocks=2, axes_dims=(4, 6, 6)),
        # One 8 x 8 tile (the sparse attention's block side): noisy latent, anchor latent, anchor mask.
        lambda randn: dict(hidden_states=randn(1, 1, 8, 8, 9), timestep=_steps())),
    Spec(
        "BriaFibo2Transformer2DModel",
        dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
             injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
             gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)),
        # Text features: the perceiver's bundle and one for the injection block, 6 tokens each.
        lambda randn: dict(hidden_states=randn(1, 4, 8, 8), timestep=torch.full((1,), 0.5),
                           encoder_hidden_states=randn(1, 2, 6, 16))),
    Spec(
        "SanaWMLTX2RefinerTransformer3DModel",
        _SANA_WM_REFINER,
        lambda randn: dict(hidden_states=randn(1, 2 * 4 * 4, 4), encoder_hidden_states=randn(1, 6, 16),
                           timestep=torch.full((1, 32), 0.5), video_rotary_emb=_sana_wm_refiner_rope(),
                           encoder_attention_mask=torch.ones(1, 6))),
)}

# The families a CI test runs (tests/bench/test_families.py): one of each structure.
CI_FAMILIES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
               "FluxTransformer2DModel", "SanaTransformer2DModel", "WanTransformer3DModel",
               "HunyuanVideoTransformer3DModel", "HiDreamImageTransformer2DModel",
               "QwenImageTransformer2DModel", "MochiTransformer3DModel",
               # A packed sequence written in place (Cosmos3-Omni), an indicator-masked packed
               # sequence (Ideogram4), text-fusion blocks before an embedding MLP (Krea2).
               "Cosmos3OmniTransformer", "Ideogram4Transformer2DModel", "Krea2Transformer2DModel",
               # A distilled guidance MLP of its own (Chroma).
               "ChromaTransformer2DModel")

# Classes exported next to the transformers that are not diffusion transformers of images/video.
NOT_A_DIT = {
    "PriorTransformer": "a CLIP-embedding prior (unCLIP), not a latent diffusion transformer",
    "T5FilmDecoder": "a spectrogram decoder (music), not a latent diffusion transformer",
    "TransformerTemporalModel": "a temporal layer inserted into UNets, not a model of its own",
    "RFD4ProteinaTransformer": "a protein-structure model, no latent image/video input",
    "MiniMaxMusic3RVQDepthDecoder": "an audio-token depth decoder, not a diffusion transformer",
}

# Diffusion transformers not built here, and why.
NOT_BUILT = {
    "SanaWMTransformer3DModel": "its call needs per-frame camera ray maps and chunked Plücker embeddings, which its "
                                "pipeline derives from camera poses; no tiny version of them written here",
}


def exported_classes() -> list[str]:
    """Every ModelMixin subclass that diffusers.models.transformers exports, by name."""
    import diffusers.models.transformers as transformers
    from diffusers.models.modeling_utils import ModelMixin

    return sorted(n for n in dir(transformers)
                  if isinstance(getattr(transformers, n), type) and issubclass(getattr(transformers, n), ModelMixin))


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, Callable[[int], dict[str, Any]]]:
    """(model in eval mode, inputs(seed)) for family `name` (a key of SPECS)."""
    from clq_compile import tiny_models

    spec = SPECS[name]
    torch.manual_seed(seed)
    if "family" in spec.config:
        family = spec.config["family"]
        return tiny_models.build(family, seed=seed), lambda s: tiny_models.make_inputs(family, seed=s)
    import diffusers

    model = getattr(diffusers, spec.cls)(**spec.config).eval()
    # Zero-initialized layers (final projections, gates of some families) would make the output
    # identically 0 and every relative error 0/0: give them small random values.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() and not p.any():
                p.normal_(0.0, 0.02)

    def inputs(s: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(s)
        return spec.inputs(lambda *shape: torch.randn(*shape, generator=g))

    return model, inputs


def sample(output) -> torch.Tensor:
    """The output tensor of a diffusers transformer call (`.sample`, a tuple's first entry, or a
    list of per-image tensors, flattened and joined)."""
    value = getattr(output, "sample", output)
    if isinstance(value, (tuple, list)) and not isinstance(value[0], torch.Tensor):
        value = value[0]
    if isinstance(value, (tuple, list)):
        value = torch.cat([v.flatten() for v in value])
    return value


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def measure(name: str, calls: int = 2, cells: tuple[tuple[str, str], ...] = CELLS) -> dict[str, Any]:
    """One row of the table for family `name` (see the module docstring); `cells`: the
    (bits, recipe) pairs measured after `w16a16` (the decisions are read from the last)."""
    import clq_compile
    from clq_compile.calibration import model_state

    row: dict[str, Any] = {"family": name}
    model, inputs = build(name)
    fresh = inputs(1)
    called: set[str] = set()  # the linears the eager forward runs (a tiny config may leave some unused)
    hooks = [m.register_forward_hook(lambda *_, path=path: called.add(path))
             for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        ref = sample(model(**fresh))
    for hook in hooks:
        hook.remove()
    row["eager"] = bool(torch.isfinite(ref).all())
    for bits, recipe in (("w16a16", "rtn"), *cells):
        torch._dynamo.reset()
        qt = torch.compile(model, backend="clq", options={"bits": bits, "recipe": recipe, "kernels": "reference"})
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            with clq_compile.calibrating(qt):
                for seed in range(calls):
                    qt(**inputs(100 + seed))
            out = sample(qt(**fresh))
        state = model_state(qt)
        if bits == "w16a16":
            row["w16a16_identical"] = bool(torch.equal(out, ref))
            continue
        row[f"{bits}_{recipe}"] = _rel(out, ref)
        if (bits, recipe) == cells[-1]:
            decisions = state.site_decisions()
            row["graphs"] = len(state.graphs)
            row["quantized"] = sum(d["quantize"] for d in decisions.values())
            row["kept"] = dict(Counter(d["reason"] for d in decisions.values() if not d["quantize"]))
            row["kept_layers"] = {p: d["reason"] for p, d in decisions.items() if not d["quantize"]}
            # Linears that run but that no compiled graph holds: Dynamo ran them eagerly, in full precision.
            outside = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p not in decisions]
            row["uncaptured"] = sorted(p for p in outside if p in called)
            row["unused"] = sum(p not in called for p in outside)
    return row


def _run_isolated(name: str, timeout: float) -> dict[str, Any]:
    """measure(name) in a fresh process: a crash, hang or exception there becomes this row's error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--one", name, "--row", str(path)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"family": name, "error": f"timed out after {timeout:.0f} s"}
        if path.exists():
            return json.loads(path.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"family": name, "error": f"process exited {done.returncode}: {tail[0][:300]}"}


def _one(name: str, path: Path) -> None:
    torch.set_num_threads(1)
    try:
        row = measure(name)
    except Exception as error:  # noqa: BLE001  (every failure is a result row)
        row = {"family": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    path.write_text(json.dumps(row))


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _uncaptured(paths: list[str] | None, shown: int = 3) -> str:
    if paths is None:
        return "not recorded"
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"{len(paths)}" + (f": {', '.join(paths[:shown])}{more}" if paths else "")


def markdown(rows: list[dict], skipped: dict[str, str], seconds: float, updates: list[dict] = ()) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [
        "# Every transformer family, tiny configs (`python bench/families.py`)",
        "",
        f"{len(rows) + len(skipped)} classes exported by diffusers {_diffusers_version()}: {len(rows)} built, "
        f"{len(ok)} ran end to end, {len(rows) - len(ok)} failed, {len(skipped)} skipped. "
        f"Random weights; relative error of the output on a fresh input after calibrating on 2. "
        f"{seconds:.0f} s on {os.cpu_count()} CPUs, torch {torch.__version__}.",
        *(f"Rerun with `--update` on {u['date']} ({u['seconds']:.0f} s): {', '.join(u['families'])}."
          for u in updates),
        "",
        "| family | eager | w16a16 identical | w8a8 rtn | w8a8 clq | w4a4 rtn | w4a4 clq | quantized | kept | "
        "run outside the graphs (eagerly, full precision) | unused | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | error: {r['error']} |  |  |  |  |  |  |  |  |  |  |")
            continue
        kept = "; ".join(f"{n} {reason}" for reason, n in r["kept"].items())
        lines.append("| " + " | ".join([r["family"], _fmt(r["eager"]), _fmt(r["w16a16_identical"]),
                                        *(_fmt(r[f"{b}_{m}"]) for b, m in CELLS), str(r["quantized"]),
                                        kept, _uncaptured(r.get("uncaptured")), _fmt(r.get("unused", "not recorded")),
                                        str(r["graphs"])]) + " |")
    lines += ["", "## Skipped", "", "| class | why |", "|---|---|"]
    lines += [f"| {name} | {why} |" for name, why in sorted(skipped.items())]
    return "\n".join(lines) + "\n"


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated class names (default: every class with a tiny config)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per family")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for families.json and families.md")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the --only families and replace their rows in OUT/families.json "
                             "(the rest are kept; the file records which rows were rerun, and when)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _one(args.one, args.row)
        return
    from tqdm import tqdm

    exported = exported_classes()
    names = args.only.split(",") if args.only else [n for n in exported if n in SPECS]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"no tiny config for {', '.join(unknown)}; known: {', '.join(sorted(SPECS))}")
    skipped = {n: NOT_A_DIT.get(n) or NOT_BUILT.get(n, "no tiny config written here yet")
               for n in exported if n not in SPECS}
    previous = None
    if args.update:
        if not args.only:
            parser.error("--update needs --only (the families to rerun)")
        try:
            previous = json.loads((args.out / "families.json").read_text())
        except (OSError, ValueError) as err:
            parser.error(f"--update: cannot read {args.out / 'families.json'}: {err}")
    start = time.perf_counter()
    rows = []
    for name in (bar := tqdm(names, desc="families")):
        bar.set_postfix_str(name)
        rows.append(_run_isolated(name, args.timeout))
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - start
    result = {"diffusers": _diffusers_version(), "torch": torch.__version__, "seconds": seconds,
              "rows": rows, "skipped": skipped}
    if previous is not None:
        rerun = {r["family"]: r for r in rows}
        update = {"families": names, "seconds": seconds, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        result = {**previous, "rows": [rerun.pop(r["family"], r) for r in previous["rows"]] + list(rerun.values()),
                  "updates": previous.get("updates", []) + [update]}
    (args.out / "families.json").write_text(json.dumps(result, indent=1) + "\n")
    whole = not args.only or previous is not None
    (args.out / "families.md").write_text(markdown(result["rows"], result["skipped"] if whole else {},
                                                   result["seconds"], result.get("updates", [])))
    print(markdown(rows, {}, seconds))


if __name__ == "__main__":
    main()
