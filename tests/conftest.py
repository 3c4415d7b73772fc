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



def _interpreter_fma_rounds_once() -> bool:
    """fma(1 + 2^-12, 1 + 2^-12, -1) under Triton's interpreter: 2^-11 + 2^-24 when it rounds once,
    2^-11 when it multiplies and adds (Triton 3.6's interpreter does; a GPU's fma rounds once)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -1.0))

    x = torch.tensor([1 + 2.0**-12])
    out = torch.zeros(1)
    fma_kernel[(1,)](x, out)
    return out.item() == 2.0**-11 + 2.0**-24


def pytest_configure(config):
    """Warn when this Triton's interpreter cannot serve as the kernels' bit-exact oracle."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
    except ImportError:
        return
    if not _interpreter_fma_rounds_once():
        import pytest

        config.issue_config_time_warning(pytest.PytestWarning(
            f"triton {triton.__version__}: its interpreter rounds tl.fma twice, so the kernel tests that compare "
            f"activation scales with the reference bit for bit fail by one ulp there (a GPU's fma rounds once); "
            f"they need an interpreter that rounds once, as Triton 3.9's does"), stacklevel=2)
