"""Policy: which linear layers are quantized, and why each one is or is not.

Token GEMMs (attention projections, feed-forward, single-stream block layers) are quantized.
Conditioning GEMMs (timestep / caption embedders, adaLN modulation; M = batch size, so they cost
little and carry the whole image's conditioning), the patch embedding and the final projection
stay in 16 bit; options.conditioning_bits quantizes conditioning GEMMs and modulations weight-only
instead. Every decision carries a sentence that `explain()` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .capture import LinearSite
from .configs import PolicyConfig

_KEPT_ROLES = {
    "conditioning": "conditioning GEMM (one row per image)",
    "adaln": "adaLN modulation (one row per image)",
    "adaln_token": "adaLN modulation (one row per token: per-token timesteps)",
    "embed": "patch / context embedding",
    "final": "final projection",
}


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str


def decide(site: LinearSite, policy: PolicyConfig) -> Decision:
    """Whether `site` is quantized under `policy` (Options.policy()), with the reason."""
    if policy.quantizer is None:
        return Decision(False, f"bits {policy.bits}: no quantization")
    for pattern in policy.skip:
        if fnmatchcase(site.path, pattern):
            return Decision(False, f"matches skip pattern {pattern!r}")
    mode = policy.layer_mode(site.role)
    if site.role in _KEPT_ROLES and mode == policy.bits:
        return Decision(False, f"{_KEPT_ROLES[site.role]}: kept in 16 bit")
    if site.role in ("cross_k", "cross_v") and not policy.quantize_cross_kv:
        return Decision(False, "cross-attention key/value on text tokens: kept (quantize_cross_kv=False)")
    k = site.in_features
    if k == 0 or site.out_features == 0:
        return Decision(False, f"empty weight ({site.out_features} x {k}): nothing to quantize")
    quantizer = policy.layer_quantizer(site.role)
    problem = quantizer.weight.format.width_problem(k)
    if problem:
        return Decision(False, problem)
    for name, group in (("weight_group", quantizer.weight.group), ("act_group", quantizer.activation.group)):
        if group is not None and k % group:
            return Decision(False, f"{name} {group} does not divide the input width {k}")
    if mode != policy.bits:
        return Decision(True, f"{_KEPT_ROLES[site.role]}: weight-only {mode} (conditioning_bits)")
    return Decision(True, "token GEMM")
