"""Tests for clq_compile/cli.py: `clq quantize`, `clq explain`, `clq eval`, run in-process through main()."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from clq_compile import choices, metrics, tiny_models, workloads
from clq_compile.artifact import read_manifest
from clq_compile.cli import TABLE_COLUMNS, build_parser, main
from clq_compile.passes.recipes import RECIPES

# Small enough for a few seconds per command on a 2-core CPU.
FAST = ["--calib-samples", "2", "--steps", "2", "--calib-steps", "2"]


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-dit"
    tiny_models.build("dit", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rtn_artifact(tiny_dit, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny-w8a8.safetensors"
    assert main(["quantize", "--model", str(tiny_dit), "--out", str(out), "--recipe", "rtn",
                 "--bits", "w8a8", *FAST]) == 0
    return out


def test_conditioning_bits_quantize_the_conditioning_layers_weight_only(capsys, tiny_dit, tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert main(["quantize", "--model", str(tiny_dit), "--out", str(out), "--recipe", "rtn", "--bits", "w8a8",
                 "--conditioning-bits", "w8a16", *FAST]) == 0
    status, text, _ = run(capsys, "explain", str(out))
    assert status == 0
    rows = [line for line in text.splitlines() if "timestep_embedder.linear_1" in line]
    assert rows and all(" w8a16 " in row and "a:16 bit" in row for row in rows)


def test_lowrank_rank_reaches_the_recipe_and_is_refused_without_a_branch(capsys, tiny_dit, tmp_path):
    out = tmp_path / "svd.safetensors"
    assert main(["quantize", "--model", str(tiny_dit), "--out", str(out), "--recipe", "svdquant",
                 "--lowrank-rank", "4", *FAST]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest["options"]["lowrank_rank"] == 4
    assert all("+lowrank r4" in layer["method"] for layer in manifest["layers"].values())
    status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "b.safetensors"),
                         "--recipe", "clq", "--lowrank-rank", "4")
    assert status == 2 and not (tmp_path / "b.safetensors").exists()
    assert "--lowrank-rank 4: recipe clq has no low-rank branch" in error_line(err)


def test_further_options_reach_the_backend_and_bad_ones_stop_before_any_work(capsys, tiny_dit, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "lrq.safetensors"
    assert main(["quantize", "--model", str(tiny_dit), "--out", str(out), "--recipe", "lrq-dit",
                 "--options", '{"ars_threshold": 1e-6, "lrq_weights": "uniform"}', *FAST]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest["options"]["ars_threshold"] == 1e-6 and manifest["options"]["lrq_weights"] == "uniform"
    assert all(layer["method"] == "lrq-dit: int4 rtn + outlier-aware" for layer in manifest["layers"].values())

    def refuse(path):
        raise AssertionError(f"the command loaded {path} before checking --options")

    monkeypatch.setattr(workloads, "load_model", refuse)
    for options, message in (('{"ars_threshold": 2}', "ars_threshold'] is for recipes lrq-dit, lrq-dit+lowrank; recipe 'clq'"),
                             ("[1]", "must be a JSON object"), ("{bad", "not JSON"),
                             ('{"recipe": "rtn"}', "'recipe' has its own flag, --recipe"),
                             ('{"load": "x"}', "'load' is not for quantize"),
                             ('{"clps_window": 9}', "clps_window'] must be one of")):
        status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "b.safetensors"),
                             "--options", options)
        assert status == 2 and message in error_line(err), err
    # A recipe that cannot run at --bits is refused the same way, with or without --options.
    status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "b.safetensors"),
                         "--recipe", "lrq-dit", "--bits", "fp8")
    assert status == 2 and "recipe 'lrq-dit' multiplies twin-log weights with integer activations" in error_line(err)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(err: str, one_line: bool = True) -> str:
    """stderr, which must be one line starting with "clq SUBCOMMAND: error:" (or "clq: error:").

    one_line=False: an error that goes on to list what it found, one item per line.
    """
    assert "Traceback" not in err and "usage:" not in err, err
    assert err.endswith("\n") and (err.count("\n") == 1 or not one_line), err
    assert err.startswith(("clq: error: ", "clq quantize: error: ", "clq explain: error: ", "clq eval: error: ")), err
    return err.strip()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: for errors that must come before any work."""
    def refuse(path):
        raise AssertionError(f"the command loaded {path} before checking its arguments")

    monkeypatch.setattr(workloads, "load_model", refuse)


# ---------------------------------------------------------------------------------------------
# Help


