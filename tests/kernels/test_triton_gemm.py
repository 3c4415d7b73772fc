"""The integer GEMM of kernels/triton_gemm.py under Triton's interpreter, and its config pruning.

The accumulator is compared bit for bit with the torch reference on random shapes (odd sizes, M = 1,
K tiles that do not divide K, both unpack paths), the scaled product bit for bit with the
reference's float32 epilogue; non-finite and near-overflow inputs get their own cases.
"""

import os

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clq_compile.kernels import triton_gemm, triton_quantize  # noqa: E402
from clq_compile.kernels.packing import pack_int4  # noqa: E402
from clq_compile.kernels.reference import int_matmul, scale_product  # noqa: E402
from tests.kernels.test_triton_kernels import random_stored  # noqa: E402

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (imported before this module)",
                allow_module_level=True)

BIT_PAIRS = [(4, 4), (8, 4), (8, 8), (4, 8)]  # (a_bits, w_bits)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 37), st.integers(1, 37), st.integers(1, 80), st.sampled_from(BIT_PAIRS),
       st.sampled_from([None, 2, 32, 64]), st.integers(0, 2**16))
def test_accumulator_is_exact_on_random_shapes(m, n, half_k, bits, block_k, seed):
    # block_k 64 takes the two-halves path, 32 and 2 the interleaved one; 64 on K < 64 or K not a
    # multiple of it is all masked last tile.
    k = 2 * half_k
    a_bits, w_bits = bits
    g = torch.Generator().manual_seed(seed)
    a, a_stored = random_stored(m, k, a_bits, g)
    w, w_stored = random_stored(n, k, w_bits, g)
    acc = triton_gemm.int_matmul_triton(a_stored, w_stored, k, a_bits, w_bits, block_k=block_k)
    assert acc.dtype == torch.int32 and torch.equal(acc, int_matmul(a, w))


def test_extreme_integers_accumulate_exactly():
    # -8 · -8 and -128 · -128 everywhere: the largest products each path can form.
    for a_bits, w_bits in BIT_PAIRS:
        k = 128
        a = torch.full((3, k), -2 ** (a_bits - 1), dtype=torch.int8)
        w = torch.full((5, k), -2 ** (w_bits - 1), dtype=torch.int8)
        stored = [pack_int4(q) if b == 4 else q for q, b in ((a, a_bits), (w, w_bits))]
        for block_k in (32, 64):
            acc = triton_gemm.int_matmul_triton(*stored, k, a_bits, w_bits, block_k=block_k)
            assert torch.equal(acc, int_matmul(a, w))


