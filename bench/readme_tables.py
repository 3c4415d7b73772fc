"""Write the README's result tables from the benchmark results, so the README cannot go stale.

    python bench/readme_tables.py            # rewrite every table between its markers in README.md
    python bench/readme_tables.py --check    # exit 1, naming the tables, when README.md differs

A table in the README sits between two comment lines that name its source, for example

    <!-- table: quality bench/results/quality/quality.json -->
    ...
    <!-- end of table -->

and everything between them is what this script writes from that file. Kinds of table:

- ``quality FILE [BITS,BITS...]``: rows of ``bench/quality.py``'s quality.json; a line per recipe, a
  column per model variant x bits (only the listed bits when given, in their order), each cell
  PSNR (dB) / SSIM / class accuracy against full precision.
- ``recipes BITS``: rows of one or more ``bench/recipes.py`` recipes.json files (separated by
  spaces; a recipe found in an earlier file is taken from there), the table of ``recipes_table``
  at BITS, with the number of seeds above it.
- ``variants PART FILE``: the digits or stress table of a ``bench/clq_variants.py`` variants.json.

tests/bench/test_readme_tables.py fails when the README and the JSON disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

# bench/ is a folder of scripts, not a package: run as a script, Python puts this folder on
# sys.path; importers put it there themselves, and only while importing.
from clq_variants import digits_table, stress_table
from quality import quality_cell
from recipes import recipes_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^<!-- table: (?P<spec>[^>]*?) -->\n(?P<body>.*?)^<!-- end of table -->$",
                   re.MULTILINE | re.DOTALL)


def _load(relative: str) -> Any:
    return json.loads((ROOT / relative).read_text())


def quality_table(rows: list[dict[str, Any]], bits: list[str] | None = None) -> list[str]:
    """A line per recipe, a column per model variant x bits (those in `bits`, in its order, when
    given): "PSNR / SSIM / accuracy"."""
    columns = list(dict.fromkeys((r["model"], r["bits"]) for r in rows if r["recipe"] != "fp"))
    if bits is not None:
        present = set(columns)
        columns = [(m, b) for m in dict.fromkeys(m for m, _ in columns) for b in bits if (m, b) in present]
    recipes = list(dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "fp"))
    cells = {(r["model"], r["bits"], r["recipe"]): r for r in rows}
    header, seen = [], set()
    for model, bits in columns:
        header.append(bits if model in seen else f"{model} {bits}")
        seen.add(model)

    lines = ["| recipe | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| `{recipe}` | " + " | ".join(quality_cell(cells.get((m, b, recipe)), psnr=".1f") for m, b in columns) + " |"
              for recipe in recipes]
    return lines


def recipes_block(bits: str, sources: list[str]) -> list[str]:
    """The recipes table at `bits` from the rows of `sources` (the first file holding a recipe wins)."""
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    for source in sources:
        found = [r for r in _load(source)["rows"] if r["bits"] == bits and r["recipe"] not in taken]
        taken |= {r["recipe"] for r in found}
        rows += found
    seeds = sorted({len(r["errors"]) for r in rows})
    return [f"Mean over {' or '.join(map(str, seeds))} seeds (min–max in brackets):", "",
            *recipes_table(rows, bits)]


def render(spec: str) -> str:
    """The text between the markers of the table `spec` ("quality FILE" or "recipes BITS FILE...")."""
    kind, *words = spec.split()
    if kind == "quality" and len(words) in (1, 2):
        lines = quality_table(_load(words[0]), words[1].split(",") if len(words) == 2 else None)
    elif kind == "recipes" and len(words) >= 2:
        lines = recipes_block(words[0], words[1:])
    elif kind == "variants" and len(words) == 2 and words[0] in ("digits", "stress"):
        rows = _load(words[1])["rows"][words[0]]
        lines = (digits_table if words[0] == "digits" else stress_table)(rows)
    else:
        raise ValueError(f"README table marker {spec!r}: expected 'quality FILE [BITS,...]', "
                         f"'recipes BITS FILE...' or 'variants digits|stress FILE'")
    return "\n".join(lines) + "\n"


def updated(text: str) -> tuple[str, list[str]]:
    """`text` with every table between markers rewritten, and the specs of the tables that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        body = render(match["spec"])
        if body != match["body"]:
            changed.append(match["spec"])
        return f"<!-- table: {match['spec']} -->\n{body}<!-- end of table -->"

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    parser.add_argument("--readme", type=Path, default=README, help="the file to update (default README.md)")
    args = parser.parse_args(argv)
    text, changed = updated(args.readme.read_text())
    if args.check:
        for spec in changed:
            print(f"{args.readme}: the table '{spec}' differs from its JSON; run python bench/readme_tables.py",
                  file=sys.stderr)
        return 1 if changed else 0
    args.readme.write_text(text)
    print(f"{args.readme}: {len(changed)} table(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
