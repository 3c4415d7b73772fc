"""Test setup: one CPU thread per test process, and Triton kernels under the interpreter without a GPU."""

import os

# The tests' tensors are tiny, so torch's default of one thread per core buys nothing and, on a
# machine whose cores are busy, threads wait on each other: five full-precision forwards of a
# stress model took 27.7 s with 2 threads on a loaded 2-core machine, 2.8 s with 1. Subprocesses
# the tests start (the command line) inherit the variables.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import torch  # noqa: E402

torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Must be set before any triton.jit function is defined, i.e. before the kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("clq", deadline=None, max_examples=40)
settings.load_profile("clq")
