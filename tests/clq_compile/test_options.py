"""Options: validated before any work, with errors that name the key, the value and the choices."""

import pytest
import torch

import clq_compile
from clq_compile.options import Options, parse_options


def test_defaults():
    opts = parse_options(None)
    assert opts == Options() and opts.w_bits == 4 and opts.a_bits == 4 and opts.quantizes


@pytest.mark.parametrize("bits, w, a", [("w4a4", 4, 4), ("w4a8", 4, 8), ("w8a8", 8, 8), ("w16a16", 16, 16)])
def test_bits(bits, w, a):
    opts = parse_options({"bits": bits})
    assert (opts.w_bits, opts.a_bits, opts.quantizes) == (w, a, bits != "w16a16")


@pytest.mark.parametrize("options, message", [
    ({"bits": "w3a4"}, r"options\['bits'\] must be one of 'w4a4', 'w4a8', 'w8a8', 'w16a16'; got 'w3a4'"),
    ({"recipe": "magic"}, r"options\['recipe'\] must be one of .*'rtn'.*; got 'magic'"),
    ({"weight_group": 48}, r"options\['weight_group'\] must be one of None, 32, 64, 128; got 48"),
    ({"weight_group": 32.0}, r"options\['weight_group'\].*got 32.0"),
    ({"act_group": True}, r"options\['act_group'\].*got True"),
    ({"kernels": "cuda"}, r"options\['kernels'\] must be one of 'auto', 'reference', 'triton'"),
    ({"weight_symmetric": "yes"}, r"options\['weight_symmetric'\] must be True or False; got 'yes'"),
    ({"skip": [1, 2]}, r"options\['skip'\] must be a list of fnmatch patterns"),
    ({"bitz": "w4a4"}, r"unknown option\(s\) 'bitz'; the options are .*bits"),
])
def test_bad_options_are_refused_with_the_key_and_value(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


def test_non_dict_options():
    with pytest.raises(TypeError, match="options must be a dict"):
        parse_options(["w4a4"])


def test_skip_accepts_one_pattern_or_a_list():
    assert parse_options({"skip": "*.attn2.*"}).skip == ("*.attn2.*",)
    assert parse_options({"skip": ["a.*", "b"]}).skip == ("a.*", "b")


def test_bad_options_fail_before_tracing_in_calibrating():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    qt = torch.compile(model, backend="clq", options={"bits": "w2a2"})
    with pytest.raises(ValueError, match=r"options\['bits'\]"):
        with clq_compile.calibrating(qt):
            pytest.fail("the block must not run with bad options")


def test_bad_options_fail_at_the_first_call():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    qt = torch.compile(model, backend="clq", options={"weight_group": 7})
    with pytest.raises(Exception, match=r"options\['weight_group'\] must be one of") as info:
        qt(torch.randn(1, 4, 8))
    # Dynamo wraps backend errors; the ValueError is kept inside.
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


def test_default_recipe_is_clq_and_every_recipe_is_accepted():
    from clq_compile.passes.recipes import RECIPES

    assert parse_options({}).recipe == "clq"
    for name in RECIPES:
        assert parse_options({"recipe": name}).recipe == name
