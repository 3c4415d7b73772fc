"""SmoothQuant baseline (Xiao et al., 2023): migrate activation outliers into the weights.

For a linear y = x · Wᵀ with x: [tokens, K] and W: [N, K], a per-input-channel factor s > 0 gives

    y = (x · diag(1/s)) · (W · diag(s))ᵀ,

with s_c = max|x_c|^α / max|W_c|^(1-α), where max|W_c| is taken over the output dimension (column c
of W). Channels with large activations are divided down and their weight columns multiplied up,
so the per-token activation scale is no longer set by a few outlier channels. α trades activation
difficulty against weight difficulty; it is chosen per layer from a grid by the layer's measured
output error.

The activation side is applied online: the op multiplies its input by act_mul = 1/s
(kernels/reference.py, transform_activation) before quantizing it. With option `fold`, a layer
whose input comes from producer linears through attention or reshapes only (passes/folding.py)
gets it from the producers instead: their output rows and bias are multiplied by 1/s. A diagonal
commutes with attention in every channel, so unlike a rotation it needs no head-local form, and
per-output-channel weight scales absorb most of a row scaling (the producer's own α is searched
again on its scaled rows). Consumers of one fold group share s, searched jointly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .configs import QuantizerConfig
from .layer import ActivationTransform, QuantizedLinear
from .lowrank import lowrank_split, with_input_transform
from .rotation import rotate_weight
from .weight_quantization import rtn

# Floor on both maxima: a channel silent during calibration (max|x_c| = 0) would give s_c = 0 and an
# infinite online multiplier 1/s_c, and an all-zero weight column would give s_c = inf. With the
# floor such a channel gets a finite s_c, and since its activations or weights are zero the layer's
# output is unchanged whatever s_c is.
_MAX_FLOOR = 1e-5

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_c = max|x_c|^α / max|W_c|^(1-α), per input channel c.

    Args:
        act_absmax: [K], max |x| of each input channel over the calibration tokens.
        weight: [N, K].
        alpha: migration strength in [0, 1]: at 1 the activation ranges move entirely into the weights,
            at 0 s only equalizes the weight columns' ranges.

    Returns:
        float64 [K], every entry positive and finite.
    """
    if weight.dim() != 2 or act_absmax.shape != (weight.shape[1],):
        raise ValueError(
            f"act_absmax must be [in_features] and weight [out_features, in_features]; "
            f"got {tuple(act_absmax.shape)} and {tuple(weight.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"the SmoothQuant migration strength alpha must lie in [0, 1]; got {alpha}")
    a = act_absmax.detach().double().abs().clamp(min=_MAX_FLOOR)
    w = weight.detach().double().abs().amax(dim=0).clamp(min=_MAX_FLOOR)
    return a**alpha / w ** (1 - alpha)


def _smoothed_layer(weight: torch.Tensor, act_mul: torch.Tensor, quantizer: QuantizerConfig,
                    alpha: float, rank: int = 0) -> QuantizedLinear:
    """The layer smoothed by act_mul = 1/s (strength alpha) online, W · diag(s) quantized RTN;
    with a `rank`, W · diag(s) is first split into a 16-bit low-rank branch and the residual that
    is quantized (SVDQuant, passes/lowrank.py)."""
    # The weight undoes the float32 multiplier the op actually applies, not the float64 1/s.
    smoothed = rotate_weight(weight, act_mul=act_mul)
    if not rank:
        layer = rtn(smoothed, quantizer)
        return dataclasses.replace(layer, online=ActivationTransform(mul=act_mul), method=f"smoothquant α={alpha:g}")
    residual, branch = lowrank_split(smoothed, rank, weight.dtype)
    return dataclasses.replace(rtn(residual, quantizer), online=ActivationTransform(mul=act_mul),
                               lowrank=with_input_transform(branch, act_mul),
                               method=f"svdquant α={alpha:g} +lowrank r{rank}")


def smoothquant_layer(weight: torch.Tensor, x: torch.Tensor, act_absmax: torch.Tensor,
                      quantizer: QuantizerConfig, alphas: Sequence[float] = DEFAULT_ALPHAS,
                      rank: int = 0) -> QuantizedLinear:
    """SmoothQuant with α searched per layer on calibration samples.

    Args:
        weight: [N, K].
        x: [..., K] calibration inputs of the layer (tokens); the error is measured on them.
        act_absmax: [K] max |x| per channel over all calibration data (may cover more than x).
        quantizer: formats, groups and weight symmetry, as for RTN.
        alphas: the grid of migration strengths tried.
        rank: with 1 or more, SVDQuant: each candidate keeps a low-rank branch of this rank
            split from W · diag(s) (its error, branch included, decides α).

    Returns:
        The QuantizedLinear whose output error ||x · Wᵀ - layer(x)||² (through the reference op,
        with the real weight and activation quantization) is least over the grid; its method reads
        "smoothquant α=<chosen α>". Ties go to the earlier α in the grid.
    """
    (layer,) = smoothquant_shared([weight], [x], act_absmax, quantizer, alphas, rank)
    return layer


def smoothquant_shared(weights: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], act_absmax: torch.Tensor,
                       quantizer: QuantizerConfig, alphas: Sequence[float] = DEFAULT_ALPHAS,
                       rank: int = 0) -> list[QuantizedLinear]:
    """SmoothQuant for layers that must share one s (the consumers of a fold group).

    s comes from the layers' weights stacked along the outputs; α minimizes the sum of the layers'
    output errors, each on its own calibration inputs `xs`. Returns one layer per weight.
    """
    if not alphas:
        raise ValueError("alphas must hold at least one migration strength, e.g. (0.5,)")
    k = weights[0].shape[-1]
    for x in xs:
        if x.shape[-1] != k:
            raise ValueError(f"calibration inputs have {x.shape[-1]} channels but the weight expects {k}")
    samples = [x.detach().reshape(-1, k).float() for x in xs]
    references = [xx.double() @ w.detach().double().t() for xx, w in zip(samples, weights)]
    stacked = torch.cat([w.detach() for w in weights])
    best, best_error = None, float("inf")
    for alpha in alphas:
        act_mul = (1 / smoothing_factors(act_absmax, stacked, alpha)).float()
        layers = [_smoothed_layer(w, act_mul, quantizer, alpha, rank) for w in weights]
        error = sum(float((layer.forward(xx, None, "reference").double() - ref).square().sum())
                    for layer, xx, ref in zip(layers, samples, references))
        if error < best_error:
            best, best_error = layers, error
    if best is None:
        raise ValueError("every α gave a non-finite output error; check the calibration inputs for inf or NaN")
    return best
