"""What every script of a GPU lease shares: the project import, the rows it streams, its clock.

A lease is one short call on a borrowed GPU (bench/README.md): whatever a script measured must
already be on disk when the call ends, however it ends. So every result is one JSON line,
appended and flushed to `<out>/<name>.jsonl` the moment it exists; `<out>` is `--out`, else
`$OUT` (the folder a lease returns), else `bench/results/lease`. A `Budget` stops a script before
the call's limit rather than at it, and the same plan can be walked without CUDA (`--dry-run`)
to count its compiles and estimate its minutes before any device time is spent.
"""

from __future__ import annotations

import datetime
import importlib.machinery
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]


def import_project() -> None:
    """Make `import clq_compile` work from this checkout, installed or not.

    The package maps `passes/` and `kernels/` to `clq_compile.passes` / `clq_compile.kernels`
    (pyproject's package-dir). An install provides that mapping (a regular one copies the folders
    into the package, an editable one adds an import finder); without one, even from the
    repository root, the folder clq_compile/ alone would be found. The mapping is then made here by
    giving the package the repository root as a second search location.
    """
    if _installed():
        return
    spec = importlib.util.spec_from_file_location(
        "clq_compile", ROOT / "clq_compile" / "__init__.py",
        submodule_search_locations=[str(ROOT / "clq_compile"), str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["clq_compile"] = module
    spec.loader.exec_module(module)


def _installed() -> bool:
    """Whether `clq_compile.kernels` resolves, without importing anything."""
    spec = importlib.util.find_spec("clq_compile")
    if spec is None:
        return False
    if spec.origin and (Path(spec.origin).parent / "kernels").is_dir():
        return True
    # The path finder would take a top-level kernels/ for the subpackage: ask the others.
    finders = [f for f in sys.meta_path if f is not importlib.machinery.PathFinder and hasattr(f, "find_spec")]
    return any(f.find_spec("clq_compile.kernels", None) is not None for f in finders)


def out_dir(arg: str | None) -> Path:
    """Where rows go: --out, else $OUT (what a lease returns), else bench/results/lease."""
    path = Path(arg or os.environ.get("OUT") or ROOT / "bench" / "results" / "lease")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Rows:
    """One JSON object per line in `<out>/<name>.jsonl`, written and flushed as each row comes."""

    def __init__(self, out: Path, name: str, echo: TextIO | None = sys.stdout):
        self.path = out / f"{name}.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._echo = echo

    def write(self, kind: str, **fields: Any) -> dict:
        row = {"kind": kind, **fields}
        line = json.dumps(row, default=str)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._echo is not None:
            print(line, file=self._echo, flush=True)
        return row

    def close(self) -> None:
        self._file.close()


class Budget:
    """Wall-clock seconds granted to a script (None: no limit); `allows(s)` says whether s more
    seconds still fit."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, seconds: float) -> bool:
        return self.seconds is None or self.elapsed() + seconds <= self.seconds


def limit_configs(module: Any, names: tuple[str, ...], count: int | None) -> dict[str, int]:
    """Keep the first `count` entries of each named autotune list of `module` (None keeps all).

    The lists are shortened in place: the autotuners hold the very list objects, so they then
    compile and try only those. Returns {list name: entries kept}; names the module lacks are left
    out (a rewritten kernel may name its lists differently: it then tunes over all of them, and
    the row says so).
    """
    kept = {}
    for name in names:
        configs = getattr(module, name, None)
        if not isinstance(configs, list):
            continue
        if count is not None:
            del configs[count:]
        kept[name] = len(configs)
    return kept


def machine() -> dict[str, Any]:
    """The GPU, driver and library versions of this process (no CUDA needed)."""
    import torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), driver=_driver())
    return info


def _driver() -> str | None:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        return found.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl file, a line cut off by the end of a lease left out."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summary(out: Path) -> list[str]:
    """A few lines per script of a lease: failed checks, then one line per timed row."""
    lines = []
    checks = read_rows(out / "kernel_check.jsonl")
    failed = [r for r in checks if r["kind"] == "check" and r.get("ok") is False]
    done = [r for r in checks if r["kind"] == "summary"]
    lines.append(f"kernel_check: {done[-1]['checks'] if done else 'did not finish'}, "
                 f"{sum(r['kind'] == 'check' for r in checks)} checks, {len(failed)} failed")
    for r in failed[:12]:
        what = {k: v for k, v in r.items() if k not in ("kind", "ok")}
        lines.append(f"  FAILED {json.dumps(what, default=str)[:200]}")
    for r in read_rows(out / "kernels.jsonl"):
        if r["kind"] == "peaks":
            lines.append(f"peaks: int8 {r['int8_tops']:.0f} TOPS, bf16 {r['bf16_tflops']:.0f} TFLOP/s, "
                         f"copy {r['copy_gbps']:.0f} GB/s")
        elif r["kind"] == "row" and "ms" in r:
            up = r["speedup_vs_bf16"]
            shown = ("w4a4", "w4a4_rot128", "w8a8", "fp8", "w4a16", "int8_mm", "fp8_rowwise")
            cells = " ".join(f"{n}={up[n]:.2f}" for n in shown if n in up)
            lines.append(f"M={r['M']:5d} N={r['N']:5d} K={r['K']:5d} x bf16: {cells} | quantize "
                         f"{r['quantize_fraction_of_copy'] or 0:.2f} of copy | gemm "
                         f"{r['fraction_of_int8_peak'].get('w4a4_gemm', 0):.2f} of int8 peak | "
                         f"{'ok' if r['check']['ok'] else 'CHECK FAILED'}")
        elif r["kind"] == "row" and not r.get("dry_run"):
            lines.append(f"M={r['M']} N={r['N']} K={r['K']}: {r.get('skipped') or r.get('errors')}")
    for r in read_rows(out / "end_to_end.jsonl"):
        if r["kind"] == "row":
            lines.append("end_to_end " + json.dumps({k: v for k, v in r.items() if k != "kind"}, default=str)[:200])
    return lines


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]) if len(sys.argv) > 1 else out_dir(None))))
