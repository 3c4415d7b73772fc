"""Tiny diffusers transformers with random weights, for tests, examples and benchmarks.

Each family (DiT, PixArt, SD3, Flux) is built from a small config of the same shape as the
published model, so the graph the backend captures has every kind of layer the real one has
(adaLN, self- and cross-attention, joint attention, single-stream blocks) at a size the CPU
runs in milliseconds.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

FAMILIES = ("dit", "pixart", "sd3", "flux")


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, heads: int = 2,
          head_dim: int = 16, blocks: int = 2) -> nn.Module:
    """A tiny transformer of `family` (one of FAMILIES) with weights drawn from `seed`, in eval mode.

    Width = heads x head_dim (32 by default); wider models show what block rotations and
    channel swapping do, which a single 32-wide Hadamard block cannot. blocks: transformer blocks
    (Flux: half double-stream, half single-stream; at least 2), enough to tell apart what looks
    further than the next block (CBC's prefix, CLPS's window).
    """
    if type(blocks) is not int or blocks < 2 or (family == "flux" and blocks % 2):
        raise ValueError(f"blocks must be an integer of at least 2 (even for flux); got {blocks!r}")
    builders: dict[str, Callable[[int, int, int], nn.Module]] = {
        "dit": _dit,
        "pixart": _pixart,
        "sd3": _sd3,
        "flux": _flux,
    }
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return builders[family](heads, head_dim, blocks).to(dtype).eval()


def _dit(heads: int, head_dim: int, blocks: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        num_layers=blocks, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )


def _pixart(heads: int, head_dim: int, blocks: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=8, num_layers=blocks, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_channels=24, in_channels=4,
        cross_attention_dim=heads * head_dim, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )


def _sd3(heads: int, head_dim: int, blocks: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=blocks, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_projection_dim=heads * head_dim, joint_attention_dim=24,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )


def _flux(heads: int, head_dim: int, blocks: int) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=blocks // 2, num_single_layers=blocks // 2,
        attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=24, pooled_projection_dim=16,
        axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2],
    )


def make_inputs(family: str, batch: int = 1, size: int = 8, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword inputs for one forward call of `build(family)`: latents of `size` x `size`.

    `size` must be even (every family uses 2x2 patches, or packs 2x2 latents for Flux).
    """
    if size % 2:
        raise ValueError(f"size must be even; got {size}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    timestep = torch.randint(0, 1000, (batch,), generator=g)
    if family == "dit":
        return {"hidden_states": randn(batch, 4, size, size), "timestep": timestep,
                "class_labels": torch.randint(0, 10, (batch,), generator=g)}
    if family == "pixart":
        return {"hidden_states": randn(batch, 4, size, size), "timestep": timestep,
                "encoder_hidden_states": randn(batch, 6, 24),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if family == "sd3":
        return {"hidden_states": randn(batch, 4, size, size), "timestep": timestep,
                "encoder_hidden_states": randn(batch, 6, 24), "pooled_projections": randn(batch, 16)}
    if family == "flux":
        side = size // 2
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)
        return {"hidden_states": randn(batch, side * side, 8), "timestep": timestep.to(dtype) / 1000,
                "encoder_hidden_states": randn(batch, 6, 24), "pooled_projections": randn(batch, 16),
                "img_ids": img_ids, "txt_ids": torch.zeros(6, 3, dtype=dtype), "guidance": None}
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
