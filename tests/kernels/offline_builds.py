"""Run a bench/ script that compiles the kernels offline (no GPU), with this machine's Triton or the
lent GPU's.

The compiles run in a subprocess without TRITON_INTERPRET: the test session's Triton is the
interpreter's, which cannot compile. The lent H200 has Triton 3.6 (bench/README.md, "Versions");
it is a folder made with `pip install --no-deps --target`, put first on the subprocess's
PYTHONPATH. `.ci/run` installs it at .ci/device-triton; CLQ_DEVICE_TRITON names another folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.bench_scripts import BENCH

DEVICE_TRITON_VERSION = "3.6.0"
DEVICE_TRITON = Path(os.environ.get("CLQ_DEVICE_TRITON", BENCH.parent / ".ci" / "device-triton"))


def device_triton_missing() -> str | None:
    """Why the lent GPU's Triton cannot be used here, or None."""
    install = (f"`python -m pip install --no-deps --target {DEVICE_TRITON} triton=={DEVICE_TRITON_VERSION}` "
               f"(.ci/run does)")
    if not (DEVICE_TRITON / "triton" / "backends" / "nvidia" / "bin" / "ptxas").exists():
        return f"the lent GPU's Triton {DEVICE_TRITON_VERSION} is not at {DEVICE_TRITON}: {install}"
    python = f"cp{sys.version_info.major}{sys.version_info.minor}-"
    tags = [line for info in DEVICE_TRITON.glob("triton-*.dist-info")
            for line in (info / "WHEEL").read_text().splitlines() if line.startswith("Tag:")]
    if not any(python in tag for tag in tags):
        return f"the Triton at {DEVICE_TRITON} was built for another Python ({tags}): remove it, then {install}"
    return None


def run_build(script: str, out: Path, *args: str, triton: Path | None = None) -> dict:
    """`python bench/<script> *args --json out` compiled with this machine's Triton, or with the one
    in the folder `triton`; its JSON. Fails the test with the script's error output if it fails."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if triton is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        which = f"the Triton in {triton}" if triton is not None else "this machine's Triton"
        pytest.fail(f"bench/{script} with {which} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())
