"""Rotation baseline (QuaRot) and the weight side of any online activation transform.

The op applies T(x) = (x · diag(m)) · P · B to its input online (kernels/reference.py), with m a
per-channel multiplier, P the permutation matrix of the gather x[:, perm] and B block-diagonal with
an orthogonal block R. The layer computes x · Wᵀ unchanged when its stored weight is

    W' = W · diag(1/m) · P · B,   since T(x) · W'ᵀ = x · diag(m) P B Bᵀ Pᵀ diag(1/m) · Wᵀ = x · Wᵀ,

that is, W's rows pushed through the same transform with the inverse multiplier. `rotate_weight`
computes it; every method that changes the activations online (SmoothQuant's multiplier, QuaRot's
rotation, CLQ's permutation and block Hadamard) quantizes W' instead of W.

QuaRot (Ashkboos et al., 2024) rotates the input of each linear by one full-width randomized
Hadamard matrix Q = H · D / sqrt(K): outlier channels are spread over all channels, so per-token
activation scales and per-channel weight scales both see a flatter, more Gaussian distribution.
Here Q is applied online (one block of size K); QuaRot's fusion of Q into the producing layer is a
graph transformation left to the passes that can prove it legal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch

from clq_compile.kernels.hadamard import random_hadamard
from clq_compile.kernels.reference import transform_activation

from .layer import QuantizedLinear
from .weight_quantization import rtn

if TYPE_CHECKING:
    from clq_compile.options import Options

# Orthogonality checked in float64 on a float32 rotation: its rounding leaves errors near 1e-7.
_ORTHOGONALITY_TOLERANCE = 1e-4


def rotate_weight(weight: torch.Tensor, act_mul: torch.Tensor | None = None,
                  act_perm: torch.Tensor | None = None,
                  act_rotation: torch.Tensor | None = None) -> torch.Tensor:
    """The weight that undoes the op's online activation transform: W' = W · diag(1/m) · P · B.

    Args:
        weight: [N, K], the full-precision weight.
        act_mul: [K] nonzero per-channel multiplier m, or None.
        act_perm: int64 [K] permutation (gather index), or None.
        act_rotation: [b, b] orthogonal block of B, b dividing K, or None.

    Returns:
        float64 [N, K] with transform_activation(x, act_mul, act_perm, act_rotation) · W'ᵀ = x · Wᵀ.
        Float64 because the caller quantizes it next and should round only once.

    Raises:
        ValueError: shapes disagree, the multiplier has a zero, the permutation is not one, or the
        rotation is not orthogonal (its inverse would not be its transpose).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features]; got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    inverse_mul = None
    if act_mul is not None:
        if act_mul.shape != (k,):
            raise ValueError(f"act_mul must have shape [{k}] (one per input channel); got {tuple(act_mul.shape)}")
        if (act_mul == 0).any():
            raise ValueError("act_mul has a zero entry, which no weight can undo; use a positive multiplier")
        inverse_mul = 1 / act_mul.double()
    if act_perm is not None and not torch.equal(act_perm.sort().values, torch.arange(k, device=act_perm.device)):
        raise ValueError(f"act_perm must be a permutation of 0..{k - 1}")
    rotation = None
    if act_rotation is not None:
        rotation = act_rotation.double()
        b = rotation.shape[0]
        if rotation.shape != (b, b) or k % b:
            raise ValueError(
                f"act_rotation must be a square block whose size divides {k}; got shape {tuple(rotation.shape)}")
        eye = torch.eye(b, dtype=torch.float64, device=rotation.device)
        if (rotation @ rotation.t() - eye).abs().max() > _ORTHOGONALITY_TOLERANCE:
            raise ValueError("act_rotation is not orthogonal, so its transpose does not undo it on the weight side")
    return transform_activation(weight.detach().double(), inverse_mul, act_perm, rotation)


@functools.lru_cache(maxsize=64)
def shared_random_hadamard(k: int, seed: int) -> torch.Tensor:
    """float32 [k, k]: random_hadamard(k, seed), one tensor object per (k, seed).

    Every layer of width k holds this same object, so a saved model stores one matrix per width.
    Callers must not modify it in place.
    """
    return random_hadamard(k, seed, torch.float32)


def quarot_layer(weight: torch.Tensor, options: Options, seed: int = 0) -> QuantizedLinear:
    """QuaRot: rotate the input by a full-width randomized Hadamard matrix, quantize the weight RTN.

    Args:
        weight: [N, K].
        options: w_bits, weight_symmetric, weight_group (weight side); a_bits, act_group (activations).
        seed: seed of the random signs; layers of one width and seed share one rotation tensor.

    Returns:
        A QuantizedLinear with act_rotation = Q [K, K] (applied online as one block) and the
        weight W · Q quantized to nearest.

    Raises:
        ValueError: no Hadamard matrix of order K is available.
    """
    k = weight.shape[-1]
    try:
        rotation = shared_random_hadamard(k, seed)
    except ValueError as error:
        raise ValueError(
            f"QuaRot needs a full-width Hadamard matrix for in_features={k} and none is available "
            f"({error}); quantize this layer with a block rotation (recipe 'clq') or skip it") from None
    layer = rtn(rotate_weight(weight, act_rotation=rotation), options)
    return dataclasses.replace(layer, act_rotation=rotation, method="quarot")