def test_program_help_names_every_subcommand_once_with_an_example():
    done = subprocess.run([sys.executable, "-m", "clq_compile", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m clq_compile")
    for subcommand in ("quantize", "explain", "eval"):
        assert f"python -m clq_compile {subcommand} " in done.stdout  # each one in the example
        listed = [line for line in done.stdout.splitlines() if line.strip().startswith(subcommand + " ")]
        assert len(listed) == 1, done.stdout  # described once, in argparse's list
    assert "bench/assets/digits-dit" in done.stdout


def _seconds(*argv: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    return time.perf_counter() - start, done


def test_help_and_typos_answer_without_importing_torch():
    probe = ("import sys\n"
             "from clq_compile.cli import main\n"
             "for argv in (['--help'], ['quantize', '--help'], ['quantise'], ['quantize', '--bits', 'w3a4'],\n"
             "             ['quantize', '--model', 'no-such-folder', '--out', 'x.safetensors'],\n"
             "             ['eval', '--model', 'no-such-folder', '--artifact', 'x.safetensors']):\n"
             "    main(argv)\n"
             "heavy = sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules))\n"
             "print('imported:', heavy)\n")
    _, done = _seconds("-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("imported: []"), done.stdout
    # The time itself, against a generous bound: the bare interpreter's start plus one second
    # (importing torch alone takes several seconds, more on a loaded machine).
    bare, _ = _seconds("-c", "pass")
    helped, done = _seconds("-m", "clq_compile", "--help")
    assert done.returncode == 0
    assert helped < bare + 1.0, f"--help took {helped:.2f} s, the bare interpreter {bare:.2f} s"


def test_the_parser_reads_the_registries_names():
    assert choices.RECIPE_NAMES == tuple(RECIPES)
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--bits", "W4A4",
                                      "--recipe", "CLQ+GPTQ", "--kernels", "Reference"])
    assert (args.bits, args.recipe, args.kernels) == ("w4a4", "clq+gptq", "reference")


@pytest.mark.parametrize("subcommand", ["quantize", "explain", "eval"])
def test_subcommand_help_shows_an_example_on_the_bundled_model(capsys, subcommand):
    status, out, _ = run(capsys, subcommand, "--help")
    assert status == 0
    assert f"example:\n  clq {subcommand} " in out
    assert "digits-w4a4.safetensors" in out
    if subcommand != "explain":
        assert "--model FOLDER" in out and "bench/assets/digits-dit" in out


# ---------------------------------------------------------------------------------------------
# quantize and explain


def test_quantize_writes_an_artifact_that_explain_prints(capsys, rtn_artifact):
    manifest = read_manifest(rtn_artifact)
    assert manifest["recipe"] == "rtn" and manifest["options"]["bits"] == "w8a8"
    status, out, _ = run(capsys, "explain", str(rtn_artifact))
    assert status == 0
    for path in manifest["layers"]:
        assert path in out
    assert "transformer_blocks.0.attn1.to_q" in manifest["layers"]
    assert "kept: adaLN" in out  # a layer kept in full precision, with its reason


def test_quantize_prints_a_summary_and_the_table(capsys, tiny_dit, tmp_path):
    out_dir = tmp_path / "tiny-clq"  # no .safetensors suffix: written as a folder
    status, out, _ = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(out_dir),
                         "--recipe", "clq", "--bits", "w4a4", *FAST)
    assert status == 0
    layers = read_manifest(out_dir)["layers"]
    assert (out_dir / "manifest.json").is_file()
    words = " ".join(out.split())  # the summary is wrapped to the table's width
    assert f"quantized {len(layers)} linear layers" in words
    assert "with recipe 'clq' at w4a4" in words and f"wrote {out_dir}" in out
    assert "clq: bits=w4a4 recipe=clq state=quantized" in out  # the explain table follows
    assert "transformer_blocks.1.ff.net.2" in out
    assert max(len(line) for line in out.splitlines()) <= TABLE_COLUMNS
    assert "CLPS target" in out  # cut to the width by wrapping, not dropped
    status, wide, _ = run(capsys, "explain", "--wide", str(out_dir))
    assert status == 0 and max(len(line) for line in wide.splitlines()) > TABLE_COLUMNS


def test_explain_lists_the_layers_in_model_order_as_quantize_does(capsys, rtn_artifact, tiny_dit, tmp_path):
    status, from_file, _ = run(capsys, "explain", str(rtn_artifact))
    assert status == 0
    status, from_model, _ = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "a.safetensors"),
                                "--recipe", "rtn", "--bits", "w8a8", *FAST)
    assert status == 0

    def paths(text):
        return [line.split()[0] for line in text.splitlines() if line.startswith(("transformer_blocks", "proj_", "pos_"))]

    assert paths(from_file) == paths(from_model)
    blocks = [int(p.split(".")[1]) for p in paths(from_file) if p.startswith("transformer_blocks")]
    assert blocks == sorted(blocks) and paths(from_file)[-1].startswith("proj_out")


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_prints_psnr_and_writes_json(capsys, tiny_dit, rtn_artifact, tmp_path):
    report = tmp_path / "eval.json"
    status, out, _ = run(capsys, "eval", "--model", str(tiny_dit), "--artifact", str(rtn_artifact),
                         "--samples", "2", "--steps", "2", "--json", str(report))
    assert status == 0
    assert "PSNR (dB)" in out and "quantized" in out
    result = json.loads(report.read_text())
    assert result["recipe"] == "rtn" and result["bits"] == "w8a8" and result["samples"] == 2
    assert 0 < result["psnr"] < metrics.PSNR_CAP_DB and math.isfinite(result["psnr"])
    assert f"{result['psnr']:.2f}" in out
    assert 0 < result["ssim"] < 1
    assert result["accuracy"] is None and result["fp_accuracy"] is None  # no classifier for this model


