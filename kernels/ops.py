"""`torch.ops.clq.quant_linear`: one opaque call per quantized linear layer.

Registered with `torch.library.custom_op` and a fake implementation, so Dynamo, AOTAutograd and
Inductor see a single node with a known output shape and fuse everything around it. The
implementation dispatches to generated Triton kernels or to the torch reference.
"""

from __future__ import annotations

import importlib.util

import torch

from .reference import quant_linear_reference

KERNEL_CHOICES = ("auto", "reference", "triton")


@torch.library.custom_op("clq::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor | None, bias: torch.Tensor | None,
                 act_mul: torch.Tensor | None, act_perm: torch.Tensor | None,
                 act_rotation: torch.Tensor | None, in_features: int, w_format: str, a_format: str,
                 w_group: int, a_group: int, kernels: str) -> torch.Tensor:
    """A quantized linear layer: x [..., in_features] -> [..., N] in x's dtype.

    qweight:      the weight's codes in `w_format`'s storage (kernels/formats.py, kernels/packing.py):
                  uint8 [N, in_features // 2] (int4), int8 [N, in_features] (int8),
                  uint8 [N, 3 in_features // 8] (int3), float8_e4m3fn [N, in_features] (e4m3)
    w_scale:      float32 [N, in_features // w_group] (one column when w_group is 0)
    w_zero:       int8 like w_scale for asymmetric integer weights, else None
    bias:         [N] or None
    act_mul, act_perm, act_rotation: the online activation transform (kernels/reference.py)
    w_format:     "int3", "int4", "int8" or "e4m3"
    a_format:     "int4", "int8" or "e4m3" (dynamic symmetric per token, or per a_group
                  channels), or "none" (activations not quantized)
    w_group, a_group: group sizes along in_features; 0 means one group per row / token
    kernels:      "auto" (the best available path), "reference" or "triton" (the compiled kernels:
                  generated Triton, or torch._scaled_mm for e4m3)
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}; got {kernels!r}")
    if kernels == "triton" or (kernels == "auto" and x.is_cuda):
        # Imported here: triton exists only on Linux, and "auto" must keep working without it.
        if importlib.util.find_spec("triton") is not None:
            from .triton_linear import quant_linear_triton

            return quant_linear_triton(x, qweight, w_scale, w_zero, bias, act_mul, act_perm,
                                       act_rotation, in_features, w_format, a_format, w_group, a_group)
        if kernels == "triton":
            raise RuntimeError(
                "kernels='triton' needs the triton package, which is not installed (it is "
                "available on Linux x86_64); install it or use options={'kernels': 'reference'}")
    return quant_linear_reference(x, qweight, w_scale, w_zero, bias, act_mul, act_perm,
                                  act_rotation, in_features, w_format, a_format, w_group, a_group)


@quant_linear.register_fake
def _(x, qweight, w_scale, w_zero, bias, act_mul, act_perm, act_rotation, in_features, w_format,
      a_format, w_group, a_group, kernels):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _no_backward(ctx, grad):
    raise RuntimeError("clq::quant_linear has no gradient: quantized graphs are for inference. "
                       "Run them under torch.no_grad() or torch.inference_mode().")


quant_linear.register_autograd(_no_backward)
