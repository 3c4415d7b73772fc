"""Weight quantizers: round-to-nearest with min-max (or searched) clipping.

GPTQ joins this file's neighbours in a later recipe; every weight quantizer returns a
`QuantizedLinear` ready for lowering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clq_compile.kernels.packing import pack_weight
from clq_compile.kernels.quantize import quantize

from .layer import QuantizedLinear

if TYPE_CHECKING:
    from clq_compile.options import Options


def rtn(weight: torch.Tensor, options: Options, clip: tuple[float, float] = (1.0, 1.0)) -> QuantizedLinear:
    """Round-to-nearest quantization of weight: [out_features, in_features] under `options`."""
    q = quantize(weight.detach().float(), options.w_format, options.weight_symmetric,
                 options.weight_group, clip)
    method = "rtn" if clip == (1.0, 1.0) else f"rtn clip {clip[0]:.2f}/{clip[1]:.2f}"
    return QuantizedLinear(pack_weight(q), options.a_format, options.act_group, method=method)