def test_digits_model_round_trip_reports_class_accuracy(capsys, tmp_path):
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    folder = tmp_path / "tiny-digits"
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                          num_layers=1, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                          norm_type="ada_norm_zero").eval().save_pretrained(folder)
    artifact = tmp_path / "digits.safetensors"
    assert main(["quantize", "--model", str(folder), "--out", str(artifact), "--recipe", "rtn", *FAST]) == 0
    report = tmp_path / "eval.json"
    status, out, _ = run(capsys, "eval", "--model", str(folder), "--artifact", str(artifact), "--samples", "1",
                         "--steps", "2", "--json", str(report))
    assert status == 0
    result = json.loads(report.read_text())
    assert result["samples"] == 10  # one of each digit
    assert "class-conditional DDIM" in result["task"]
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["fp_accuracy"] <= 1


# ---------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line naming the problem


def test_missing_model_folder(capsys, tmp_path):
    status, out, err = run(capsys, "quantize", "--model", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "a.safetensors"))
    assert status == 2 and out == ""
    assert error_line(err) == (f"clq quantize: error: --model {tmp_path / 'nowhere'}: no such folder; expected a "
                               f"diffusers transformer folder (config.json and the weights), e.g. bench/assets/digits-dit")
    assert not (tmp_path / "a.safetensors").exists()


def test_folder_without_config_or_with_an_unknown_class(capsys, rtn_artifact, tmp_path):
    (tmp_path / "empty").mkdir()
    status, _, err = run(capsys, "eval", "--model", str(tmp_path / "empty"), "--artifact", str(rtn_artifact))
    assert status == 2
    assert error_line(err).startswith(f"clq eval: error: --model {tmp_path / 'empty'}: no config.json in it")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "NoSuchTransformer"}))
    status, _, err = run(capsys, "quantize", "--model", str(tmp_path / "odd"), "--out", str(tmp_path / "a"))
    assert status == 2
    assert "config.json names 'NoSuchTransformer', which is not a diffusers model class" in error_line(err)


@pytest.mark.parametrize("flag, value", [("--bits", "w3a4"), ("--bits", "w16a16"), ("--recipe", "fastest"),
                                         ("--calib-samples", "0"), ("--conditioning-bits", "w4a4")])
def test_bad_option_values(capsys, tiny_dit, tmp_path, flag, value):
    status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "a"), flag, value)
    assert status == 2
    line = error_line(err)
    assert line.startswith("clq quantize: error: argument") and flag in line and value in line
    assert line.endswith("see `clq quantize --help`")


@pytest.mark.parametrize("subcommand, value", [("eval", "-1"), ("eval", str(2**32)), ("quantize", "-5")])
def test_seeds_outside_what_the_judge_takes_stop_before_any_work(capsys, tiny_dit, rtn_artifact, tmp_path,
                                                                 no_model_loading, subcommand, value):
    where = ["--artifact", str(rtn_artifact)] if subcommand == "eval" else ["--out", str(tmp_path / "a")]
    status, _, err = run(capsys, subcommand, "--model", str(tiny_dit), *where, "--seed", value)
    assert status == 2
    assert error_line(err).startswith(f"clq {subcommand}: error: argument --seed: must be from 0 to 4294967294; "
                                      f"got {value}")


@pytest.mark.parametrize("argv", [["quantise"], ["quantize"], ["eval", "--model", "m"], []])
def test_usage_errors_are_one_line(capsys, argv):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    error_line(err)


def test_missing_artifact(capsys, tiny_dit, tmp_path):
    missing = tmp_path / "missing.safetensors"
    status, _, err = run(capsys, "explain", str(missing))
    assert status == 2
    assert error_line(err).startswith(f"clq explain: error: {missing}: no such file or folder")
    status, _, err = run(capsys, "eval", "--model", str(tiny_dit), "--artifact", str(missing))
    assert status == 2
    assert error_line(err).startswith(f"clq eval: error: --artifact {missing}: no such file or folder")


