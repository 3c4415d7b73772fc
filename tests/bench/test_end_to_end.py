"""Tests for bench/end_to_end.py: its dry run walks the lease's plan on a tiny PixArt on the CPU."""

import json

from tests.bench.bench_scripts import import_bench


def test_dry_run_walks_every_row(tmp_path):
    (end_to_end,) = import_bench("end_to_end")
    # Inductor's CPU compile alone takes minutes here; the row is the same code as the others.
    assert end_to_end.main(["--dry-run", "--blocks", "1", "--skip", "bf16_inductor", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "end_to_end.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "plan" and rows[0]["config"]["num_layers"] == 1 and kinds[-1] == "summary"
    forwards = {r["variant"]: r for r in rows if r["kind"] == "row"}
    assert set(forwards) == {"bf16_eager", "clq_w8a8", "clq_w4a4"}
    assert all(r["ms"] > 0 for r in forwards.values())
    assert forwards["clq_w4a4"]["quantized_layer_bytes"] < forwards["clq_w8a8"]["quantized_layer_bytes"]
    profile = next(r for r in rows if r["kind"] == "profile")
    assert abs(sum(profile["fraction"].values()) - 1) < 1e-6 and profile["ms"]["gemm"] > 0
    calibrations = [(r["recipe"], r["offload"]) for r in rows if r["kind"] == "calibration"]
    assert calibrations == [("clq", False), ("clq", True), ("rtn", False), ("rtn", True)]
    assert rows[-1]["failed"] == 0


def test_the_sigma_config_has_the_published_sizes():
    (end_to_end,) = import_bench("end_to_end")
    c = end_to_end.SIGMA
    assert (c["num_layers"], c["num_attention_heads"] * c["attention_head_dim"], c["caption_channels"]) == (28, 1152, 4096)
    assert (c["sample_size"] // c["patch_size"]) ** 2 == 4096 and end_to_end.TEXT_TOKENS == 300
