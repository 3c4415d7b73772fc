"""Number formats against float64 and integer references: grids, rounding, storage, pairs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clq_compile.kernels.formats import E4M3, FORMATS, INT3, INT4, INT8, MODES, NONE, check_pair, get_format, mode_name
from clq_compile.kernels.quantize import quantize

STORED = [f for f in FORMATS.values() if f.quantizes and f.uniform]  # twin-log: tests/kernels/test_twin_log_format.py


def e4m3_grid() -> torch.Tensor:
    """Every finite float8 e4m3fn value, in float64, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return values[torch.isfinite(values)].unique()


@given(st.lists(st.floats(-600, 600, width=32), min_size=1, max_size=40))
def test_e4m3_encodes_to_a_nearest_grid_value_and_saturates(values):
    t = torch.tensor(values, dtype=torch.float32)
    codes = E4M3.encode(t, None).double()
    grid = e4m3_grid()
    clamped = t.double().clamp(-448, 448)
    nearest = (grid[None, :] - clamped[:, None]).abs().min(dim=1).values
    assert torch.equal((codes - clamped).abs(), nearest)
    assert codes.abs().max() <= 448


def test_e4m3_keeps_nan_and_has_no_zero_point():
    assert torch.isnan(E4M3.encode(torch.tensor([float("nan")]), None)).all()
    with pytest.raises(ValueError, match="no zero point"):
        quantize(torch.randn(2, 8), E4M3, symmetric=False)


@given(st.sampled_from([INT3, INT4, INT8]), st.booleans(),
       st.lists(st.floats(-300, 300, width=32), min_size=1, max_size=40))
def test_integer_encoding_is_round_half_even_then_clamp(fmt, symmetric, values):
    t = torch.tensor(values, dtype=torch.float32)
    zero = None if symmetric else torch.tensor(2.0 ** (fmt.bits - 1))
    qmin, qmax = fmt.qrange(symmetric)
    expected = [min(max(round(v) + (0 if zero is None else float(zero)), qmin), qmax) for v in t.tolist()]
    assert fmt.encode(t, zero).tolist() == expected
    assert fmt.decode(fmt.encode(t, zero), zero).tolist() == [e - (0 if zero is None else float(zero)) for e in expected]


@given(st.sampled_from(STORED), st.integers(1, 5), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_storage_holds_the_codes_in_the_layout_it_declares(fmt, rows, eighths, symmetric, seed):
    k = 8 * eighths
    symmetric = symmetric or not fmt.asymmetric
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    q = quantize(w, fmt, symmetric)
    qweight, zero = fmt.store(q.q, q.zero)
    assert (qweight.dtype, qweight.shape[1]) == fmt.storage(k) and qweight.shape[0] == rows
    stored = fmt.unpack(qweight).float()
    # Asymmetric integers are stored shifted to signed: the value q - zero is unchanged.
    if zero is not None:
        assert torch.equal(stored - zero.float(), q.q.float() - q.zero.float())
    else:
        assert torch.equal(stored, q.q.float())


def test_width_problems_name_the_packing():
    assert "odd" in INT4.width_problem(7) and INT4.width_problem(8) is None
    assert "multiple of 8" in INT3.width_problem(12) and INT3.width_problem(16) is None
    assert INT8.width_problem(7) is None and E4M3.width_problem(7) is None


def test_modes_name_their_pairs_and_pairs_are_checked():
    for name, (w, a) in MODES.items():
        if w is not None:
            assert mode_name(w, a) == name
            check_pair(w, a)
    assert mode_name(INT8, INT4) == "int8/int4"
    with pytest.raises(ValueError, match="integer weights need integer"):
        check_pair(INT4, E4M3)
    with pytest.raises(ValueError, match="float8 weights"):
        check_pair(E4M3, INT8)
    check_pair(E4M3, NONE)
    with pytest.raises(ValueError, match="unknown number format 'int5'; the formats are int3, int4, int8, e4m3, none"):
        get_format("int5")


def test_each_format_names_only_the_compiled_paths_the_dispatch_knows():
    from clq_compile.kernels.formats import FORMATS, INTEGER_GEMM, SCALED_MM, WEIGHT_ONLY, integer_format

    assert all(set(f.kernels) <= {INTEGER_GEMM, WEIGHT_ONLY, SCALED_MM} for f in FORMATS.values())
    # int3 has a weight-only GEMM but no integer tensor-core path; widths without storage have none.
    assert FORMATS["int3"].kernels == (WEIGHT_ONLY,)
    assert INTEGER_GEMM in FORMATS["int4"].kernels and INTEGER_GEMM in FORMATS["int8"].kernels
    assert integer_format(2).kernels == ()
