"""Policy: which layers are quantized, and the reason recorded for each."""

import pytest

from clq_compile.options import parse_options
from clq_compile.passes.capture import KEPT_ROLES, TOKEN_ROLES, LinearSite
from clq_compile.passes.policy import decide


def site(path="transformer_blocks.0.attn1.to_q", role="attn_q", k=64, n=32):
    return LinearSite(node="n", path=path, weight_index=0, bias_index=None, in_features=k,
                      out_features=n, input_rank=3, role=role, block=0, block_name="transformer_blocks.0")


@pytest.mark.parametrize("role", TOKEN_ROLES)
def test_token_gemms_are_quantized(role):
    assert decide(site(role=role), parse_options({})).quantize


@pytest.mark.parametrize("role", KEPT_ROLES)
def test_conditioning_embedding_and_final_layers_are_kept_with_a_reason(role):
    d = decide(site(role=role), parse_options({}))
    assert not d.quantize and "kept in 16 bit" in d.reason


def test_w16a16_quantizes_nothing():
    d = decide(site(), parse_options({"bits": "w16a16"}))
    assert not d.quantize and "w16a16" in d.reason


def test_skip_patterns():
    d = decide(site(), parse_options({"skip": ["*.attn1.*"]}))
    assert not d.quantize and "'*.attn1.*'" in d.reason
    assert decide(site(), parse_options({"skip": ["*.attn2.*"]})).quantize


def test_cross_kv_switch():
    opts = parse_options({"quantize_cross_kv": False})
    assert not decide(site(role="cross_k"), opts).quantize
    assert decide(site(role="cross_q"), opts).quantize


def test_widths_the_format_cannot_hold_are_kept():
    assert "odd" in decide(site(k=33), parse_options({})).reason
    assert decide(site(k=33), parse_options({"bits": "w8a8"})).quantize
    d = decide(site(k=96), parse_options({"weight_group": 64}))
    assert not d.quantize and "weight_group 64 does not divide the input width 96" in d.reason


def test_empty_weights_are_kept():
    # NucleusMoE-Image builds a linear with no input features; quantizing it divided by zero.
    for k, n in ((0, 32), (64, 0)):
        d = decide(site(k=k, n=n), parse_options({"bits": "w8a8"}))
        assert not d.quantize and "nothing to quantize" in d.reason
