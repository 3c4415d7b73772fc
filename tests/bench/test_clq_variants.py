"""Tests for bench/clq_variants.py (CLQ's own choices) and bench/lowrank_memory.py (the branch's bytes)."""

import json

import pytest

from tests.bench.bench_scripts import import_bench


@pytest.fixture(scope="module")
def scripts():
    return import_bench("clq_variants", "lowrank_memory")


def test_each_variant_changes_one_earlier_choice_and_paper_changes_all(scripts):
    variants, _ = scripts
    base = variants.VARIANTS[variants.BASE]
    for name, options in variants.VARIANTS.items():
        changed = {k for k in base if options[k] != base[k]}
        if name == variants.BASE:
            assert not changed
        elif name == "paper":
            assert changed == set(base)
        else:
            assert changed == {name.split("=")[0]} and str(options[name.split("=")[0]]) == name.split("=")[1]


def test_a_stress_run_journals_each_cell_and_refuses_to_run_over_itself(scripts, tmp_path, capsys):
    variants, _ = scripts
    argv = ["--part", "stress", "--variants", f"{variants.BASE},clps_norm=l1", "--seeds", "1", "--out", str(tmp_path)]
    assert variants.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "stress.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and {r["variant"] for r in rows} == {variants.BASE, "clps_norm=l1"}
    assert all(r["error"] > 0 and r["blocks"] == 2 for r in rows)
    text = (tmp_path / "variants.md").read_text()
    assert "| clps_norm=l1 |" in text and ("(0/1 vs" in text or "(1/1 vs" in text)
    with pytest.raises(SystemExit):
        variants.main(argv)
    assert "exists" in capsys.readouterr().err


def test_the_branch_bytes_of_a_pixart_block_by_arithmetic(scripts):
    _, memory = scripts
    square = next(r for r in memory.pixart_rows(32) if r["out"] == r["in"] == 1152)
    # int4 codes 1152 x 576 bytes and 1152 float32 scales, against 32 x (1152 + 1152) bf16 numbers.
    assert square["branch_over_int4"] == round(32 * 2304 * 2 / (1152 * 576 + 4 * 1152), 3) == 0.221
