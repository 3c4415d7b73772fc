"""Make a small random model behave like a large trained DiT under quantization.

Two transforms, applied in place to a model you own (tests and benchmarks, never the user's
model behind the backend):

- `trained_like_weights`: freshly initialized `nn.Linear` weights are uniform, which 4-bit
  quantization handles unusually well and which any rotation turns Gaussian, so on random-init
  models rotations look harmful. Trained weights are bell-shaped with heavy tails: every linear
  weight is redrawn from a Student-t distribution (df about 6) scaled to std 1/sqrt(in_features).
- `inject_outliers`: large DiTs carry a few massive-activation channels. Multiplying some output
  channels of each attention's value projection by s and dividing the matching input columns of
  its output projection by s creates them without changing the full-precision function
  (attention mixes tokens, not channels).
"""

from __future__ import annotations

import torch
from torch import nn


def trained_like_weights(model: nn.Module, seed: int = 0, df: int = 6) -> nn.Module:
    """Redraw every nn.Linear weight from a Student-t(df) distribution, std 1/sqrt(in_features).

    Biases are kept. t = z / sqrt(chi²_df / df), with z and the df squared normals of chi²
    all drawn from one generator, so the result is deterministic per seed.
    """
    if type(df) is not int or df <= 2:
        raise ValueError(f"df must be an integer above 2 (the variance is finite only then); got {df!r}")
    g = torch.Generator().manual_seed(seed)
    std = (df / (df - 2)) ** 0.5
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                out_features, in_features = module.weight.shape
                z = torch.randn(out_features, in_features, generator=g)
                chi2 = torch.randn(out_features, in_features, df, generator=g).square().sum(-1)
                t = z / (chi2 / df).sqrt()
                module.weight.copy_(t / std / in_features**0.5)
    return model


def _value_output_pairs(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(value projection, output projection) pairs whose channels correspond one to one."""
    pairs = []
    for module in model.modules():
        to_v, to_out = getattr(module, "to_v", None), getattr(module, "to_out", None)
        if isinstance(to_v, nn.Linear) and to_out is not None:
            out = to_out[0] if isinstance(to_out, nn.ModuleList) else to_out
            if isinstance(out, nn.Linear) and out.in_features == to_v.out_features:
                pairs.append((to_v, out))
        add_v, add_out = getattr(module, "add_v_proj", None), getattr(module, "to_add_out", None)
        if isinstance(add_v, nn.Linear) and isinstance(add_out, nn.Linear):
            pairs.append((add_v, add_out))
    return pairs


def inject_outliers(model: nn.Module, scale: float = 50.0, channels: int = 2, seed: int = 0) -> int:
    """Scale `channels` random value-projection output channels of every attention by `scale`.

    Returns the number of attention modules changed. The full-precision output is unchanged
    up to float rounding.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = _value_output_pairs(model)
    with torch.no_grad():
        for to_v, to_out in pairs:
            idx = torch.randperm(to_v.out_features, generator=g)[:channels]
            to_v.weight[idx] *= scale
            if to_v.bias is not None:
                to_v.bias[idx] *= scale
            to_out.weight[:, idx] /= scale
    return len(pairs)


def sample(model, inputs: dict, steps: int = 10) -> torch.Tensor:
    """A short deterministic sampling loop: x <- x - (1/steps) * model(x, t) over decreasing t.

    `inputs` come from `tiny_models.make_inputs`; its latents are the starting noise, so two
    models given the same inputs start from the same noise. Models that predict twice the input
    channels (learned variance) use the first half. Returns the final latents.
    """
    x = inputs["hidden_states"]
    timestep = inputs["timestep"]
    scale = 1.0 if timestep.is_floating_point() else 1000.0
    for i in range(steps):
        t = torch.full_like(timestep, (1.0 - i / steps) * scale)
        if not t.is_floating_point():
            t = t.clamp(max=999)
        out = model(**{**inputs, "hidden_states": x, "timestep": t}).sample
        channels = x.shape[1] if x.dim() == 4 else x.shape[-1]
        eps = out[:, :channels] if x.dim() == 4 else out[..., :channels]
        x = x - eps / steps
    return x
