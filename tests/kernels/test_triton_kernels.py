"""The Triton kernels against the torch reference, under Triton's interpreter on CPU.

Bit-exact comparisons use "dyadic" activations (small integers times powers of two) and rotations
whose entries are powers of two up to sign: every float32 sum in the online transform is then exact
in any order, so kernel and reference agree bit for bit even though their matmuls add in different
orders. The activation-quantize kernel alone is tested in tests/kernels/test_triton_quantize.py.
"""

import os

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clq_compile.kernels import float8_linear, ops, triton_gemm, triton_linear, triton_quantize  # noqa: E402
from clq_compile.kernels.formats import E4M3  # noqa: E402
from clq_compile.kernels.hadamard import hadamard, normalized_hadamard  # noqa: E402
from clq_compile.kernels.packing import pack_int4, pack_weight, unpack_int4, unpack_weight  # noqa: E402
from clq_compile.kernels.quantize import quantize, quantize_activation  # noqa: E402
from clq_compile.kernels.reference import (  # noqa: E402
    int_matmul,
    quant_linear_reference,
    transform_activation,
)
from tests.kernels.test_triton_weight_only import tolerance  # noqa: E402

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (imported before this module)",
                allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (32, 64, 96, 128)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dyadic_activations(m: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[m, k]: integers in [-127, 127] times 2^-4 times a power of two per row, one row all zeros.

    Exact in float16/bfloat16, and every sum of up to 128 of them (times powers of two in [2^-5, 2^2])
    is exact in float32.
    """
    g = _generator(seed)
    x = torch.randint(-127, 128, (m, k), generator=g).float() * 2.0**-4
    x = x * 2.0 ** torch.randint(-6, 7, (m, 1), generator=g).float()
    x[m // 2] = 0
    return x.to(dtype)


def dyadic_rotation(b: int) -> torch.Tensor:
    """[b, b]: normalized Hadamard when its entries are powers of two (b = 4^j), else ±1/8."""
    if b & (b - 1) == 0 and b.bit_length() % 2 == 1:
        return normalized_hadamard(b)
    return hadamard(b, torch.float32) / 8


def transform_options(k: int, seed: int, mul: bool, perm: bool, rotation: int | None, dyadic: bool):
    g = _generator(seed + 1)
    act_mul = 2.0 ** torch.randint(-2, 3, (k,), generator=g).float() if mul else None
    if act_mul is not None and not dyadic:
        act_mul = torch.rand(k, generator=g) + 0.5
    act_perm = torch.randperm(k, generator=g) if perm else None
    act_rotation = None
    if rotation is not None:
        act_rotation = dyadic_rotation(rotation) if dyadic else normalized_hadamard(rotation)
    return act_mul, act_perm, act_rotation


def reference_quantized(x, bits, group, act_mul, act_perm, act_rotation):
    ref = quantize_activation(transform_activation(x.float(), act_mul, act_perm, act_rotation), bits, group)
    return (pack_int4(ref.q) if bits == 4 else ref.q.to(torch.int8)), ref.scale


def stored_integers(q: torch.Tensor, bits: int) -> torch.Tensor:
    return (unpack_int4(q) if bits == 4 else q).to(torch.int16)


@st.composite
def integer_cases(draw):
    k = draw(st.sampled_from(WIDTHS))
    a_bits, w_bits = draw(st.sampled_from([(4, 4), (8, 4), (8, 8), (4, 8)]))
    return dict(m=draw(st.integers(1, 40)), n=draw(st.integers(1, 40)), k=k, a_bits=a_bits, w_bits=w_bits,
                seed=draw(st.integers(0, 2**16)))


def random_stored(rows: int, k: int, bits: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers int8 [rows, k] over the whole signed range, their stored form)."""
    lim = 2 ** (bits - 1)
    q = torch.randint(-lim, lim, (rows, k), generator=g, dtype=torch.int8)
    return q, (pack_int4(q) if bits == 4 else q)


@settings(max_examples=25, deadline=None)
@given(integer_cases())
def test_gemm_accumulator_equals_int_matmul_bit_for_bit(case):
    g = _generator(case["seed"])
    a, a_stored = random_stored(case["m"], case["k"], case["a_bits"], g)
    w, w_stored = random_stored(case["n"], case["k"], case["w_bits"], g)
    acc = triton_gemm.int_matmul_triton(a_stored, w_stored, case["k"], case["a_bits"], case["w_bits"])
    assert acc.dtype == torch.int32 and torch.equal(acc, int_matmul(a, w))


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_gemm_accumulator_on_a_chunk_with_masked_k_tiles(a_bits, w_bits):
    # A 96-wide chunk taken from the middle of the rows (non-contiguous operands) with 64-wide K
    # tiles: the second tile is half masked, as on GPUs when a group is narrower than the tile.
    g = _generator(0)
    a, a_stored = random_stored(21, 192, a_bits, g)
    w, w_stored = random_stored(19, 192, w_bits, g)

    def columns(stored, bits):
        step = 2 if bits == 4 else 1
        return stored[:, 32 // step:128 // step]

    acc = triton_gemm.int_matmul_triton(columns(a_stored, a_bits), columns(w_stored, w_bits), 96, a_bits,
                                        w_bits, block_k=64)
    assert torch.equal(acc, int_matmul(a[:, 32:128], w[:, 32:128]))


@st.composite
def linear_cases(draw):
    k = draw(st.sampled_from(WIDTHS))
    groups = [g for g in (0, 32, 64) if g == 0 or k % g == 0]
    w_bits, a_bits = draw(st.sampled_from([(4, 4), (4, 8), (8, 8)]))
    return dict(m=draw(st.integers(1, 40)), n=draw(st.integers(1, 40)), k=k, w_bits=w_bits, a_bits=a_bits,
                w_group=draw(st.sampled_from(groups)), a_group=draw(st.sampled_from(groups)),
                symmetric=draw(st.booleans()), bias=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                mul=draw(st.booleans()), perm=draw(st.booleans()),
                rotation=draw(st.sampled_from([None, *[b for b in (32, 64) if k % b == 0], k])),
                lead=draw(st.sampled_from([(), (2,)])), seed=draw(st.integers(0, 2**16)))


def case_weight(case):
    """The case's quantized weight, and the generator that then draws its bias."""
    k, n = case["k"], case["n"]
    g = _generator(case["seed"] + 2)
    weight = torch.randn(n, k, generator=g) / k**0.5
    return quantize(weight, case["w_bits"], case["symmetric"], case["w_group"] or None), g


def linear_arguments(case, x, dyadic):
    k, n = case["k"], case["n"]
    weight, g = case_weight(case)
    stored = pack_weight(weight)
    bias = torch.randn(n, generator=g).to(case["dtype"]) if case["bias"] else None
    transform = transform_options(k, case["seed"], case["mul"], case["perm"], case["rotation"], dyadic)
    a_format = "none" if case["a_bits"] == 16 else f"int{case['a_bits']}"
    return (x, stored.qweight, stored.scale, stored.zero, bias, *transform, k, f"int{case['w_bits']}", a_format,
            case["w_group"], case["a_group"])


def split_rows(x: torch.Tensor, lead: tuple) -> torch.Tensor:
    return x.reshape(*lead, -1, x.shape[-1]) if lead and x.shape[0] % lead[0] == 0 else x


@settings(max_examples=20, deadline=None)
@given(linear_cases())
def test_quant_linear_triton_equals_reference_bit_for_bit(case):
    x = split_rows(dyadic_activations(case["m"], case["k"], case["seed"], case["dtype"]), case["lead"])
    args = linear_arguments(case, x, dyadic=True)
    out = triton_linear.quant_linear_triton(*args)
    ref = quant_linear_reference(*args)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)


# Codes equal, scales one float32 ulp apart (the rotated row's max summed in another order):
# one bfloat16 output rounds the other way.
GAUSSIAN_ONE_ROUNDING = dict(m=22, n=17, k=32, w_bits=8, a_bits=8, w_group=0, a_group=0, symmetric=True,
                             bias=False, dtype=torch.bfloat16, mul=False, perm=False, rotation=32, lead=(),
                             seed=6739)


@settings(max_examples=15, deadline=None)
@given(linear_cases())
@example(GAUSSIAN_ONE_ROUNDING)
def test_quant_linear_triton_matches_reference_on_gaussian_data(case):
    x = torch.randn(case["m"], case["k"], generator=_generator(case["seed"])).to(case["dtype"])
    args = linear_arguments(case, x, dyadic=False)
    a_bits, a_group, transform = case["a_bits"], case["a_group"] or None, args[5:8]
    kernel_codes, kernel_scale = triton_quantize.quantize_activation_triton(x, a_bits, a_group, *transform)
    codes, scale = reference_quantized(x, a_bits, a_group, *transform)
    # Equal activation integers are what this test is about; a rare last-bit rotation difference
    # that moves one across a tie is the previous test's subject.
    assume(torch.equal(kernel_codes, codes))
    out = triton_linear.quant_linear_triton(*args).double()
    ref = quant_linear_reference(*args).double()
    assert ((out - ref).abs() <= gemm_tolerance(case, args, x, ref, kernel_scale, scale)).all()


def gemm_tolerance(case, args, x, ref, kernel_scale, scale):
    """Bound on |kernel − reference| [M, N] when both quantized x to the same integers.

    The integer accumulators are then exact on both sides; what differs is the activation scales
    (the rotation sums in another order: relative difference ρ, read off both quantizers) and the
    float32 roundings of each side's per-chunk scale products, their sum over at most K chunks and
    the bias addition ((1 + u32)^(K + 4) − 1 each), all relative to S = |x̂| · |ŵ|ᵀ + |bias| with x̂,
    ŵ dequantized. Each output then rounds once to its dtype (eps covers both roundings, plus the
    smallest subnormal's half absolute).
    """
    k, a_group = case["k"], case["a_group"] or None
    rho = ((kernel_scale.double() - scale.double()).abs() / scale.double().abs().clamp_min(1e-300)).max()
    xt = transform_activation(x.float(), *args[5:8])
    xhat = quantize_activation(xt, case["a_bits"], a_group).dequantize().double()
    w = case_weight(case)[0].dequantize().double()
    s = xhat.abs() @ w.abs().t()
    if args[4] is not None:
        s = s + args[4].double().abs()
    computed = (rho + 2 * ((1 + 2.0**-24) ** (k + 4) - 1)) * (1 + rho) * s
    info = torch.finfo(case["dtype"])
    return computed + info.eps * (ref.abs() + computed) + info.smallest_normal * info.eps / 2


def test_bfloat16_outputs_round_ties_to_even():
    # Zero activations leave out = bias: a float32 bias halfway between bfloat16 neighbours (or
    # just past halfway) shows the output rounding, which the interpreter's own cast truncates.
    half_ulp = 2.0**-8
    values = [1 + half_ulp, 1 + 3 * half_ulp, 1 + half_ulp + 2.0**-20, -(1 + half_ulp), -(1 + 3 * half_ulp),
              2 + 2 * half_ulp, 0.1, -0.3]
    args = _valid_arguments()
    n = args[1].shape[0]
    args[0] = torch.zeros(3, 64, dtype=torch.bfloat16)
    args[4] = torch.tensor((values * n)[:n], dtype=torch.float32)
    out = triton_linear.quant_linear_triton(*args)
    assert torch.equal(out, quant_linear_reference(*args))
    assert torch.equal(out[0], args[4].to(torch.bfloat16))


@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_weight_only_layers_run_the_weight_only_gemm_within_its_rounding_bound(w_bits):
    """The online transform in float32, rounded to x's dtype, then the weight-only GEMM
    (kernels/triton_weight_only.py, whose tests derive the bound)."""
    case = dict(m=5, n=6, k=64, w_bits=w_bits, a_bits=16, w_group=32, a_group=0, symmetric=False, bias=True,
                dtype=torch.bfloat16, mul=True, perm=True, rotation=32, seed=3)
    args = linear_arguments(case, torch.randn(5, 64).to(torch.bfloat16), dyadic=False)
    out = triton_linear.quant_linear_triton(*args)
    x, qweight, scale, zero, bias = args[:5]
    xt = transform_activation(x.float(), *args[5:8]).to(x.dtype)
    codes = unpack_weight(qweight, w_bits).double().reshape(6, 2, 32) - zero.double()[..., None]
    w64 = (codes * scale.double()[..., None]).reshape(6, 64)
    y64 = xt.double() @ w64.t() + bias.double()
    assert out.dtype == x.dtype
    assert ((out.double() - y64).abs() <= tolerance(xt, w64, bias, y64, x.dtype)).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 9), st.integers(1, 20), st.sampled_from([16, 32, 64]), st.booleans(), st.booleans(),
       st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_float8_layers_on_scaled_mm_match_the_reference(m, n, k, bias, rotate, dtype, seed):
    g = _generator(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = quantize(torch.randn(n, k, generator=g) / k**0.5, E4M3)
    stored = pack_weight(weight)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    rotation = normalized_hadamard(16) if rotate else None
    args = (x, stored.qweight, stored.scale, None, b, None, None, rotation, k, "e4m3", "e4m3", 0, 0)
    out = triton_linear.quant_linear_triton(*args).double()
    ref = quant_linear_reference(*args).double()
    # The same codes and scales; only the float32 summation order and (for 16-bit models) the
    # final rounding differ: one rounding of the output dtype, plus float32 ulps of |x|·|w|.
    ulp = torch.finfo(dtype).eps
    xt = quantize_activation(transform_activation(x.float(), act_rotation=rotation), E4M3).dequantize()
    magnitude = xt.double().abs() @ weight.dequantize().double().abs().t()
    assert ((out - ref).abs() <= ulp * ref.abs() + 1e-5 * magnitude + 1e-30).all()


def test_float8_layers_fall_back_where_cpu_scaled_mm_takes_no_rowwise_scales(monkeypatch, request):
    """torch 2.11's CPU _scaled_mm raises an internal assertion on rowwise scales: the layer must
    then compute through the reference, not raise it."""
    real = torch._scaled_mm

    def per_tensor_only(a, b, scale_a, scale_b, **kwargs):
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("(scale_a.numel() == 1 && scale_b.numel() == 1) INTERNAL ASSERT FAILED")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    probe = getattr(float8_linear, "_cpu_takes_rowwise_scales", None)
    if probe is not None:  # asked afresh here, and again by the next test
        probe.cache_clear()
        request.addfinalizer(probe.cache_clear)
    g = _generator(0)
    x = torch.randn(5, 32, generator=g)
    stored = pack_weight(quantize(torch.randn(7, 32, generator=g) / 32**0.5, E4M3))
    args = (x, stored.qweight, stored.scale, None, None, None, None, None, 32, "e4m3", "e4m3", 0, 0)
    assert torch.equal(triton_linear.quant_linear_triton(*args), quant_linear_reference(*args))


def test_empty_batch_gives_an_empty_output():
    case = dict(m=0, n=6, k=64, w_bits=4, a_bits=4, w_group=0, a_group=0, symmetric=True, bias=False,
                dtype=torch.float32, mul=False, perm=False, rotation=None, seed=0)
    out = triton_linear.quant_linear_triton(*linear_arguments(case, torch.zeros(0, 64), dyadic=False))
    assert out.shape == (0, 6)


def _valid_arguments():
    case = dict(m=3, n=5, k=64, w_bits=4, a_bits=4, w_group=32, a_group=0, symmetric=True, bias=True,
                dtype=torch.float32, mul=False, perm=False, rotation=None, seed=0)
    return list(linear_arguments(case, torch.randn(3, 64), dyadic=False))


@pytest.mark.parametrize("index,value,message", [
    (0, torch.randn(3, 63), "x must be"),
    (0, torch.randint(0, 3, (3, 64)), "x must be float32"),
    (1, torch.zeros(5, 64, dtype=torch.uint8), "qweight for w_format='int4'"),
    (2, torch.ones(5, 3), "w_scale must be float32"),
    (4, torch.zeros(4), "bias must have shape"),
    (5, torch.ones(63), "act_mul must have shape"),
    (7, torch.eye(48), "act_rotation must be square"),
    (11, 48, "w_group must be 0"),
    (10, "int5", "unknown number format 'int5'"),
    (9, "none", "w_format must be a weight format"),
    (9, "e4m3", "e4m3 cannot be multiplied with activations in int4"),
])
def test_bad_arguments_raise_clear_errors(index, value, message):
    args = _valid_arguments()
    args[index] = value
    with pytest.raises(ValueError, match=message):
        triton_linear.quant_linear_triton(*args)


def test_cpu_tensors_without_the_interpreter_raise_a_runtime_error(monkeypatch):
    monkeypatch.setattr(triton_linear, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_linear.quant_linear_triton(*_valid_arguments())


def test_op_dispatch(monkeypatch):
    args = _valid_arguments()
    ref = quant_linear_reference(*args)
    assert torch.equal(torch.ops.clq.quant_linear(*args, "triton"), ref)

    # The op looks for triton only on its way to the kernels.
    find_spec = ops.importlib.util.find_spec

    def no_triton_lookup(name, *rest):
        assert name != "triton", "kernels='auto' must not take the Triton path for CPU tensors"
        return find_spec(name, *rest)

    monkeypatch.setattr(ops.importlib.util, "find_spec", no_triton_lookup)
    assert torch.equal(torch.ops.clq.quant_linear(*args, "auto"), ref)


def test_kernels_triton_without_triton_installed_raises(monkeypatch):
    find_spec = ops.importlib.util.find_spec
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "triton" else find_spec(name, *rest))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        torch.ops.clq.quant_linear(*_valid_arguments(), "triton")
