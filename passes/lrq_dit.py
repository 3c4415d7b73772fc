"""LRQ-DiT (recipe `lrq-dit`): SmoothQuant-style scaling, an adaptive rotation, twin-log weights.

Per layer y = x · Wᵀ, with calibration inputs X [T, K]:

1. Scaling: s = max|x|^α / max|W|^(1-α) with α = 0.5 (passes/smoothquant.py), applied online as
   the op's channel multiplier 1/s; X̃ = X · diag(1/s) is what the rotation sees.
2. Adaptive rotation scheme (ARS): the criterion J = ‖X̃‖_F / √(T·K), the root mean square of the
   scaled activations, chooses the rotation R. Below the threshold (option `ars_threshold`, 1 by
   default) R is QuaRot's randomized Hadamard of the full width (passes/rotation.py). At or above
   it, where activations are large enough that a few channels dominate, R is the outlier-aware
   rotation of DuQuant: in every block of b channels a greedy sequence of rotations, each moving
   the block's current largest channel to the front and spreading it over the block with a
   randomized Hadamard (kept only while it lowers the block's max |x|); then a zig-zag
   permutation dealing the channels, by their new ranges, to the blocks in snake order (OBS's
   "spread", passes/orthogonal_smoothing.py); then a second greedy block rotation. R is
   orthogonal, composed offline into one [K, K] matrix, applied online like QuaRot's.
3. Weights: W · diag(s) · R, twin-log quantized per row (passes/twin_log.py) when the weight format
   has a twin-log form (3 and 4 bits), else rounded to nearest on the uniform grid (8 bits: a log
   grid's smallest levels would go unused there), and the layer's notes say so. Option
   `lrq_weights="uniform"` rounds every layer on the uniform grid instead (an ablation: after the
   rotation the weights are close to Gaussian, which a uniform grid fits better; README).

`explain` shows the choice per layer ("ars: hadamard (J 0.41 < 1)" / "ars: outlier-aware (J 2.3 >= 1)").
Without calibration data there is nothing to scale by or to judge J on: the layer gets the Hadamard
and twin-log weights, and its method says "data-free".
"""

from __future__ import annotations

import torch

from clq_compile.kernels.formats import TWIN_LOG
from clq_compile.kernels.hadamard import largest_valid_block, random_hadamard
from clq_compile.kernels.packing import pack_weight

from .configs import LRQConfig, QuantizerConfig
from .layer import ActivationTransform, QuantizedLinear
from .orthogonal_smoothing import balanced_permutation, outlier_scores
from .rotation import rotate_weight, shared_random_hadamard
from .smoothquant import smoothing_factors
from .twin_log import twin_log_quantize
from .weight_quantization import rtn

ALPHA = 0.5
# Greedy rotations per block and pass (DuQuant's steps), and the block of the outlier-aware path.
GREEDY_STEPS = 8
BLOCK = 128


def activation_criterion(x: torch.Tensor) -> float:
    """J = ‖X‖_F / √(number of entries) of activations x [..., K] (B·N·C entries for a batch of B
    sequences of N tokens with C channels)."""
    x = x.detach().double()
    return float(x.norm() / max(x.numel(), 1) ** 0.5)


def greedy_block_rotation(x: torch.Tensor, steps: int = GREEDY_STEPS, seed: int = 0) -> torch.Tensor:
    """float64 [b, b] orthogonal R for the block's activations x [T, b]: up to `steps` rotations,
    each swapping the channel of largest max |x · R| to the front and multiplying by a randomized
    normalized Hadamard (whose first row is uniform: that channel is spread evenly over the block),
    kept while it lowers max |x · R|. b must be a Hadamard order."""
    b = x.shape[1]
    x = x.double()
    rotation, y = torch.eye(b, dtype=torch.float64), x  # y = x · rotation
    peak = float(x.abs().max()) if x.numel() else 0.0
    for step in range(steps):
        channel = int(y.abs().amax(dim=0).argmax())
        swap = torch.arange(b)
        swap[0], swap[channel] = channel, 0
        candidate = rotation[:, swap] @ random_hadamard(b, seed * 1009 + step, torch.float64)
        y_candidate = x @ candidate
        new_peak = float(y_candidate.abs().max())
        if not new_peak < peak:
            break
        rotation, y, peak = candidate, y_candidate, new_peak
    return rotation


