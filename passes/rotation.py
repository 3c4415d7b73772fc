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
graph transformation left to the passes that can prove it legal. A width K with no Hadamard matrix
of order K (44 = 4·11, 100 = 4·25) is rotated block-diagonally by the largest order that divides
it instead, and the layer's notes say so.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from clq_compile.kernels.hadamard import largest_valid_block, random_hadamard
from clq_compile.kernels.reference import transform_activation

from .configs import QuantizerConfig, QuaRotConfig
from .layer import ActivationTransform, QuantizedLinear
from .weight_quantization import rtn

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


def rotate_hessian(hessian: torch.Tensor, act_perm: torch.Tensor | None = None,
                   act_rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Gᵀ · H · G: the GPTQ Hessian of the transformed input x · G, where x · G is the op's
    online transform (gather by act_perm, then act_rotation on every block).

    hessian: [K, K] of the untransformed input; act_perm: int64 [K] or None; act_rotation: [b, b]
    with b dividing K, or None. Returns float64 [K, K], consistent with `rotate_weight`.
    """
    k = hessian.shape[0]
    g = transform_activation(torch.eye(k, dtype=torch.float64), None, act_perm,
                             None if act_rotation is None else act_rotation.double())
    return g.t() @ hessian.double() @ g


@functools.lru_cache(maxsize=64)
def shared_random_hadamard(k: int, seed: int) -> torch.Tensor:
    """float32 [k, k]: random_hadamard(k, seed), one tensor object per (k, seed).

    Every layer rotated by blocks of k holds this same object, so a saved model stores one matrix
    per block size. Callers must not modify it in place.
    """
    return random_hadamard(k, seed, torch.float32)


def quarot_layer(weight: torch.Tensor, quantizer: QuantizerConfig,
                 config: QuaRotConfig = QuaRotConfig()) -> QuantizedLinear:
    """QuaRot: rotate the input by a randomized Hadamard matrix, quantize the weight RTN.

    Args:
        weight: [N, K].
        quantizer: how weights and activations are quantized.
        config: the seed of the random signs; layers of one rotation size and seed share one tensor.

    Returns:
        A QuantizedLinear with act_rotation = Q [b, b] (applied online to each of the K // b
        channel blocks) and the weight W · blockdiag(Q) quantized to nearest. b = K (QuaRot's
        full-width rotation) when a Hadamard matrix of order K exists; otherwise b is the largest
        available order dividing K, and the layer's notes say so. When no block above 1 divides K
        (odd K) the layer is not rotated, and the notes say that too.
    """
    k = weight.shape[-1]
    block = largest_valid_block(k, k)
    rotation = shared_random_hadamard(block, config.seed) if block > 1 else None
    layer = rtn(rotate_weight(weight, act_rotation=rotation), quantizer)
    notes = []
    if block == 1:
        notes.append(f"QuaRot: no Hadamard block divides the width {k}; not rotated")
    elif block < k:
        notes.append(f"QuaRot: no Hadamard matrix of order {k}; rotated by {k // block} blocks of H{block}")
    return dataclasses.replace(layer, online=ActivationTransform(rotation=rotation), method="quarot", notes=notes)
