"""Compile a `@triton.jit` kernel for an NVIDIA GPU without one, and read what the binary does.

    binary = compile_kernel(kernel, args, "sm_90", config)
    binary.registers, binary.spill_bytes, binary.shared_bytes
    sass = binary.sass              # SassReport: the MMA instruction, the load kind, the loops
    sass.main_loop.count, sass.main_loop.int_alu_share

Triton's wheel carries `ptxas`, `cuobjdump` and `nvdisasm`, so `triton.compile` of an `ASTSource`
for a `GPUTarget` gives PTX and a cubin on any machine, no GPU needed. This module mimics
the JIT's specialization of a launch, so the binary is the one a GPU would run for those arguments:

- `args` maps every kernel parameter to its value (other names are ignored, so one dict can serve
  two versions of a kernel): `Pointer("bf16")` for a tensor (assumed 16-byte
  aligned, as torch allocations are), an int (a runtime i32; 1 becomes a constant and multiples of
  16 are marked divisible by 16, as the JIT does), a float (fp32), None (a constant None pointer),
  or the constant's value for a `tl.constexpr` parameter;
- `@triton.heuristics` wrapped around the kernel are applied to the arguments and the config;
- `autotune_configs` lists the configurations an autotuned kernel would try for these arguments:
  its own config list after its own `early_config_prune`, so it follows the kernel module.

Registers and spills come from ptxas' own report (`-v`), shared memory from Triton's metadata, the
rest from the SASS listing of `cuobjdump --dump-sass`.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

from clq_compile.kernels.triton_gemm import SHARED_MEMORY_LIMIT

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Target:
    """A GPU architecture to compile for, with the per-block shared memory a kernel may claim."""

    name: str
    capability: int
    shared_limit: int  # bytes of shared memory one block can use (opt-in maximum)


# Per-block shared memory maxima: the GEMM's own table, which its config pruning reads.
TARGETS = {name: Target(name, capability, SHARED_MEMORY_LIMIT[capability])
           for name, capability in (("sm_80", 80), ("sm_89", 89), ("sm_90", 90))}


@dataclass(frozen=True)
class Pointer:
    """A tensor argument: its element type as Triton spells it ("i8", "u8", "bf16", "fp32", ...)."""

    dtype: str


def have_toolchain() -> bool:
    """Whether this Triton wheel carries the tools an offline compile needs."""
    return all((NVIDIA_BIN / tool).exists() for tool in ("ptxas", "cuobjdump"))


def _innermost_jit(kernel: Any, args: dict[str, Any]) -> tuple[JITFunction, dict[str, Any]]:
    """The JITFunction under `kernel` and the arguments after its `@triton.heuristics`."""
    args = dict(args)
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Heuristics):
            for name, rule in kernel.values.items():
                args[name] = rule(args)
        elif isinstance(kernel, Autotuner):
            raise TypeError("compile_kernel takes one configuration: pass the autotuned kernel's `.fn` "
                            "and a config from `autotune_configs`")
        else:
            raise TypeError(f"expected a @triton.jit kernel; got {type(kernel).__name__}")
        kernel = kernel.fn
    return kernel, args


def autotune_configs(autotuner: Autotuner, args: dict[str, Any]) -> list[triton.Config]:
    """The configurations `autotuner` would compile for a launch with `args` (after its pruning)."""
    if not isinstance(autotuner, Autotuner):
        raise TypeError(f"expected a triton.autotune kernel; got {type(autotuner).__name__}")
    if autotuner.early_config_prune is None:
        return list(autotuner.configs)
    return list(autotuner.early_config_prune(autotuner.configs, args, **args))


def _specialize(fn: JITFunction, args: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) of ASTSource for `args`, as the JIT derives them."""
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"no value for the parameters {missing} of {fn.__name__}: give every parameter "
                         "of the kernel a value (see bench/offline_compile.py)")
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        is_one = isinstance(value, int) and not isinstance(value, bool) and value == 1
        if param.is_constexpr or value is None or (is_one and not param.do_not_specialize):
            signature[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, Pointer):
            signature[param.name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"parameter {param.name} of {fn.__name__} is not a tl.constexpr, so its value "
                            f"must be a Pointer, an int or a float; got {value!r}")
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return signature, constants, attrs


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")


_BINARIES: dict[tuple, Binary] = {}


