"""Integer quantization primitives, weight packing, Hadamard matrices, the torch reference op and
the Triton kernels of clq-compile, installed as `clq_compile.kernels`.

Importing `clq_compile.kernels.ops` registers `torch.ops.clq.quant_linear` (the package
`clq_compile` does so). This file stays free of side effects: libraries probing for an unrelated
top-level package named `kernels` may import this folder when the repository root is on
sys.path, and must find nothing to run.
"""