def reference_product(a, a_scale, w, w_scale, w_zero, k, a_group, w_group):
    """The float32 epilogue of quant_linear_reference on given integers (no bias)."""
    ag, wg = a_group or k, w_group or k
    chunk = min(ag, wg)
    out = torch.zeros(a.shape[0], w.shape[0])
    for c0 in range(0, k, chunk):
        acc = int_matmul(a[:, c0:c0 + chunk], w[:, c0:c0 + chunk])
        if w_zero is not None:
            rowsum = a[:, c0:c0 + chunk].sum(dim=1, dtype=torch.int32)
            acc = acc - rowsum[:, None] * w_zero[:, c0 // wg].to(torch.int32)[None, :]
        out += scale_product(acc, a_scale[:, c0 // ag], w_scale[:, c0 // wg])
    return out


@st.composite
def product_cases(draw):
    k = draw(st.sampled_from([64, 128]))
    a_bits, w_bits = draw(st.sampled_from(BIT_PAIRS))
    a_group, w_group = draw(st.sampled_from([(0, 0), (0, 32), (32, 0), (64, 64), (0, 64)]))
    return dict(m=draw(st.integers(1, 37)), n=draw(st.integers(1, 37)), k=k, a_bits=a_bits, w_bits=w_bits,
                a_group=a_group, w_group=w_group, zero=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                magnitude=draw(st.sampled_from([1.0, 1e37])))


def product_operands(case):
    g = torch.Generator().manual_seed(case["seed"])
    m, n, k = case["m"], case["n"], case["k"]
    a, a_stored = random_stored(m, k, case["a_bits"], g)
    w, w_stored = random_stored(n, k, case["w_bits"], g)
    ag, wg = case["a_group"] or k, case["w_group"] or k
    a_scale = (torch.rand(m, k // ag, generator=g) + 0.1) * case["magnitude"]
    # With activation scales near 1e37 (activations near the float32 limit), weight scales small
    # enough for a finite result.
    w_scale = torch.rand(n, k // wg, generator=g) / 64 / case["magnitude"] ** 0.2
    w_zero = None
    if case["zero"]:
        lim = 2 ** (case["w_bits"] - 1)
        w_zero = torch.randint(-lim, lim, (n, k // wg), generator=g, dtype=torch.int8)
    return a, a_stored, a_scale, w, w_stored, w_scale, w_zero


@settings(max_examples=25, deadline=None)
@given(product_cases())
def test_scaled_product_equals_the_reference_epilogue_bit_for_bit(case):
    # magnitude 1e37: activation scales whose product with the accumulator overflows float32 before
    # the weight scale is applied, while the result is finite.
    a, a_stored, a_scale, w, w_stored, w_scale, w_zero = product_operands(case)
    k = case["k"]
    out = triton_gemm.quant_matmul(a_stored, a_scale, w_stored, w_scale, w_zero, None, k, case["a_bits"],
                                   case["w_bits"], case["a_group"], case["w_group"], torch.float32)
    ref = reference_product(a, a_scale, w, w_scale, w_zero, k, case["a_group"], case["w_group"])
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)


def _small_case(a_bits=4, w_bits=4, zero=False):
    case = dict(m=5, n=7, k=64, a_bits=a_bits, w_bits=w_bits, a_group=0, w_group=0, zero=zero, seed=1,
                magnitude=1.0)
    return product_operands(case)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BIT_PAIRS)
def test_a_nan_scale_gives_nan_outputs(out_dtype, bits):
    a, a_stored, a_scale, w, w_stored, w_scale, w_zero = _small_case(*bits)
    a_scale[2] = float("nan")
    w_scale[4] = float("nan")
    out = triton_gemm.quant_matmul(a_stored, a_scale, w_stored, w_scale, w_zero, None, 64, *bits, 0, 0,
                                   out_dtype)
    nan = torch.zeros(5, 7, dtype=torch.bool)
    nan[2, :] = nan[:, 4] = True
    assert torch.equal(out.isnan(), nan)


def test_nan_payloads_survive_the_bfloat16_rounding():
    # GPUs make NaNs with all payload bits set; adding the rounding bias to those carried into the
    # sign bit and gave -0.0. A bias of such NaNs reaches the output unchanged in any other way.
    a, a_stored, a_scale, w, w_stored, w_scale, _ = _small_case()
    payloads = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, -0x7FFFFF, 0, 0],
                            dtype=torch.int32)
    bias = payloads.view(torch.float32).clone()
    bias[5:] = 1.0
    out = triton_gemm.quant_matmul(a_stored, a_scale, w_stored, w_scale, None, bias, 64, 4, 4, 0, 0,
                                   torch.bfloat16)
    assert out[:, :5].isnan().all() and not out[:, 5:].isnan().any()


def test_configs_are_pruned_to_the_device_before_compiling():
    for a_bits, w_bits in BIT_PAIRS:
        for chunk, single in ((3072, True), (128, False), (32, False)):
            for capability in (80, 89, 90):
                configs = triton_gemm.SM90_CONFIGS if capability == 90 else triton_gemm.SM80_CONFIGS
                kept = triton_gemm.prune_configs(configs, chunk, single, a_bits, w_bits, capability)
                assert kept
                for cfg in kept:
                    assert triton_gemm.fits(cfg, a_bits, w_bits, single, capability)
                    assert single or chunk % cfg.kwargs["BLOCK_K"] == 0
    # 3 stages of 128 x 256 int8 tiles 256 wide: 288 KB, more than the 227 KB of an H100's block.
    big = triton_gemm._config(128, 256, 256, 8, 3)
    assert triton_gemm.shared_memory_bytes(big, 8, 8) > triton_gemm.SHARED_MEMORY_LIMIT[90]
    assert not triton_gemm.fits(big, 8, 8, True, 90)
    assert triton_gemm.shared_memory_bytes(big, 4, 4) <= triton_gemm.SHARED_MEMORY_LIMIT[90]
    # Registers: two warp groups hold a 128 x 256 int8 product, not its W4A4 form with unpacked tiles.
    wide = triton_gemm._config(128, 256, 128, 8, 4)
    assert triton_gemm.fits(wide, 8, 8, True, 90) and not triton_gemm.fits(wide, 4, 4, True, 90)
    with pytest.raises(ValueError, match="no GEMM configuration fits"):
        triton_gemm.prune_configs([big], 3072, True, 8, 8, 90)


def test_m_buckets_are_powers_of_two_within_limits():
    assert [triton_gemm.m_bucket(m) for m in (1, 16, 17, 1000, 4096, 10**6)] == [16, 16, 32, 1024, 4096, 16384]


def test_launch_planning_is_cached_and_read_only():
    a = torch.zeros(3, 32, dtype=torch.uint8)
    w = torch.zeros(5, 32, dtype=torch.uint8)
    scales = torch.ones(3, 1), torch.ones(5, 1)
    triton_gemm._launch_meta.cache_clear()
    for _ in range(2):
        triton_gemm.quant_matmul(a, scales[0], w, scales[1], None, None, 64, 4, 4, 0, 0, torch.float32)
    assert triton_gemm._launch_meta.cache_info().hits == 1
    chunk, meta = triton_gemm._launch_meta(64, 64, 64, 4, 4, False, False, True)
    with pytest.raises(TypeError):
        meta["A_BITS"] = 8
