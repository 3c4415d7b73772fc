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


def _attention_value_paths(model: nn.Module) -> list[tuple[list[nn.Linear], list[nn.Linear]]]:
    """([value projections], [output projections]) of every attention whose output projection exists.

    Joint attention (SD3, Flux) concatenates image and context values along the tokens, so an
    image-token output mixes both streams: its value channels must be scaled in both streams and
    divided out of both output projections for the function to stay the same.
    """
    found = []
    for module in model.modules():
        to_v, to_out = getattr(module, "to_v", None), getattr(module, "to_out", None)
        if not isinstance(to_v, nn.Linear) or to_out is None:
            continue
        out = to_out[0] if isinstance(to_out, nn.ModuleList) else to_out
        if not isinstance(out, nn.Linear) or out.in_features != to_v.out_features:
            continue
        values, outputs = [to_v], [out]
        add_v, add_out = getattr(module, "add_v_proj", None), getattr(module, "to_add_out", None)
        if isinstance(add_v, nn.Linear):
            if not isinstance(add_out, nn.Linear):
                continue  # the context stream's output is not a separate projection: skip
            values.append(add_v)
            outputs.append(add_out)
        found.append((values, outputs))
    return found


def inject_outliers(model: nn.Module, scale: float = 50.0, channels: int = 2, seed: int = 0) -> int:
    """Scale `channels` random value channels of every attention by `scale`, divide them out after.

    Returns the number of attention modules changed. The full-precision output is unchanged
    up to float rounding.
    """
    g = torch.Generator().manual_seed(seed)
    found = _attention_value_paths(model)
    with torch.no_grad():
        for values, outputs in found:
            idx = torch.randperm(values[0].out_features, generator=g)[:channels]
            for v in values:
                v.weight[idx] *= scale
                if v.bias is not None:
                    v.bias[idx] *= scale
            for out in outputs:
                out.weight[:, idx] /= scale
    return len(found)


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


def stress_model(family: str, seed: int, outlier_scale: float = 50.0, heads: int = 8,
                 head_dim: int = 32, blocks: int = 2) -> nn.Module:
    """A tiny `family` model of `blocks` blocks with trained-like weights and injected outliers (see above)."""
    from . import tiny_models

    model = tiny_models.build(family, seed=seed, heads=heads, head_dim=head_dim, blocks=blocks)
    trained_like_weights(model, seed=seed)
    if outlier_scale:
        inject_outliers(model, scale=outlier_scale, seed=seed)
    return model


def compare_recipes(family: str, recipes: list[str], bits: str = "w4a4", seeds: tuple[int, ...] = (0, 1, 2),
                    steps: int = 10, calibration_calls: int = 4, outlier_scale: float = 50.0,
                    options: dict | None = None, blocks: int = 2) -> dict[str, dict[str, list[float]]]:
    """Relative error of each recipe's final sample against full precision, per seed.

    For every seed: a stress model, calibration on `calibration_calls` random inputs, then the
    short sampling loop `sample` from the same noise as the full-precision model.
    Returns {recipe: {"error": [per seed], "quantize_seconds": [per seed]}}.
    """
    import time

    import clq_compile

    from . import tiny_models

    results = {r: {"error": [], "quantize_seconds": []} for r in recipes}
    for seed in seeds:
        model = stress_model(family, seed, outlier_scale, blocks=blocks)
        noise = tiny_models.make_inputs(family, seed=1000 + seed)
        with torch.no_grad():
            reference = sample(model, noise, steps)
            for recipe in recipes:
                torch._dynamo.reset()
                qt = torch.compile(model, backend="clq",
                                   options={"bits": bits, "recipe": recipe, **(options or {})})
                start = time.perf_counter()
                with clq_compile.calibrating(qt):
                    for call in range(calibration_calls):
                        qt(**tiny_models.make_inputs(family, seed=100 * seed + call))
                results[recipe]["quantize_seconds"].append(time.perf_counter() - start)
                out = sample(qt, noise, steps)
                error = float((out - reference).norm() / reference.norm())
                results[recipe]["error"].append(error)
    return results