def compile_kernel(kernel: Any, args: dict[str, Any], target: str,
                   config: triton.Config | None = None) -> Binary:
    """Compile `kernel` for `target` ("sm_80", "sm_89", "sm_90") as a launch with `args` and `config`.

    config: the meta-parameters and num_warps / num_stages (an autotune config), merged into args.
    Launches that specialize alike (say two shapes that differ only in runtime ints) share one
    binary: each distinct one is compiled once per process.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}; got {target!r}")
    if not have_toolchain():
        raise RuntimeError(f"this Triton wheel has no ptxas/cuobjdump in {NVIDIA_BIN}; offline compiles "
                           "need Triton's NVIDIA backend")
    if knobs.runtime.interpret:
        raise RuntimeError("offline compiles need a process without TRITON_INTERPRET=1 (under it Triton's own "
                           "library is interpreted and cannot be compiled): run them in a subprocess, as "
                           "tests/kernels/test_sm90_build.py runs bench/kernel_model.py")
    options, meta = {}, dict(args)
    if config is not None:
        meta.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.maxnreg is not None:
            options["maxnreg"] = config.maxnreg
    fn, meta = _innermost_jit(kernel, meta)
    signature, constants, attrs = _specialize(fn, meta)
    key = (fn.cache_key, target, tuple(signature.items()), tuple(constants.items()), tuple(attrs),
           tuple(sorted(options.items())))
    if key not in _BINARIES:
        _BINARIES[key] = _compile(fn, ASTSource(fn, signature, constants, attrs), target, options)
    return _BINARIES[key]


def _compile(fn: JITFunction, src: ASTSource, target: str, options: dict[str, int]) -> Binary:
    log = io.StringIO()
    # Triton prints ptxas' report only when it runs ptxas, so its cache is bypassed.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target].capability, 32),
                                  options=options)
    report = log.getvalue()
    registers = _PTXAS_REGISTERS.search(report)
    spills = _PTXAS_SPILLS.search(report)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas' report for {fn.__name__}:\n{report}")
    return Binary(name=fn.__name__, target=TARGETS[target], registers=int(registers.group(1)),
                  spill_bytes=int(spills.group(1)), shared_bytes=int(compiled.metadata.shared),
                  num_warps=compiled.metadata.num_warps, cubin=compiled.asm["cubin"], ptx=compiled.asm["ptx"])


@dataclass(frozen=True)
class Binary:
    """One compiled kernel: resources and code."""

    name: str
    target: Target
    registers: int  # per thread
    spill_bytes: int  # spill stores per thread, from ptxas -v
    shared_bytes: int  # per block
    num_warps: int
    cubin: bytes = field(repr=False)
    ptx: str = field(repr=False)

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= self.target.shared_limit

    @cached_property
    def sass(self) -> SassReport:
        """The disassembly of the cubin, parsed."""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.cubin)
            f.flush()
            listing = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "--dump-sass", f.name], check=True,
                                     capture_output=True, text=True).stdout
        return SassReport.parse(listing)


# SASS opcodes by the unit that executes them (the part before the first dot). Integer ALU: the
# operations the issue's "integer share" counts; uniform-datapath ops (U*) run once per warp on a
# separate unit and are counted apart.
INT_ALU = frozenset({"IADD3", "IADD", "IMAD", "IMUL", "IMNMX", "VIMNMX", "IABS", "ISETP", "ISCADD", "LEA",
                     "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT", "SEL", "SGXT", "BMSK", "BREV", "FLO",
                     "POPC", "VIADD", "IDP", "IDP4A", "BFE", "BFI", "I2I", "I2IP", "F2IP"})
FP32 = frozenset({"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSWZADD", "FCHK", "FRND"})
CONVERSIONS = frozenset({"F2I", "I2F", "F2F", "F2FP", "I2FP"})
MMA_OPCODES = ("IGMMA", "HGMMA", "QGMMA", "IMMA", "HMMA")
# Every division starts from a hardware reciprocal: a float32 one is MUFU.RCP refined by FFMAs (plus
# an operand check, FCHK, and a slow-path call when IEEE-rounded), an integer one by a runtime value
# is MUFU.RCP of its float conversion.
DIVISION = "MUFU.RCP"
_MMA_SHAPE = re.compile(r"^[A-Z]+\.(?:(\d+)x(\d+)x(\d+)|(\d{2})(\d)(\d+))")
# Hopper's wgmma (*GMMA) is issued by a warp group of 4 warps; mma.sync (IMMA/HMMA) by one warp.
_WARPS_PER_MMA = {"IGMMA": 4, "HGMMA": 4, "QGMMA": 4, "IMMA": 1, "HMMA": 1}


def mma_shape(opcode: str) -> tuple[int, int, int]:
    """(m, n, k) of one MMA instruction: "IGMMA.64x128x32.S8.S8" -> (64, 128, 32), "IMMA.16832" -> (16, 8, 32)."""
    m = _MMA_SHAPE.match(opcode)
    if m is None:
        raise ValueError(f"not a matrix-multiply opcode with a shape: {opcode}")
    dims = m.groups()[:3] if m.group(1) else m.groups()[3:]
    return tuple(int(d) for d in dims)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # full mnemonic with modifiers, e.g. "IGMMA.64x128x32.S8.S8"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass(frozen=True)
class Loop:
    """A loop of the listing: the instructions from a backward branch's target to the branch."""

    start: int
    end: int
    body: tuple[Instruction, ...] = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.body)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def opcode_count(self, names: frozenset[str] | tuple[str, ...]) -> int:
        return sum(1 for ins in self.body if ins.base in names)

    @property
    def int_alu_share(self) -> float:
        return self.opcode_count(INT_ALU) / max(self.count, 1)

    def mma_macs(self, num_warps: int) -> int:
        """Multiply-accumulates one trip of the body performs for the whole block of num_warps warps."""
        total = 0
        for ins in self.body:
            if ins.base in MMA_OPCODES:
                m, n, k = mma_shape(ins.opcode)
                total += m * n * k * (num_warps // _WARPS_PER_MMA[ins.base])
        return total


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"(?:^|[\s,])(0x[0-9a-f]+)\s*$")


