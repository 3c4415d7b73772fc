"""Weight quantizers: round-to-nearest with min-max (or searched) clipping.

GPTQ joins this file's neighbours in a later recipe; every weight quantizer returns a
`QuantizedLinear` ready for lowering.
"""

from __future__ import annotations

import torch

from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize

from .configs import QuantizerConfig
from .layer import QuantizedLinear


def rtn(weight: torch.Tensor, quantizer: QuantizerConfig, clip: tuple[float, float] = (1.0, 1.0)) -> QuantizedLinear:
    """Round-to-nearest quantization of weight: [out_features, in_features] under `quantizer`."""
    w, a = quantizer.weight, quantizer.activation
    q = quantize(weight.detach().float(), w.format, w.symmetric, w.group, clip)
    method = "rtn" if clip == (1.0, 1.0) else f"rtn clip {clip[0]:.2f}/{clip[1]:.2f}"
    return QuantizedLinear(pack_weight(q), a.format, a.group, method=method)
