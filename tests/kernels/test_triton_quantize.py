"""The activation-quantize kernel (kernels/triton_quantize.py) against the torch reference.

Under Triton's interpreter on CPU. Without a rotation the transform is elementwise, so the kernel
must equal the reference bit for bit on any data; with a fused rotation it sums in another order,
so bit-exact comparisons use dyadic activations and rotations whose sums are exact in any order
(see tests/kernels/test_triton_kernels.py). The last test compiles the kernel for sm_90 offline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

# Must be set before triton.jit functions are defined, i.e. before the kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clq_compile.kernels import triton_quantize  # noqa: E402
from clq_compile.kernels.hadamard import normalized_hadamard, random_hadamard  # noqa: E402
from tests.kernels.test_triton_kernels import (  # noqa: E402
    DTYPES,
    dyadic_activations,
    dyadic_rotation,
    reference_quantized,
    stored_integers,
    transform_options,
)

if not triton_quantize.interpreted():
    pytest.skip("the kernels were defined without TRITON_INTERPRET=1 (imported before this module)",
                allow_module_level=True)

# Widths with 1, 3, 5 and 9 units of 32 channels: per-token groups span several units.
WIDTHS = (32, 64, 96, 128, 160, 288)
FUSED_BLOCKS = (16, 32, 64, 128)
# Hadamard orders that are not powers of two: the wrapper rotates with the reference's transform.
OTHER_BLOCKS = (12, 20, 24, 36, 40)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quantized(x, bits, group, *transform):
    return triton_quantize.quantize_activation_triton(x, bits, group, *transform)


def assert_equal_to_reference(x, bits, group, transform):
    q, scale = quantized(x, bits, group, *transform)
    q_ref, scale_ref = reference_quantized(x, bits, group, *transform)
    assert q.dtype == q_ref.dtype and torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)


@st.composite
def cases(draw, blocks=FUSED_BLOCKS + OTHER_BLOCKS):
    k = draw(st.sampled_from(WIDTHS))
    group = draw(st.sampled_from([g for g in (None, 16, 32, 64) if g is None or k % g == 0]))
    rotation = draw(st.sampled_from([None, *[b for b in blocks if k % b == 0]]))
    return dict(m=draw(st.integers(1, 24)), k=k, bits=draw(st.sampled_from((4, 8))), group=group,
                rotation=rotation, mul=draw(st.booleans()), perm=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_equals_the_reference_bit_for_bit_on_exact_sums(case):
    x = dyadic_activations(case["m"], case["k"], case["seed"], case["dtype"])
    transform = transform_options(case["k"], case["seed"], case["mul"], case["perm"], case["rotation"],
                                  dyadic=True)
    assert_equal_to_reference(x, case["bits"], case["group"], transform)


def tie_heavy_activations(m: int, k: int, seed: int, bits: int) -> torch.Tensor:
    """[m, k] with row maximum qmax, so the scale is 1 and every half-integer is a rounding tie."""
    g = _generator(seed)
    qmax = 2 ** (bits - 1) - 1
    x = torch.randint(-2 * qmax, 2 * qmax + 1, (m, k), generator=g).float() / 2
    x[:, 0] = qmax
    return x


def rounding_stress(m: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[m, k]: heavy-tailed rows over 2^-30 .. 2^30, a quarter of the values near half-integer
    multiples of a float32 step (where v / scale rounds close to a tie), one row all zeros; all finite
    in dtype."""
    g = _generator(seed)
    x = torch.distributions.StudentT(3.0).sample((m, k)) if m * k else torch.zeros(m, k)
    x = x * 2.0 ** torch.randint(-30, 31, (m, 1), generator=g).float()
    step = x.abs().amax(dim=1, keepdim=True) / 7
    near = (torch.randint(-8, 8, (m, k), generator=g) + 0.5) * step
    x = torch.where(torch.rand(m, k, generator=g) < 0.25, near, x)
    x[m // 2] = 0
    limit = torch.finfo(dtype).max / 64
    return x.clamp(-limit, limit).to(dtype)


@settings(max_examples=40, deadline=None)
@given(cases(blocks=OTHER_BLOCKS), st.booleans())
def test_equals_the_reference_bit_for_bit_on_any_data_without_a_fused_rotation(case, ties):
    # The rounding and the scale have no slack: v / scale is computed without a division, and
    # must still give the reference's integers next to rounding ties.
    torch.manual_seed(case["seed"])
    if ties:
        x = tie_heavy_activations(case["m"], case["k"], case["seed"], case["bits"]).to(case["dtype"])
    else:
        x = rounding_stress(case["m"], case["k"], case["seed"], case["dtype"])
    transform = transform_options(case["k"], case["seed"], case["mul"], case["perm"], case["rotation"],
                                  dyadic=False)
    assert_equal_to_reference(x, case["bits"], case["group"], transform)


@settings(max_examples=15, deadline=None)
@given(cases(blocks=FUSED_BLOCKS), st.booleans())
def test_fused_orthonormal_rotations_match_to_the_last_bit(case, randomized):
    # A normalized Hadamard of 2·4^j channels has irrational entries: the kernel's and torch's sums
    # may round a transformed value differently in the last bit, which can move a scale by an ulp
    # and, very rarely, an integer across a rounding tie.
    m, k, bits, b = case["m"], case["k"], case["bits"], case["rotation"]
    x = torch.randn(m, k, generator=_generator(case["seed"])).to(case["dtype"])
    act_mul, act_perm, _ = transform_options(k, case["seed"], case["mul"], case["perm"], None, dyadic=False)
    rotation = None if b is None else random_hadamard(b, case["seed"]) if randomized else normalized_hadamard(b)
    q, scale = quantized(x, bits, case["group"], act_mul, act_perm, rotation)
    q_ref, scale_ref = reference_quantized(x, bits, case["group"], act_mul, act_perm, rotation)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    diff = (stored_integers(q, bits) - stored_integers(q_ref, bits)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3


def test_rotations_that_are_not_plus_minus_c_are_applied_by_the_reference_transform():
    g = _generator(0)
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0].float()
    x = torch.randn(9, 96, generator=g)
    assert_equal_to_reference(x, 4, None, (None, None, rotation))


@pytest.mark.parametrize("view", ["columns", "transposed"])
def test_strided_activations(view):
    g = _generator(1)
    base = dyadic_activations(64, 96, 1, torch.bfloat16)
    x = base[:, ::2] if view == "columns" else base[:48].t()
    transform = (None, torch.randperm(x.shape[1], generator=g), dyadic_rotation(16))
    assert_equal_to_reference(x, 4, None, transform)
    assert_equal_to_reference(x, 8, 16, (None, None, None))


def test_a_rotation_changed_in_place_is_seen():
    x = dyadic_activations(5, 32, 2, torch.float32)
    rotation = dyadic_rotation(16)
    assert_equal_to_reference(x, 4, None, (None, None, rotation))
    rotation[0] = -rotation[0]
    assert_equal_to_reference(x, 4, None, (None, None, rotation))
    rotation[1, 1] *= 0.5  # no longer ±c: the reference transform rotates
    assert_equal_to_reference(x, 4, None, (None, None, rotation))


def test_rounding_is_half_to_even_like_torch_round():
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -6.5, 0.49999997,
                       -0.49999997, 2.5000002]])
    q, scale = quantized(x, 4, None)
    assert scale.item() == 1.0
    assert torch.equal(stored_integers(q, 4)[0], torch.round(x[0]).to(torch.int16))