@dataclass(frozen=True)
class SassReport:
    """What one kernel's SASS does: its instructions in address order and its loops."""

    instructions: tuple[Instruction, ...] = field(repr=False)

    @classmethod
    def parse(cls, listing: str) -> SassReport:
        instructions = [Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip())
                        for m in map(_LINE.search, listing.splitlines()) if m]
        if not instructions:
            raise ValueError("the SASS listing holds no instructions")
        return cls(tuple(instructions))

    @cached_property
    def loops(self) -> tuple[Loop, ...]:
        """Every backward branch (BRA to a lower address) with the instructions it repeats."""
        found = []
        for ins in self.instructions:
            if ins.base != "BRA":
                continue
            target = _BRANCH_TARGET.search(ins.operands)
            if target and int(target.group(1), 16) < ins.address:
                start = int(target.group(1), 16)
                body = tuple(i for i in self.instructions if start <= i.address <= ins.address)
                found.append(Loop(start, ins.address, body))
        return tuple(found)

    @cached_property
    def innermost_loops(self) -> tuple[Loop, ...]:
        return tuple(loop for loop in self.loops if not any(loop.contains(other) for other in self.loops))

    @cached_property
    def main_loop(self) -> Loop | None:
        """The innermost loop holding a matrix-multiply instruction, or else the longest innermost loop.

        For a GEMM that is the K loop: one trip of its body is one (possibly software-pipelined)
        K tile. None for straight-line code.
        """
        inner = self.innermost_loops
        if not inner:
            return None
        with_mma = [loop for loop in inner if loop.opcode_count(MMA_OPCODES)]
        return max(with_mma or inner, key=lambda loop: loop.count)

    def count(self, names: frozenset[str] | tuple[str, ...]) -> int:
        return sum(1 for ins in self.instructions if ins.base in names)

    def executed(self, trips: Callable[[Loop], int], names: frozenset[str] | None = None) -> int:
        """Instructions (whose base opcode is in `names`, default all) one thread executes, each loop's
        body repeated trips(loop) times (nested loops multiply). Branches not taken are counted too:
        an upper bound for code with rarely taken paths, such as a division's slow path."""
        return self._executed(trips, lambda ins: int(names is None or ins.base in names))

    def divisions(self, trips: Callable[[Loop], int]) -> int:
        """Divisions one thread executes (see DIVISION), loops repeated as in `executed`."""
        return self._executed(trips, lambda ins: int(ins.opcode.startswith(DIVISION)))

    def mma_macs(self, trips: Callable[[Loop], int], num_warps: int) -> dict[str, int]:
        """Multiply-accumulates the whole block of num_warps warps executes, by MMA opcode."""
        macs: dict[str, int] = {}
        for opcode in {ins.opcode for ins in self.instructions if ins.base in MMA_OPCODES}:
            m, n, k = mma_shape(opcode)
            per_issue = m * n * k * (num_warps // _WARPS_PER_MMA[opcode.split(".")[0]])
            macs[opcode] = per_issue * self._executed(trips, lambda ins: int(ins.opcode == opcode))
        return macs

    def _executed(self, trips: Callable[[Loop], int], weight: Callable[[Instruction], int]) -> int:
        total = 0
        for ins in self.instructions:
            w = weight(ins)
            if w:
                for loop in self.loops:
                    if loop.start <= ins.address <= loop.end:
                        w *= trips(loop)
                total += w
        return total

    @cached_property
    def mma(self) -> str:
        """The matrix-multiply instruction (e.g. "IGMMA.64x128x32.S8.S8"), the most frequent one; "none"."""
        counts: dict[str, int] = {}
        for ins in self.instructions:
            if ins.base in MMA_OPCODES:
                counts[ins.opcode] = counts.get(ins.opcode, 0) + 1
        return max(counts, key=counts.get) if counts else "none"

    @property
    def mma_family(self) -> str:
        """IGMMA / HGMMA / IMMA / HMMA / ... or "none"."""
        return self.mma.split(".")[0]

    @cached_property
    def load_kind(self) -> str:
        """How global memory reaches the kernel: "TMA" (bulk tensor copies), "cp.async" (LDGSTS) or "plain"."""
        bases = {ins.base for ins in self.instructions}
        if bases & {"UTMALDG", "UBLKCP"}:
            return "TMA"
        if "LDGSTS" in bases:
            return "cp.async"
        return "plain"
