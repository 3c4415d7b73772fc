"""`torch.ops.clq.quant_linear`: one opaque call per quantized linear layer.

Registered with `torch.library.custom_op` and a fake implementation, so Dynamo, AOTAutograd and
Inductor see a single node with a known output shape and fuse everything around it. The
implementation dispatches to generated Triton kernels or to the torch reference.

A layer quantized per timestep bucket (passes/timesteps.py) is one `clq::quant_linear_bucketed`
call reading the bucket index that `clq::timestep_bucket` computes once per graph from the
graph's `timestep` input: the selection happens inside the ops at run time, so the graph has no
guard on the timestep and compiles once for a whole sampling run. The bucket index lives in CPU
memory (one small device-to-host copy per forward, not one per layer); the bucketed op then calls
`quant_linear` with the chosen bucket's tensors.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

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


@torch.library.custom_op("clq::timestep_bucket", mutates_args=())
def timestep_bucket(timestep: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """int64 [timestep.numel()] in CPU memory: each timestep's bucket, the number of `edges`
    (float64 [B - 1], ascending) at or below it. Raises ValueError for a NaN or infinite timestep."""
    t = timestep.detach().reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"the timestep holds NaN or Inf ({t.tolist()[:8]}); a model quantized per "
                         f"timestep bucket needs finite timesteps to choose its layers' bucket")
    return torch.bucketize(t, edges.to("cpu", torch.float64), right=True)


@timestep_bucket.register_fake
def _(timestep, edges):
    return timestep.new_empty(timestep.numel(), dtype=torch.int64, device="cpu")


@torch.library.custom_op("clq::quant_linear_bucketed", mutates_args=())
def quant_linear_bucketed(x: torch.Tensor, bucket: torch.Tensor, bias: torch.Tensor | None,
                          qweight: Sequence[torch.Tensor], w_scale: Sequence[torch.Tensor],
                          w_zero: Sequence[Optional[torch.Tensor]], own_bias: Sequence[Optional[torch.Tensor]],
                          act_mul: Sequence[Optional[torch.Tensor]], act_perm: Sequence[Optional[torch.Tensor]],
                          act_rotation: Sequence[Optional[torch.Tensor]], in_features: int, w_formats: str,
                          a_formats: str, w_groups: Sequence[int], a_groups: Sequence[int],
                          kernels: str) -> torch.Tensor:
    """A linear layer quantized per timestep bucket: x [..., in_features] -> [..., N].

    bucket: int64 [S] (`timestep_bucket`): the bucket of each of the call's S timesteps. Each list
    argument holds one entry per bucket, as `quant_linear` takes it (own_bias: the bucket's own
    bias, None to use the graph's `bias`); w_formats / a_formats: the buckets' formats joined by
    commas ("int4,int8"). When all S timesteps share a bucket (a sampling step), the whole input
    runs on that bucket's layer; otherwise x's first dimension must be the S samples, and each
    sample's rows run on its own bucket's layer (ValueError when it is not).
    """
    w_fmts, a_fmts = w_formats.split(","), a_formats.split(",")
    count = len(qweight)
    ids = bucket.reshape(-1).tolist()
    if not ids or min(ids) < 0 or max(ids) >= count:
        raise ValueError(f"timestep buckets {ids[:8]} are not among this layer's {count} buckets")

    def run(b: int, rows: torch.Tensor) -> torch.Tensor:
        return quant_linear(rows, qweight[b], w_scale[b], w_zero[b], bias if own_bias[b] is None else own_bias[b],
                            act_mul[b], act_perm[b], act_rotation[b], in_features, w_fmts[b], a_fmts[b],
                            w_groups[b], a_groups[b], kernels)

    if len(set(ids)) == 1:
        return run(ids[0], x)
    if x.dim() < 2 or x.shape[0] != len(ids):
        raise ValueError(
            f"this call's {len(ids)} timesteps fall in different buckets, but the layer's input "
            f"{list(x.shape)} does not have one row per sample along its first dimension, so no row can "
            f"be given its timestep's bucket; run samples of different buckets in separate calls")
    out = x.new_empty(*x.shape[:-1], qweight[0].shape[0])
    index = torch.tensor(ids)
    for b in sorted(set(ids)):
        rows = (index == b).nonzero().reshape(-1).to(x.device)
        out[rows] = run(b, x.index_select(0, rows))
    return out


@quant_linear_bucketed.register_fake
def _(x, bucket, bias, qweight, w_scale, w_zero, own_bias, act_mul, act_perm, act_rotation, in_features,
      w_formats, a_formats, w_groups, a_groups, kernels):
    return x.new_empty(*x.shape[:-1], qweight[0].shape[0])


quant_linear_bucketed.register_autograd(_no_backward)
