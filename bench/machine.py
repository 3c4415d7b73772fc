"""The machine a benchmark ran on, recorded next to its results."""

from __future__ import annotations

import os
import platform
from typing import Any

import diffusers
import torch

import clq_compile


def machine_info() -> dict[str, Any]:
    """Platform, CPU, thread count and library versions of this process."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # The vector ISA torch's CPU kernels (and BLAS) dispatch on, and the CPU model: float32 sums
        # differ between ISAs and between vendors' kernels for one ISA (an Intel and an AMD CPU with
        # AVX-512 gave other quantized cells), so results reproduce to the last digit only on the same model.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "clq_compile": clq_compile.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None