@settings(max_examples=20, deadline=None)
@given(cases(blocks=FUSED_BLOCKS + OTHER_BLOCKS), st.data())
def test_a_nan_or_inf_poisons_its_group_scale_and_leaves_the_others_alone(case, data):
    # GPU min/max drop NaN: without explicit propagation a NaN activation would quantize as if it
    # were not there.
    m, k, bits, group = case["m"], case["k"], case["bits"], case["group"]
    x = dyadic_activations(m, k, case["seed"], case["dtype"])
    row, col = data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, k - 1))
    x[row, col] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    transform = transform_options(k, case["seed"], case["mul"], case["perm"], case["rotation"], dyadic=True)
    q, scale = quantized(x, bits, group, *transform)
    q_ref, scale_ref = reference_quantized(x, bits, group, *transform)
    poisoned = ~scale_ref.isfinite()
    assert poisoned.any() and torch.equal(scale.isnan(), scale_ref.isnan())
    assert torch.equal(scale[~scale.isnan()], scale_ref[~scale_ref.isnan()])
    clean_rows = ~poisoned.any(dim=1)
    assert torch.equal(q[clean_rows], q_ref[clean_rows])


def test_two_tiles_with_a_fused_rotation(monkeypatch):
    # 36 units of 16 channels per token: with programs of at most 256 values, tiles of 32 and 16
    # rows (a dot takes at least 16).
    monkeypatch.setattr(triton_quantize, "INTERPRETER_MAX_ELEMENTS", 256)
    triton_quantize.launch_parameters.cache_clear()
    try:
        meta, _ = triton_quantize.launch_parameters(3, 576, 4, 576, 16, False, False, True, 1, 1)
        assert (meta["BR"], meta["BR2"]) == (32, 16)
        x = dyadic_activations(3, 576, 3, torch.bfloat16)
        assert_equal_to_reference(x, 4, None, (None, None, dyadic_rotation(16)))
    finally:
        triton_quantize.launch_parameters.cache_clear()


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 20000), k=st.sampled_from([288, 1152, 1536, 3072, 4608, 12288, 1000, 96]),
       group=st.sampled_from([None, 32, 64, 128]), rotation=st.sampled_from([None, 16, 64, 128]),
       sms=st.sampled_from([1, 108, 132]))
