"""Import the benchmark scripts of bench/ (a folder of scripts, not an installed package)."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def import_bench(*names: str) -> tuple:
    """The bench modules `names`, with bench/ on sys.path only while importing: left there,
    bench/kernels.py would shadow any top-level `kernels` package for the rest of the session."""
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCH))