def _block_diagonal(x: torch.Tensor, block: int, steps: int, seed: int) -> torch.Tensor:
    k = x.shape[1]
    return torch.block_diag(*(greedy_block_rotation(x[:, i:i + block], steps, seed + i // block)
                              for i in range(0, k, block)))


def outlier_aware_rotation(x: torch.Tensor, block: int = BLOCK, steps: int = GREEDY_STEPS,
                           seed: int = 0) -> tuple[torch.Tensor, int]:
    """(float64 [K, K] orthogonal R, the block used): greedy block rotations, the zig-zag
    permutation, greedy block rotations again (see the module docstring), on activations x [T, K].
    The block is the largest Hadamard order up to `block` dividing K."""
    k = x.shape[1]
    used = largest_valid_block(k, block)
    x = x.double()
    first = _block_diagonal(x, used, steps, seed)
    y = x @ first
    perm = balanced_permutation(outlier_scores(y.abs().amax(dim=0)), used)
    second = _block_diagonal(y[:, perm], used, steps, seed + k)
    return first[:, perm] @ second, used  # x · first, gathered by perm, then · second


def lrq_dit_layer(weight: torch.Tensor, samples: torch.Tensor | None, act_absmax: torch.Tensor | None,
                  quantizer: QuantizerConfig, config: LRQConfig = LRQConfig()) -> QuantizedLinear:
    """LRQ-DiT's layer (see the module docstring). samples [T, K]: calibration inputs; act_absmax [K]:
    their per-channel max |x| over all calibration data; both None without calibration."""
    k = weight.shape[1]
    notes: list[str] = []
    details: dict = {}
    hadamard_block = largest_valid_block(k, k)
    hadamard = shared_random_hadamard(hadamard_block, config.seed) if hadamard_block > 1 else None
    mul, rotation = None, hadamard
    choice = "hadamard"
    if samples is not None:
        mul = (1 / smoothing_factors(act_absmax, weight, ALPHA)).float()
        scaled = samples.double() * mul.double()
        j = activation_criterion(scaled)
        details["ars_J"] = j
        if j >= config.threshold:
            r, used = outlier_aware_rotation(scaled, BLOCK, GREEDY_STEPS, config.seed)
            rotation, choice = r.float(), "outlier-aware"
            notes.append(f"ars: outlier-aware rotation, blocks of {used} (J {j:.3g} >= {config.threshold:g})")
        else:
            notes.append(f"ars: hadamard (J {j:.3g} < {config.threshold:g})")
    if rotation is None:
        notes.append(f"ars: no Hadamard block divides the width {k}; not rotated")
    elif choice == "hadamard" and hadamard_block < k:
        notes.append(f"ars: no Hadamard matrix of order {k}; {k // hadamard_block} blocks of H{hadamard_block}")
    details["ars"] = choice
    online = ActivationTransform(mul=mul, rotation=rotation)
    transformed = rotate_weight(weight, act_mul=mul, act_rotation=rotation)
    w = quantizer.weight
    fmt = TWIN_LOG.get(w.format.bits) if w.format.integer else None
    if fmt is not None and w.symmetric and w.group is None and config.weights == "twin-log":
        packed = pack_weight(twin_log_quantize(transformed, fmt))
        layer = QuantizedLinear(packed, quantizer.activation.format, quantizer.activation.group)
        weights = fmt.name
    else:
        layer = rtn(transformed, quantizer)
        weights = f"{w.format.name} rtn"
        notes.append("weights: uniform grid (option lrq_weights)" if config.weights == "uniform" else
                     f"weights: {w.format.name} has no twin-log form here; rounded to nearest")
    method = f"lrq-dit: {weights} + {choice}" + ("" if samples is not None else " (data-free)")
    return QuantizedLinear(layer.weight, layer.a_format, layer.a_group, online=online, method=method,
                           notes=notes, details=details)
