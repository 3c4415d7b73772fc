"""Test setup: Triton kernels run under the interpreter on machines without a GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any triton.jit function is defined, i.e. before the kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("clq", deadline=None, max_examples=40)
settings.load_profile("clq")
