"""Integer quantization primitives, weight packing, the torch reference op and the kernels.

Importing this package registers `torch.ops.clq.quant_linear`.
"""

from . import ops  # noqa: F401  (registers the custom op)
