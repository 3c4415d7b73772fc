"""The weight-only GEMM of kernels/triton_weight_only.py under Triton's interpreter, and its config pruning.

The kernel is compared with a float64 product of the dequantized weight (unpacked by
kernels/packing.py) within the error that its own roundings allow, derived in `tolerance`.
"""

import os

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clq_compile.kernels import triton_gemm, triton_quantize, triton_weight_only  # noqa: E402
from clq_compile.kernels.packing import pack_int3, pack_int4, unpack_int3, unpack_weight  # noqa: E402
from clq_compile.kernels.triton_weight_only import weight_only_matmul  # noqa: E402

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (imported before this module)",
                allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stored_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The storage of kernels/packing.py for signed integers q: int8 [N, K]."""
    return {3: pack_int3, 4: pack_int4, 8: lambda v: v}[bits](q)


def unpacked(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int3(qweight) if bits == 3 else unpack_weight(qweight, bits)


def dequantized64(qweight, bits, scale, zero, k):
    """float64 Ŵ [N, K] = scale · (q − zero), per group of K // scale.shape[1] channels."""
    q = unpacked(qweight, bits).double()
    n, groups = scale.shape
    w = q.reshape(n, groups, k // groups)
    if zero is not None:
        w = w - zero.double().unsqueeze(-1)
    return (w * scale.double().unsqueeze(-1)).reshape(n, k)


def tolerance(x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None, y64: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """Bound on |kernel − y64| [M, N] from the kernel's roundings (u: unit roundoff, u32 = 2^-24).

    Ŵ = scale · (q − zero) is rounded once in float32 (q − zero is exact), then to x's dtype
    (u_x; float32 x: no second rounding): Ŵ(1 + δ), |δ| <= (1 + u32)(1 + u_x) − 1. Products with
    16-bit x are exact in float32 (8 or 11 significant bits each), float32 ones round once; the
    float32 sum of K terms in any order and the bias addition add at most (1 + u32)^(K + 1) − 1
    relative to S = Σ_k |x_k Ŵ_k| + |bias|. The output rounds once more (u_out relative, plus half
    the smallest subnormal of out_dtype absolute).
    """
    u32 = 2.0**-24
    u_x = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps / 2
    k = x.shape[1]
    delta = (1 + u32) ** (k + 3) * (1 + u_x) - 1
    s = x.double().abs() @ w64.abs().t()
    if bias is not None:
        s = s + bias.double().abs()
    info = torch.finfo(out_dtype)
    computed = delta * s
    return computed + info.eps / 2 * (y64.abs() + computed) + info.smallest_normal * info.eps / 2


@st.composite
def cases(draw):
    bits = draw(st.sampled_from([3, 4, 8]))
    group = draw(st.sampled_from([None, 8, 16, 32]))
    # 3-bit rows pack 8 channels at a time; K up to 96 spans three 32-wide K tiles, 40 or 72 end
    # with a masked one.
    k = 8 * draw(st.integers(1, 12))
    if group is not None and k % group:
        k = group * draw(st.integers(1, 3))
    x_dtype = draw(st.sampled_from(DTYPES))
    return dict(bits=bits, group=group, k=k, m=draw(st.sampled_from([1, 2, 7, 16, 17])), n=draw(st.integers(1, 37)),
                zero=draw(st.booleans()), bias=draw(st.booleans()), x_dtype=x_dtype,
                out_dtype=draw(st.sampled_from([x_dtype, *DTYPES])), seed=draw(st.integers(0, 2**16)))


def operands(case):
    """(x, qweight, scale, zero, bias) for a case: integers over the whole signed range, scales in
    [2^-6, 2^-2) (Ŵ normal in float16, outputs far from float16's overflow)."""
    g = torch.Generator().manual_seed(case["seed"])
    m, n, k, bits = case["m"], case["n"], case["k"], case["bits"]
    groups = k // (case["group"] or k)
    lim = 2 ** (bits - 1)
    q = torch.randint(-lim, lim, (n, k), generator=g, dtype=torch.int8)
    scale = 2.0 ** (torch.rand(n, groups, generator=g) * 4 - 6)
    zero = torch.randint(-lim, lim, (n, groups), generator=g, dtype=torch.int8) if case["zero"] else None
    # A linear layer's bias has its weight's (here x's) dtype.
    bias = torch.randn(n, generator=g).to(case["x_dtype"]) if case["bias"] else None
    x = torch.randn(m, k, generator=g).to(case["x_dtype"])
    return x, stored_weight(q, bits), scale, zero, bias


def run(case, x, qweight, scale, zero, bias):
    return weight_only_matmul(x, qweight, scale, zero, bias, case["k"], case["bits"], case["group"],
                              case["out_dtype"])


@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_the_float64_product_within_its_roundings(case):
    x, qweight, scale, zero, bias = operands(case)
    out = run(case, x, qweight, scale, zero, bias)
    assert out.dtype == case["out_dtype"] and out.shape == (case["m"], case["n"])
    w64 = dequantized64(qweight, case["bits"], scale, zero, case["k"])
    y64 = x.double() @ w64.t() + (0 if bias is None else bias.double())
    err = (out.double() - y64).abs()
    tol = tolerance(x, w64, bias, y64, case["out_dtype"])
    assert (err <= tol).all(), f"largest error {err.max().item():.3g} at tolerance {tol.flatten()[err.argmax()]:.3g}"


def test_weight_rounding_is_what_the_tolerance_allows():
    # The one weight of the row is 7 · scale, which bfloat16 cannot hold: the float32 output is that
    # weight rounded to bfloat16 (to nearest), as the module docstring says the dot takes it.
    k = 32
    q = torch.zeros(1, k, dtype=torch.int8)
    q[0, 5] = 7
    scale = torch.tensor([[1 + 2.0**-9 + 2.0**-12]])
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    x[0, 5] = 1
    out = weight_only_matmul(x, pack_int4(q), scale, None, None, k, 4, None, torch.float32)
    w = 7 * scale.item()
    assert out.item() == torch.tensor(w).to(torch.bfloat16).item() != w


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_nan_in_x_gives_nan_in_its_row_only(bits, x_dtype):
    case = dict(bits=bits, group=16, k=48, m=7, n=19, zero=True, bias=True, x_dtype=x_dtype, out_dtype=x_dtype,
                seed=3)
    x, qweight, scale, zero, bias = operands(case)
    x[2, 41] = float("nan")
    out = run(case, x, qweight, scale, zero, bias)
    nan = torch.zeros(7, 19, dtype=torch.bool)
    nan[2] = True
    assert torch.equal(out.isnan(), nan)


def test_strided_x_and_empty_batches():
    case = dict(bits=4, group=None, k=64, m=5, n=9, zero=False, bias=False, x_dtype=torch.bfloat16,
                out_dtype=torch.bfloat16, seed=5)
    x, qweight, scale, zero, bias = operands(case)
    wide = torch.zeros(5, 128, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(run(case, wide[:, ::2], qweight, scale, zero, bias), run(case, x, qweight, scale, zero, bias))
    assert run(case, x[:0], qweight, scale, zero, bias).shape == (0, 9)


def _good():
    case = dict(bits=4, group=16, k=32, m=3, n=5, zero=True, bias=True, x_dtype=torch.bfloat16,
                out_dtype=torch.bfloat16, seed=0)
    x, qweight, scale, zero, bias = operands(case)
    return dict(x=x, qweight=qweight, w_scale=scale, w_zero=zero, bias=bias, in_features=32, w_bits=4, w_group=16,
                out_dtype=torch.bfloat16)


BAD_INPUTS = [
    (dict(w_bits=2), "w_bits must be 3, 4 or 8"),
    (dict(in_features=64), "x must be \\[M, 64\\]"),
    (dict(w_bits=3), "in_features must be a positive multiple of 8|qweight for w_bits=3"),
    (dict(w_group=12), "w_group must be None"),
    (dict(x=torch.zeros(3, 32, dtype=torch.int32)), "x must be float32, float16 or bfloat16"),
    (dict(x=torch.zeros(2, 3, 32)), "reshape leading dimensions"),
    (dict(qweight=torch.zeros(5, 32, dtype=torch.int8)), "qweight for w_bits=4 must be torch.uint8 \\[N, 16\\]"),
    (dict(w_scale=torch.ones(5, 2, dtype=torch.float16)), "w_scale must be float32 \\[5, 2\\]"),
    (dict(w_scale=torch.ones(5, 1)), "w_scale must be float32 \\[5, 2\\]"),
    (dict(w_zero=torch.zeros(5, 2, dtype=torch.uint8)), "w_zero must be int8"),
    (dict(bias=torch.zeros(4)), "bias must be a float tensor of shape \\[5\\]"),
    (dict(out_dtype=torch.int32), "out_dtype must be float32, float16 or bfloat16"),
    (dict(bias=torch.zeros(5, device="meta")), "same device"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS)
def test_bad_inputs_raise_value_errors_that_say_what_to_do(change, message):
    with pytest.raises(ValueError, match=message):
        weight_only_matmul(**{**_good(), **change})


def test_configs_are_pruned_by_m_bucket_groups_and_device_resources():
    k = 1152
    for bits in (3, 4, 8):
        for x_bytes in (2, 4):
            for capability in (80, 89, 90):
                for m in (1, 16, 17, 100, 4096):
                    for group in (k, 128, 64, 32):
                        bucket = triton_gemm.m_bucket(m)
                        kept = triton_weight_only.prune_configs(triton_weight_only.CONFIGS, bucket, group, k, bits,
                                                                x_bytes, capability)
                        for cfg in kept:
                            block_k = cfg.kwargs["BLOCK_K"]
                            assert triton_weight_only.fits(cfg, bits, x_bytes, capability)
                            assert cfg.kwargs["BLOCK_M"] <= bucket
                            # One scale per row and tile wherever the group allows a tile that wide.
                            assert group == k or group % block_k == 0 or group < triton_weight_only.min_block_k(
                                bits, x_bytes)
                        if m <= 16:
                            assert {cfg.kwargs["BLOCK_M"] for cfg in kept} == {16}
    # Four stages of 128 x 256 x 256 bf16 x and int8 weight tiles: 512 KiB, more than any device's block.
    big = triton_weight_only._config(128, 256, 256, 8, 4)
    assert triton_weight_only.shared_memory_bytes(big, 8, 2) > triton_gemm.SHARED_MEMORY_LIMIT[90]
    with pytest.raises(ValueError, match="no weight-only GEMM configuration fits"):
        triton_weight_only.prune_configs([big], 4096, k, k, 8, 2, 90)
    # 128 weights per thread of a 64 x 256 tile with 4 warps: more registers than fit without spills.
    assert not triton_weight_only.fits(triton_weight_only._config(16, 64, 256, 4, 3), 4, 2, 90)
    # A 3-bit phase of a 32-wide K tile is 8 channels, too narrow for a 16-bit tensor-core dot.
    narrow = triton_weight_only._config(16, 32, 32, 2, 3)
    assert triton_weight_only.fits(narrow, 8, 2, 90) and not triton_weight_only.fits(narrow, 3, 2, 90)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([3, 4]), st.sampled_from([1, 7, 17]), st.integers(1, 37), st.sampled_from(DTYPES),
       st.booleans(), st.integers(0, 2**16))
def test_twin_log_codes_decode_in_registers_to_the_float64_product(bits, m, n, x_dtype, bias, seed):
    """tlq3 / tlq4 codes (every code of the range) with per-row parameters: the kernel's arithmetic
    decoding (exponent bits, branch select, max) gives the float64 product within the roundings
    the integer path allows (the decoded weight rounds once in float32, once to x's dtype)."""
    from clq_compile.kernels.formats import TWIN_LOG

    fmt = TWIN_LOG[bits]
    g = torch.Generator().manual_seed(seed)
    k = 8 * (1 + seed % 9)
    q = torch.randint(-fmt.levels, fmt.levels, (n, k), generator=g, dtype=torch.int8)
    bound = 2.0 ** (torch.rand(n, 2, generator=g) * 4 - 4)
    eta = torch.rand(n, 1, generator=g) * 0.5
    a = bound / (1 - eta)
    params = torch.stack([a[:, 0], a[:, 0] * eta[:, 0], a[:, 1], a[:, 1] * eta[:, 0]], dim=1).float()
    b = torch.randn(n, generator=g).to(x_dtype) if bias else None
    x = torch.randn(m, k, generator=g).to(x_dtype)
    out = weight_only_matmul(x, stored_weight(q, bits), params, None, b, k, bits, None, x_dtype, twin_log=True)
    w64 = fmt.dequantize(q, params, None, None).double()
    y64 = x.double() @ w64.t() + (0 if b is None else b.double())
    err = (out.double() - y64).abs()
    tol = tolerance(x, w64, b, y64, x_dtype)
    assert (err <= tol).all(), f"largest error {err.max().item():.3g} at tolerance {tol.flatten()[err.argmax()]:.3g}"


def test_twin_log_weights_refuse_groups_zero_points_and_8_bits():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="no groups, no zero points"):
        weight_only_matmul(x, pack_int4(torch.zeros(3, 32, dtype=torch.int8)), torch.ones(3, 2), None, None, 32, 4,
                           16, torch.float32, twin_log=True)
    with pytest.raises(ValueError, match="3 or 4 for twin-log"):
        weight_only_matmul(x, torch.zeros(3, 32, dtype=torch.int8), torch.ones(3, 4), None, None, 32, 8, None,
                           torch.float32, twin_log=True)


@pytest.mark.parametrize("a_bits", [4, 8])
def test_twin_log_layers_with_quantized_activations_take_the_decoding_path(a_bits):
    """quant_linear_triton on tlq4 weights and int activations: the activations quantized by the
    quantize kernel, decoded to x's dtype, multiplied by the decoded weight: the float64 product
    of those two within the weight-only GEMM's roundings."""
    from clq_compile.kernels.formats import TLQ4
    from clq_compile.kernels.quantize import quantize_activation
    from clq_compile.kernels.triton_linear import quant_linear_triton

    g = torch.Generator().manual_seed(a_bits)
    n, k, m = 9, 64, 7
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    params = torch.tensor([[0.5, 0.01, 0.4, 0.0]]).repeat(n, 1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    out = quant_linear_triton(x, pack_int4(q), params, None, None, None, None, None, k, "tlq4", f"int{a_bits}", 0, 0)
    x_hat = quantize_activation(x.float(), a_bits).dequantize().to(torch.bfloat16)
    w64 = TLQ4.dequantize(q, params, None, None).double()
    y64 = x_hat.double() @ w64.t()
    err = (out.double() - y64).abs()
    assert (err <= tolerance(x_hat, w64, None, y64, torch.bfloat16)).all()
    assert not torch.equal(x_hat, x)  # the activations were quantized
