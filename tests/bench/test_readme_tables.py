"""Tests for bench/readme_tables.py: the README's result tables are the benchmark JSON's."""

import json

import pytest

from tests.bench.bench_scripts import import_bench


@pytest.fixture(scope="module")
def tables():
    (module,) = import_bench("readme_tables")
    return module


def test_readme_tables_agree_with_the_json(tables):
    text = tables.README.read_text()
    specs = [m["spec"] for m in tables.BLOCK.finditer(text)]
    assert any(s.startswith("quality ") for s in specs) and any(s.startswith("recipes ") for s in specs), specs
    _, changed = tables.updated(text)
    assert changed == [], f"README tables differ from their JSON: {changed}; run python bench/readme_tables.py"


def _quality_rows(psnr: float) -> list[dict]:
    row = {"model": "m", "bits": "w4a4", "ssim": 0.9, "accuracy": 0.95, "quantize_seconds": 1.0}
    return [{**row, "recipe": "fp", "psnr": 100.0, "ssim": 1.0}, {**row, "recipe": "rtn", "psnr": psnr},
            {**row, "recipe": "clq", "psnr": 30.0, "accuracy": None}]


def test_a_changed_number_is_found_and_rewritten(tables, tmp_path):
    results = tmp_path / "quality.json"
    results.write_text(json.dumps(_quality_rows(25.04)))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- table: quality {results} -->\nold\n<!-- end of table -->\nafter\n")
    assert tables.main(["--readme", str(readme), "--check"]) == 1
    assert tables.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == (f"intro\n<!-- table: quality {results} -->\n| recipe | m w4a4 |\n|---|---|\n"
                                  "| `rtn` | 25.0 / 0.900 / 0.95 |\n| `clq` | 30.0 / 0.900 / – |\n"
                                  "<!-- end of table -->\nafter\n")
    assert tables.main(["--readme", str(readme), "--check"]) == 0
    results.write_text(json.dumps(_quality_rows(26.0)))
    assert tables.main(["--readme", str(readme), "--check"]) == 1


def test_a_quality_table_can_show_some_bits_in_a_given_order(tables, tmp_path):
    rows = _quality_rows(25.04)
    rows += [{**r, "bits": b, "psnr": p} for r in rows if r["recipe"] != "fp" for b, p in (("fp8", 40.0), ("w8a8", 35.0))]
    results = tmp_path / "quality.json"
    results.write_text(json.dumps(rows))
    lines = tables.render(f"quality {results} fp8,w4a4").splitlines()
    assert lines[0] == "| recipe | m fp8 | w4a4 |"
    assert lines[2] == "| `rtn` | 40.0 / 0.900 / 0.95 | 25.0 / 0.900 / 0.95 |"


def test_recipes_tables_take_each_recipe_from_the_first_file_holding_it(tables, tmp_path):
    def rows(recipe, errors):
        return [{"model": f, "recipe": recipe, "bits": "w4a4", "error": sum(errors) / len(errors),
                 "errors": errors, "quantize_seconds": 2.0} for f in ("dit", "sd3")]

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"rows": rows("clq", [0.1, 0.3])}))
    second.write_text(json.dumps({"rows": rows("clq", [0.9, 0.9]) + rows("rtn", [0.5, 0.7])}))
    text = tables.render(f"recipes w4a4 {first} {second}")
    assert text.splitlines() == ["Mean over 2 seeds (min–max in brackets):", "",
                                 "| recipe | dit | sd3 | quantize s (mean) |", "|---|---|---|---|",
                                 "| clq | 0.2000 (0.100–0.300) | 0.2000 (0.100–0.300) | 2.0 |",
                                 "| rtn | 0.6000 (0.500–0.700) | 0.6000 (0.500–0.700) | 2.0 |"]


def test_an_unknown_marker_is_a_clear_error(tables):
    with pytest.raises(ValueError, match=r"expected 'quality FILE \[BITS,...\]', 'recipes BITS FILE...' or "
                                         r"'variants digits\|stress FILE'"):
        tables.render("speed bench/results/kernels.json")


def test_variants_tables_compare_each_variant_with_the_base_on_the_seeds_both_measured(tables, tmp_path):
    """A variant measured on seed 0 only is set against the base's seed-0 value, not its mean."""
    def row(variant, seed, psnr=None, error=None):
        return {"model": "m", "variant": variant, "recipe": "clq", "bits": "w4a4", "seed": seed,
                **({"psnr": psnr} if psnr is not None else {"error": error})}

    base = "earlier defaults"
    digits = [row(base, 0, 30.0), row(base, 1, 20.0), row("x", 0, 31.0), row("y", 0, 29.0), row("y", 1, 21.0)]
    stress = [row(base, 0, error=0.2), row(base, 1, error=0.4), row("x", 0, error=0.1), row("x", 1, error=0.5)]
    results = tmp_path / "variants.json"
    results.write_text(json.dumps({"rows": {"digits": digits, "stress": stress}}))
    lines = tables.render(f"variants digits {results}").splitlines()
    assert lines[-3:] == ["| earlier defaults | 25.00 |", "| x | 31.00 (1/1 vs 30.00) |", "| y | 25.00 (1/2 vs 25.00) |"]
    lines = tables.render(f"variants stress {results}").splitlines()
    assert lines[-2:] == ["| earlier defaults | 0.3000 |", "| x | 0.3000 (1/2 vs 0.3000) |"]


def test_every_markdown_file_cited_is_in_the_repository():
    # The project explains itself from its own files: a design note cited but not shipped is a dead end.
    import re
    import subprocess

    from tests.bench.bench_scripts import BENCH

    root = BENCH.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    names = {f.rsplit("/", 1)[-1] for f in files}
    cited = re.compile(r"\b([A-Za-z0-9_.-]+\.md)\b")
    missing = sorted({(f, m) for f in files if f.endswith((".py", ".md", ".sh", ".toml", ".txt"))
                      for m in cited.findall((root / f).read_text(errors="replace")) if m not in names})
    assert missing == []