def test_plans_tile_whole_groups(m, k, group, rotation, sms):
    g = group or k
    if k % g or (rotation is not None and (k % rotation or (g % rotation and rotation % g))):
        return
    p = triton_quantize.plan(m, k, g, rotation, triton_quantize.GPU_MIN_ELEMENTS, triton_quantize.GPU_MAX_ELEMENTS, sms)
    assert p.unit & (p.unit - 1) == 0 and p.br & (p.br - 1) == 0 and p.br2 & (p.br2 - 1) == 0
    assert (p.seg == 1 or p.nsub == 1) and p.seg * p.unit // p.nsub == g
    assert 1 <= p.spp and p.spp * p.seg == p.units_per_program <= p.rows and p.br2 < p.br
    if rotation is not None:
        assert p.br >= triton_quantize.MIN_DOT and p.br2 in (0, *range(triton_quantize.MIN_DOT, p.br))
    assert p.rows * p.unit <= triton_quantize.GPU_MAX_ELEMENTS or p.spp == 1
    assert p.rows * p.unit >= triton_quantize.GPU_MIN_ELEMENTS


@pytest.mark.parametrize("rotation", [None, 128])
@pytest.mark.parametrize("k, group", [(1152, None), (3072, None), (1152, 128), (4608, None), (12288, None)])
def test_a_thousand_tokens_spread_evenly_over_an_h100(k, group, rotation):
    # The busiest multiprocessor's rows, padding included: the quantize kernel is issue-bound near
    # its bandwidth floor, so they are its time. A token of 9 units in one power-of-two tile, or
    # 147 programs on 132 multiprocessors, takes 128 rows where 69.8 would do.
    p = triton_quantize.plan(1024, k, group or k, rotation, triton_quantize.GPU_MIN_ELEMENTS,
                             triton_quantize.GPU_MAX_ELEMENTS, 132)
    units = 1024 * (k // p.unit)
    programs = -(-units // p.units_per_program)
    assert -(-programs // 132) * p.rows <= 1.15 * units / 132


def test_launch_parameters_are_cached_and_read_only():
    x = torch.zeros(3, 96)
    triton_quantize.launch_parameters.cache_clear()
    for _ in range(2):
        quantized(x, 4, None)
    assert triton_quantize.launch_parameters.cache_info().hits == 1
    meta, _ = triton_quantize.launch_parameters(3, 96, 4, 96, None, False, False, True, 3, 1)
    with pytest.raises(TypeError):
        meta["BR"] = 1


# Compiles for sm_90 in a fresh interpreter (this one defined the kernels under TRITON_INTERPRET=1).
SM90_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
import offline_compile as oc
from clq_compile.kernels import triton_quantize as tq
out = {}
for rotation in (128, None):
    meta, programs = tq.launch_parameters(1024, 1152, 4, 1152, rotation, False, False, True, 1, 132)
    config = triton.Config({}, num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    args = dict(x_ptr=oc.Pointer("bf16"), mul_ptr=None, perm_ptr=None, rot_ptr=oc.Pointer("fp32"),
                signs_ptr=oc.Pointer("bf16"), q_ptr=oc.Pointer("u8"), scale_ptr=oc.Pointer("fp32"),
                stride_xm=1152, stride_xk=1, **meta)
    binary = oc.compile_kernel(tq._quantize_kernel, args, "sm_90", config)
    sass = binary.sass
    rows = meta["BR"] + meta["BR2"]
    out[str(rotation)] = dict(values=rows * meta["U"] // (32 * binary.num_warps),
                              mma=sorted({i.base for i in sass.instructions if i.base in oc.MMA_OPCODES}),
                              ffma=sass.count(frozenset({"FFMA"})), total=len(sass.instructions),
                              divisions=sass.divisions(lambda loop: 1), loops=len(sass.loops),
                              spills=binary.spill_bytes, busiest_rows=-(-programs // 132) * rows)
print(json.dumps(out))
"""


def test_sm90_binary_has_no_per_value_division_and_rotates_on_tensor_cores():
    bench = Path(__file__).resolve().parents[2] / "bench"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SM90_PROBE, str(bench)], capture_output=True, text=True, env=env,
                         timeout=600)
    if "no ptxas/cuobjdump" in run.stderr:
        pytest.skip("this Triton wheel cannot compile for NVIDIA GPUs offline")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    rotated, plain = report["128"], report["None"]
    # wgmma for the 64-row tile (mma.sync for the 16-row one); none without a rotation.
    assert "HGMMA" in rotated["mma"] and plain["mma"] == []
    for r in (rotated, plain):
        # Straight-line code: the listing is what one thread executes, for r["values"] values.
        assert r["loops"] == 0 and r["spills"] == 0
        assert r["divisions"] <= r["values"] // 4, "a division per value (or close to it) is back"
        assert r["ffma"] <= 4 * r["values"], "the rotation (or the rounding) multiplies on FFMA again"
        # 1024 tokens of 9 units: 9216 / 132 = 69.8 rows per multiprocessor would be no padding.
        assert r["total"] <= 20 * r["values"] and r["busiest_rows"] <= 80
