"""Import the benchmark scripts of bench/ (a folder of scripts, not an installed package)."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def import_bench(*names: str) -> tuple:
    """The bench modules `names`, with bench/ on sys.path only while importing, and out of
    sys.modules afterwards: left there, bench/kernels.py would shadow any top-level `kernels`
    package for the rest of the session (libraries probe for one by that name)."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCH))
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[name]
