"""GPTQ weight quantization (Frantar et al., 2023): round column by column, compensating the error.

The layer's output error on calibration inputs x: [T, K] is ||x · (W - Ŵ)ᵀ||², a quadratic form in
each row of W with Hessian H = 2/T · xᵀx: [K, K]. GPTQ quantizes the columns of W one at a time; after
rounding column i it spreads the rounding error over the columns not yet quantized, as the optimal
least-squares update under H (Optimal Brain Quantization):

    e = (w_i - ŵ_i) / U[i, i],   W[:, j] -= e · U[i, j]   for j > i,

where U is the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U). Row i of U is row i of the inverse of H
restricted to columns i.., divided by the square root of its diagonal entry: every step's inverse
Hessian comes from one factorization, and no matrix is re-inverted.
The updates are applied eagerly only inside a block of columns and lazily, as one matrix product,
to the columns after the block; the result is the same, the memory traffic much smaller.

Details this implementation fixes:
- Dead columns (H[c, c] = 0: channel c was zero on every calibration token) keep their weight and
  are rounded to nearest: the channel may be live at inference, and a zero row and column in H
  decouple it from every other column, so it neither sends nor receives error.
- Damping: H + λ·I with λ = damp · mean(diag H), the mean over live columns, so that an H of rank
  below K (fewer tokens than channels) has a Cholesky factor.
- Groups: a group's scale and zero point come from `kernels.quantize.quantize` on the group's
  columns as they are when the group's first column is reached, error updates included. Without
  groups the whole row is one group, reached before any update: its scale comes from the
  unquantized weight.
- act_order: columns are processed by decreasing H[c, c] (most active channels first, while the
  most columns remain to absorb their error), but groups stay the contiguous slices of the original
  column order that the op expects. Since the processing order then visits a group's columns at
  scattered times, every group's parameters are computed up front from the unquantized weight.
"""

from __future__ import annotations

import torch

from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.formats import NumberFormat, as_format
from clq_compile.kernels.quantize import Quantized, quantize

from .configs import GPTQConfig, QuantizerConfig
from .layer import QuantizedLinear


class HessianAccumulator:
    """Streams calibration inputs into H = 2/T · xᵀx (float64 [K, K]) over many calls."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.tokens = 0
        self._sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """x: [..., K], any number of leading (token) dimensions."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} channels but the Hessian is for {self.in_features}")
        flat = x.detach().reshape(-1, self.in_features).double()
        gram = flat.t() @ flat
        self._sum = gram if self._sum is None else self._sum + gram
        self.tokens += flat.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """float64 [K, K]: 2/T · Σ xᵀx over the T tokens added so far."""
        if self._sum is None or self.tokens == 0:
            raise ValueError("no calibration tokens were added; call add(x) before reading the Hessian")
        return self._sum * (2 / self.tokens)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """x: [..., K] -> float64 [K, K]: 2/T · xᵀx over the T tokens of x."""
    accumulator = HessianAccumulator(x.shape[-1])
    accumulator.add(x)
    return accumulator.value


