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
    assert decide(site(role=role), parse_options({}).policy()).quantize


@pytest.mark.parametrize("role", KEPT_ROLES)
def test_conditioning_embedding_and_final_layers_are_kept_with_a_reason(role):
    d = decide(site(role=role), parse_options({}).policy())
    assert not d.quantize and "kept in 16 bit" in d.reason


def test_w16a16_quantizes_nothing():
    d = decide(site(), parse_options({"bits": "w16a16"}).policy())
    assert not d.quantize and "w16a16" in d.reason


def test_skip_patterns():
    d = decide(site(), parse_options({"skip": ["*.attn1.*"]}).policy())
    assert not d.quantize and "'*.attn1.*'" in d.reason
    assert decide(site(), parse_options({"skip": ["*.attn2.*"]}).policy()).quantize


def test_cross_kv_switch():
    opts = parse_options({"quantize_cross_kv": False})
    assert not decide(site(role="cross_k"), opts.policy()).quantize
    assert decide(site(role="cross_q"), opts.policy()).quantize


def test_widths_the_format_cannot_hold_are_kept():
    assert "odd" in decide(site(k=33), parse_options({}).policy()).reason
    assert decide(site(k=33), parse_options({"bits": "w8a8"}).policy()).quantize
    d = decide(site(k=96), parse_options({"weight_group": 64}).policy())
    assert not d.quantize and "weight_group 64 does not divide the input width 96" in d.reason


def test_empty_weights_are_kept():
    # NucleusMoE-Image builds a linear with no input features; quantizing it divided by zero.
    for k, n in ((0, 32), (64, 0)):
        d = decide(site(k=k, n=n), parse_options({"bits": "w8a8"}).policy())
        assert not d.quantize and "nothing to quantize" in d.reason


@pytest.mark.parametrize("role", ["conditioning", "adaln", "adaln_token"])
def test_conditioning_bits_quantize_conditioning_and_modulation_weight_only(role):
    policy = parse_options({"bits": "w4a4", "conditioning_bits": "w4a16"}).policy()
    d = decide(site(role=role), policy)
    assert d.quantize and d.reason.endswith("weight-only w4a16 (conditioning_bits)")
    quantizer = policy.layer_quantizer(role)
    assert (quantizer.weight.format.name, quantizer.activation.format.name) == ("int4", "none")
    assert policy.layer_quantizer("attn_q").activation.format.name == "int4"
    for kept in ("embed", "final"):
        assert not decide(site(role=kept), policy).quantize
