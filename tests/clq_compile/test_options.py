"""Options: validated before any work, with errors that name the key, the value and the choices."""

import pytest
import torch

import clq_compile
from clq_compile import choices
from clq_compile.kernels.formats import MODES
from clq_compile.options import Options, parse_options


def _names(pair):
    return tuple(f.name if f is not None else None for f in pair)


def test_defaults():
    opts = parse_options(None)
    assert opts == Options() and _names((opts.w_format, opts.a_format)) == ("int4", "int4") and opts.quantizes


@pytest.mark.parametrize("bits, w, a", [
    ("w4a4", "int4", "int4"), ("w4a8", "int4", "int8"), ("w8a8", "int8", "int8"), ("fp8", "e4m3", "e4m3"),
    ("w3a16", "int3", "none"), ("w4a16", "int4", "none"), ("w8a16", "int8", "none"), ("w16a16", None, None)])
def test_bits_name_a_pair_of_number_formats(bits, w, a):
    opts = parse_options({"bits": bits})
    assert (*_names((opts.w_format, opts.a_format)), opts.quantizes) == (w, a, bits != "w16a16")


def test_the_command_lines_bits_are_the_format_modes():
    assert choices.BITS == tuple(MODES)


@pytest.mark.parametrize("options, message", [
    ({"bits": "fp8", "weight_symmetric": False}, r"weight_symmetric.*e4m3.*no zero point"),
    ({"bits": "fp8", "weight_group": 32}, r"weight_group.*rowwise"),
    ({"bits": "fp8", "act_group": 32}, r"act_group.*rowwise"),
    ({"bits": "w4a16", "act_group": 32}, r"act_group.*unquantized"),
])
def test_options_a_number_format_cannot_honour_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


@pytest.mark.parametrize("options, message", [
    ({"bits": "w3a4"}, r"options\['bits'\] must be one of 'w4a4', 'w4a8', 'w8a8', 'fp8', 'w3a16', 'w4a16', "
                       r"'w8a16', 'w16a16'; got 'w3a4'"),
    ({"recipe": "magic"}, r"options\['recipe'\] must be one of .*'rtn'.*; got 'magic'"),
    ({"weight_group": 48}, r"options\['weight_group'\] must be one of None, 32, 64, 128; got 48"),
    ({"weight_group": 32.0}, r"options\['weight_group'\].*got 32.0"),
    ({"act_group": True}, r"options\['act_group'\].*got True"),
    ({"kernels": "cuda"}, r"options\['kernels'\] must be one of 'auto', 'reference', 'triton'"),
    ({"weight_symmetric": "yes"}, r"options\['weight_symmetric'\] must be True or False; got 'yes'"),
    ({"skip": [1, 2]}, r"options\['skip'\] must be a list of fnmatch patterns"),
    ({"bitz": "w4a4"}, r"unknown option\(s\) 'bitz'; the options are .*bits"),
    ({"obs_swap": "snake"}, r"options\['obs_swap'\] must be one of 'spread', 'group'; got 'snake'"),
    ({"cbc_prefix": "last"}, r"options\['cbc_prefix'\] must be one of 'all', 'previous'; got 'last'"),
    ({"clps_target": "variance"}, r"options\['clps_target'\] must be one of 'peak-error', 'max-variance'"),
    ({"clps_norm": "L1"}, r"options\['clps_norm'\] must be one of 'l2', 'l1'; got 'L1'"),
    ({"clps_window": 4}, r"options\['clps_window'\] must be one of 0, 1, 2, 3; got 4"),
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