def _conditioned(h: torch.Tensor, damp: float) -> torch.Tensor:
    """float64 [K, K]: H with dead columns decoupled and damping added (see the module docstring)."""
    h = h.detach().double().clone()
    diag = h.diagonal()
    if (diag < 0).any():
        raise ValueError("the Hessian has a negative diagonal entry; it must be 2/T · xᵀx of real inputs")
    dead = diag == 0
    live_mean = diag[~dead].mean() if (~dead).any() else torch.ones((), dtype=h.dtype, device=h.device)
    h[dead, :] = 0
    h[:, dead] = 0
    index = dead.nonzero().squeeze(1)
    # Any positive value would do for a decoupled column; the live mean keeps H's scale uniform.
    h[index, index] = live_mean
    h.diagonal().add_(damp * live_mean)
    return h


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """float64 [K, K]: U upper triangular with H⁻¹ = Uᵀ U."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info == 0:
        inverse = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info != 0:
        raise ValueError("the damped Hessian is not positive definite; increase damp (e.g. to 0.1) or "
                         "calibrate on more tokens")
    return upper


def gptq(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat | int, symmetric: bool, group: int | None,
         damp: float = 0.01, act_order: bool = False, block_size: int = 128,
         clip: tuple[float, float] = (1.0, 1.0)) -> Quantized:
    """GPTQ-quantize weight: [N, K] under the Hessian of its inputs.

    Args:
        weight: [N, K].
        hessian: [K, K], 2/T · xᵀx of the layer's calibration inputs (see `hessian`).
        fmt, symmetric, group, clip: the quantizer, as in `kernels.quantize.quantize`.
        damp: damping as a fraction of the mean live Hessian diagonal.
        act_order: process columns by decreasing Hessian diagonal.
        block_size: columns per lazy-update block; a performance knob only (the result is the same
            up to float rounding). Without act_order it is rounded to a multiple of the group size,
            so that each group lies inside one block and is fully updated when it is first reached.

    Returns:
        Quantized with codes [N, K] in the original column order, scale float32 [N, K // group]
        and zero int16 like scale (or None when symmetric); its dequantize() is the GPTQ weight.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features]; got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight with {k} input channels; "
                         f"got {tuple(hessian.shape)}")
    fmt = as_format(fmt)
    if damp < 0 or block_size < 1:
        raise ValueError(f"damp must be >= 0 and block_size >= 1; got damp={damp}, block_size={block_size}")
    g = group or k
    if k % g:
        raise ValueError(f"group size {g} does not divide the input width {k}")

    h = _conditioned(hessian.to(weight.device), damp)
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(k, device=weight.device)
    upper = _inverse_cholesky(h[order][:, order])
    w = weight.detach().double()[:, order].clone()

    lazy_groups = group is not None and not act_order
    if lazy_groups:
        block_size = max(g, block_size - block_size % g)
        scale = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
        zero = None if symmetric else torch.empty(n, k // g, dtype=torch.int16, device=w.device)
    else:
        upfront = quantize(weight.detach().float(), fmt, symmetric, group, clip)
        scale, zero = upfront.scale, upfront.zero
    original = order.tolist()
    q = torch.empty(n, k, dtype=fmt.code_dtype, device=w.device)

    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = torch.zeros(n, end - start, dtype=torch.float64, device=w.device)
        for i in range(start, end):
            column, group_index = original[i], original[i] // g
            if lazy_groups and column % g == 0:
                params = quantize(w[:, i:i + g].float(), fmt, symmetric, None, clip)
                scale[:, group_index] = params.scale[:, 0]
                if zero is not None:
                    zero[:, group_index] = params.zero[:, 0]
            s = scale[:, group_index]
            z = zero[:, group_index].float() if zero is not None else None
            # The same float32 arithmetic as `quantize` and `Quantized.dequantize`, so that without
            # error feedback the codes are RTN's, bit for bit.
            qi = fmt.encode(w[:, i].float() / s, z)
            error = (w[:, i] - (fmt.decode(qi, z) * s).double()) / upper[i, i]
            w[:, i + 1:end] -= error[:, None] * upper[i, i + 1:end][None, :]
            errors[:, i - start] = error
            q[:, i] = qi.to(fmt.code_dtype)
        w[:, end:] -= errors @ upper[start:end, end:]

    in_original_order = torch.empty_like(q)
    in_original_order[:, order] = q
    return Quantized(in_original_order, scale, zero, fmt, group)


def gptq_layer(weight: torch.Tensor, hessian: torch.Tensor, quantizer: QuantizerConfig,
               config: GPTQConfig) -> QuantizedLinear:
    """GPTQ of weight: [N, K] under hessian: [K, K] and `quantizer`, packed for the op (method "gptq")."""
    w, a = quantizer.weight, quantizer.activation
    q = gptq(weight, hessian, w.format, w.symmetric, w.group, act_order=config.act_order)
    notes = ["columns in activation order"] if config.act_order else []
    return QuantizedLinear(pack_weight(q), a.format, a.group, method="gptq", notes=notes)
