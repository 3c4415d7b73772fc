"""The SASS reading of bench/offline_compile.py on hand-written listings (no compile needed)."""

from __future__ import annotations

import pytest

from tests.bench.bench_scripts import import_bench

(offline_compile,) = import_bench("offline_compile")
SassReport = offline_compile.SassReport


def listing(*lines: tuple[int, str]) -> str:
    """A cuobjdump-style listing: one `/*addr*/  INSTRUCTION ;  /* encoding */` line per entry."""
    return "\n".join(f"        /*{addr:04x}*/                   {text} ;      /* 0x000000000000 */"
                     for addr, text in lines)


# A K loop (0x0100..0x0170) with two wgmmas and integer unpacking, after a setup loop without MMA
# (0x0030..0x0050); the reciprocal at 0x0120 sits inside the K loop.
GEMM_LIKE = listing(
    (0x0000, "S2R R0, SR_TID.X"),
    (0x0010, "LDGSTS.E.BYPASS.128 [R21], desc[UR26][R32.64], P4"),
    (0x0030, "IADD3 R1, R1, 0x1, RZ"),
    (0x0040, "ISETP.GE.AND P0, PT, R1, R2, PT"),
    (0x0050, "@!P0 BRA 0x30"),
    (0x0100, "PRMT R4, R5, 0x8880, RZ"),
    (0x0110, "LOP3.LUT R6, R4, 0xf, RZ, 0xc0, !PT"),
    (0x0120, "MUFU.RCP R7, R7"),
    (0x0130, "WARPGROUP.ARRIVE"),
    (0x0140, "IGMMA.64x128x32.S8.S8 R88, R152, gdesc[UR20], R88"),
    (0x0150, "IGMMA.64x128x32.S8.S8 R24, R152, gdesc[UR12], R24, gsb0"),
    (0x0160, "FADD R8, R8, R9"),
    (0x0170, "@P6 BRA 0x100"),
    (0x0180, "EXIT"),
    (0x0190, "BRA 0x190"),
)


def test_loops_are_backward_branches_with_their_bodies():
    sass = SassReport.parse(GEMM_LIKE)
    assert [(loop.start, loop.end, loop.count) for loop in sass.loops] == [(0x30, 0x50, 3), (0x100, 0x170, 8)]


def test_main_loop_is_the_one_with_the_mma_even_when_not_the_first():
    sass = SassReport.parse(GEMM_LIKE)
    assert sass.main_loop.start == 0x100
    assert sass.main_loop.int_alu_share == pytest.approx(2 / 8)
    # Two 64x128x32 wgmmas per trip, each issued by the 4 warps of a warp group: 8 warps = 2 groups.
    assert sass.main_loop.mma_macs(num_warps=8) == 2 * 64 * 128 * 32 * 2


def test_main_loop_without_mma_is_the_longest_innermost_loop():
    sass = SassReport.parse(listing((0x00, "FADD R1, R1, R2"), (0x10, "BRA 0x0"),
                                    (0x20, "FADD R1, R1, R2"), (0x30, "FMUL R1, R1, R2"), (0x40, "BRA 0x20")))
    assert sass.main_loop.start == 0x20


def test_straight_line_code_has_no_main_loop():
    sass = SassReport.parse(listing((0x00, "FADD R1, R1, R2"), (0x10, "EXIT")))
    assert sass.main_loop is None
    assert sass.mma == "none"


def test_instruction_kinds():
    sass = SassReport.parse(GEMM_LIKE)
    assert sass.mma == "IGMMA.64x128x32.S8.S8"
    assert sass.mma_family == "IGMMA"
    assert sass.load_kind == "cp.async"
    tma = listing((0x0, "UTMALDG.2D [UR8], [UR4]"), (0x10, "LDGSTS [R1], [R2.64]"))
    assert SassReport.parse(tma).load_kind == "TMA"
    assert SassReport.parse(listing((0x0, "LDG.E.128 R4, desc[UR4][R2.64]"))).load_kind == "plain"


@pytest.mark.parametrize("opcode, shape", [("IGMMA.64x128x32.S8.S8", (64, 128, 32)),
                                           ("IMMA.16832.S8.S8.SAT", (16, 8, 32)),
                                           ("HMMA.16816.F32.BF16", (16, 8, 16)), ("HMMA.1688.F32.TF32", (16, 8, 8))])
def test_mma_shape(opcode, shape):
    assert offline_compile.mma_shape(opcode) == shape


def test_executed_counts_repeat_loop_bodies():
    sass = SassReport.parse(GEMM_LIKE)

    def trips(loop):
        return 10 if loop.start == 0x100 else 3

    # 4 instructions outside loops, 3 in the setup loop (x3), 8 in the K loop (x10).
    assert sass.executed(trips) == 4 + 3 * 3 + 8 * 10
    assert sass.executed(trips, offline_compile.INT_ALU) == 2 * 3 + 2 * 10
    assert sass.divisions(trips) == 10
    assert sass.mma_macs(trips, num_warps=4) == {"IGMMA.64x128x32.S8.S8": 2 * 10 * 64 * 128 * 32}


def test_empty_listing_is_refused():
    with pytest.raises(ValueError, match="no instructions"):
        SassReport.parse("Fatbin elf code:\n")


def test_compiling_under_the_interpreter_says_what_to_do():
    if not offline_compile.have_toolchain() or not offline_compile.knobs.runtime.interpret:
        pytest.skip("needs Triton's ptxas and a session under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        offline_compile.compile_kernel(object(), {}, "sm_90")
