"""Tests for bench/adatsq.py (AdaTSQ's quality against average bits, and its Pareto front)."""

import json

import pytest

from tests.bench.bench_scripts import import_bench
from tests.bench.test_quality import tiny_digits_dit


@pytest.fixture(scope="module")
def bench():
    (module,) = import_bench("adatsq")
    return module


def test_tiny_run_writes_the_documented_outputs(bench, tmp_path):
    folder = tmp_path / "tiny-dit"
    tiny_digits_dit().save_pretrained(folder)
    out = tmp_path / "results"
    status = bench.main(["--model", str(folder), "--base", "rtn", "--budgets", "5", "--outlier-scale", "0",
                         "--samples-per-class", "1", "--steps", "4", "--calib-samples", "2", "--calib-steps", "0",
                         "--out", str(out)])
    assert status == 0
    rows = json.loads((out / "adatsq.json").read_text())
    assert [(r["recipe"], r["bits"]) for r in rows] == [
        ("fp", "fp32"), ("clq", "4"), ("clq", "6"), ("clq", "8"), ("rtn", "4"), ("rtn", "6"), ("rtn", "8"),
        ("adatsq", "5"), ("adatsq (1 timestep bucket)", "6"), ("rtn (4 timestep buckets)", "6")]
    assert all(r.get("error") is None and r["psnr"] is not None for r in rows)
    adatsq = rows[7]
    assert adatsq["search"]["chosen"]["avg_bits"] <= 5 + 1e-9
    assert sum(adatsq["search"]["modes_chosen"].values()) == adatsq["search"]["units"]
    assert len(adatsq["search"]["timestep_edges"]) == 3  # four buckets: the 4 recorded timesteps
    assert rows[8]["search"]["timestep_edges"] == []
    assert rows[9]["search"] is None and rows[9]["mode"] == "w4a8"
    assert all(r["weight_bytes"] > 0 for r in rows[1:])
    front = json.loads((out / "pareto.json").read_text())["tiny-dit"]
    assert {"pareto", "uniform", "measured_all", "objective"} <= set(front)
    assert (out / "pareto.png").stat().st_size > 0
    assert [json.loads(line) for line in (out / bench.JOURNAL).read_text().splitlines()] == rows
    run = json.loads((out / "adatsq-machine.json").read_text())
    assert {"machine", "command", "date", "wall_seconds"} <= set(run)


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "3.5"], "--budgets must lie from 4 to 8"),
    (["--budgets", "five"], "comma-separated numbers"),
])
def test_bad_budgets_are_clear_errors(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_missing_model_is_a_clear_error(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err
