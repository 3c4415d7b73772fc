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
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "clq_compile": clq_compile.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