def test_a_file_that_is_not_an_artifact(capsys, tmp_path):
    fake = tmp_path / "notes.safetensors"
    fake.write_bytes(b"not safetensors at all")
    status, _, err = run(capsys, "explain", str(fake))
    assert status == 2
    assert "is not a readable clq-compile artifact" in error_line(err)


def test_artifact_of_another_model(capsys, rtn_artifact, tmp_path):
    other = tmp_path / "other-dit"
    tiny_models.build("dit", seed=1).save_pretrained(other)
    status, out, err = run(capsys, "eval", "--model", str(other), "--artifact", str(rtn_artifact))
    assert status == 2 and out == ""
    message = error_line(err, one_line=False)
    assert message.startswith(f"clq eval: error: the artifact {rtn_artifact} was made from a different model")
    assert "transformer_blocks.0.attn1.to_q.weight" in message  # the differences are listed


def _output_path(tmp_path, kind: str):
    """An output path of the given kind, and what the error says about it."""
    if kind == "folder without an artifact":
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("not an artifact")
        return tmp_path / "busy", "that folder exists and holds no clq artifact"
    if kind == "file named as a folder":
        (tmp_path / "notes").write_text("a file")
        return tmp_path / "notes", "that is a file, and a name without .safetensors is written as a folder"
    if kind == "folder named as a file":
        (tmp_path / "a.safetensors").mkdir()
        return tmp_path / "a.safetensors", "that is a folder; give a file name"
    if kind == "the model's own weights":  # a careless copy of the model folder's weights file path
        weights = tmp_path / "diffusion_pytorch_model.safetensors"
        safetensors.torch.save_file({"w": torch.ones(2)}, str(weights))
        return weights, "that file exists and is not a clq artifact"
    return Path("/proc/clq-test.safetensors"), "cannot write in /proc"  # unwritable, even for root


def test_models_load_without_diffusers_warnings(capsys, tiny_dit, tmp_path, monkeypatch):
    """diffusers warns at every load that `accelerate` would load faster: not for the CLI's loads."""
    from diffusers.utils import logging as diffusers_logging

    levels = []
    load = workloads.load_model

    def recording(path):
        levels.append(diffusers_logging.get_verbosity())
        return load(path)

    monkeypatch.setattr(workloads, "load_model", recording)
    before = diffusers_logging.get_verbosity()
    assert main(["quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "a.safetensors"), "--recipe", "rtn",
                 "--bits", "w8a8", *FAST]) == 0
    assert levels == [diffusers_logging.ERROR]
    assert diffusers_logging.get_verbosity() == before  # and the user's setting comes back


@pytest.mark.parametrize("kind", ["folder without an artifact", "file named as a folder", "folder named as a file",
                                  "unwritable", "the model's own weights"])
def test_quantize_checks_out_before_any_work(capsys, tiny_dit, tmp_path, no_model_loading, kind):
    out, expected = _output_path(tmp_path, kind)
    before = out.read_bytes() if out.is_file() else None
    status, stdout, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(out), *FAST)
    assert status == 2 and stdout == ""
    line = error_line(err)
    assert line.startswith(f"clq quantize: error: --out {out}: ") and expected in line
    if kind == "folder without an artifact":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    if before is not None:
        assert out.read_bytes() == before


def test_quantize_may_replace_an_artifact_folder(capsys, tiny_dit, tmp_path):
    out = tmp_path / "artifact"
    for _ in range(2):
        status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(out), "--recipe", "rtn",
                             "--bits", "w8a8", *FAST)
        assert status == 0, err
    assert read_manifest(out)["recipe"] == "rtn"


@pytest.mark.parametrize("kind", ["folder named as a file", "unwritable"])
def test_eval_checks_json_before_any_work(capsys, tiny_dit, rtn_artifact, tmp_path, no_model_loading, kind):
    out, expected = _output_path(tmp_path, kind)
    status, stdout, err = run(capsys, "eval", "--model", str(tiny_dit), "--artifact", str(rtn_artifact),
                              "--json", str(out))
    assert status == 2 and stdout == ""
    line = error_line(err)
    assert line.startswith(f"clq eval: error: --json {out}: ") and expected in line


def test_output_folder_must_exist(capsys, tiny_dit, tmp_path):
    status, _, err = run(capsys, "quantize", "--model", str(tiny_dit), "--out", str(tmp_path / "no" / "a.safetensors"))
    assert status == 2
    assert error_line(err) == f"clq quantize: error: --out {tmp_path / 'no' / 'a.safetensors'}: the folder " \
                              f"{tmp_path / 'no'} does not exist"
