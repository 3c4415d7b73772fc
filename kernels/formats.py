"""Number formats: what one stored weight value or one quantized activation value is.

A format is one frozen object that knows

- its grid: the codes it holds (`qrange`), how a real value already divided by its scale becomes
  the nearest code (`encode`) and how a code becomes a value again (`decode`);
- its storage: how a weight's codes are laid out in the op's `qweight` tensor (`store`, `unpack`,
  `storage`) and which input widths that layout can hold (`width_problem`);
- its kernels: the compiled paths that compute with it (`kernels`: `INTEGER_GEMM`, `WEIGHT_ONLY`,
  `SCALED_MM`; kernels/triton_linear.py dispatches on them and on nothing else).

Scales are chosen by one quantizer for every format (kernels/quantize.py): s = max|v| / qmax per
row or group (symmetric), or (max - min) / (qmax - qmin) with a zero point (asymmetric, integer
formats only); a value v is stored as encode(v / s) and read as decode(code) · s.

| name | codes | stored as (weights) | compiled kernels |
|---|---|---|---|
| int3 | integers [-4, 3] | two bit planes, uint8 [N, 3K/8] | weight-only GEMM |
| int4 | integers [-8, 7] | two per byte, uint8 [N, K/2] | int8 tensor-core GEMM (Triton), weight-only GEMM |
| int8 | integers [-128, 127] | int8 [N, K] | int8 tensor-core GEMM (Triton), weight-only GEMM |
| e4m3 | float8 e4m3fn values, abs <= 448 | float8_e4m3fn [N, K] | torch._scaled_mm rowwise (sm_89+) |
| tlq3 / tlq4 | twin-log: ±max(a·2^e − c, 0), e in [-(2^(b-1) - 1), 0] (non-uniform) | as int3 / int4 | weight-only GEMM (decoding) |
| none | activations not quantized (the model's own dtype) | - | - |

The twin-log formats (LRQ-DiT's TLQ) are not scale-times-code: each weight row has its own
small table of 2^b values, held as four float32 parameters per row (`TwinLogFormat`), chosen by
their own search (passes/twin_log.py), and take the place of the integer format of the same width
in a `bits` mode (`slot`: a "w4a4" layer may hold tlq4 weights).

A new format is a subclass here (a non-uniform grid overrides encode / decode with its table; a
micro-scaled one such as nvfp4 / mxfp4 adds its fixed group and scale format), its entry in
`FORMATS`, its kernel dispatch and its tests.

The `bits` option names a pair of formats (`MODES`): "w4a8" is int4 weights with int8 activations,
"fp8" e4m3 for both, "w4a16" int4 weights with activations left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_int3, pack_int4, unpack_int3, unpack_int4


@dataclass(frozen=True)
class NumberFormat:
    """A number format (see the module docstring). `bits`: storage bits per value."""

    name: str
    bits: int

    @property
    def quantizes(self) -> bool:
        """False for "none": the values stay as they are."""
        return True

    @property
    def integer(self) -> bool:
        return False

    @property
    def asymmetric(self) -> bool:
        """Whether the format can hold a zero point (asymmetric ranges)."""
        return False

    @property
    def uniform(self) -> bool:
        """Whether a value is its code times a scale (minus a zero point): codes of two uniform
        formats multiply on a GEMM's integer or float8 path; a non-uniform weight is decoded first."""
        return True

    @property
    def slot(self) -> "NumberFormat":
        """The format whose place this one takes in a `bits` mode (itself, for the modes' own)."""
        return self

    code_dtype: torch.dtype = torch.int16  # the dtype of a `Quantized`'s codes
    kernels: tuple[str, ...] = ()  # the compiled paths below that compute with it; () for none

    def scale_shape(self, n: int, k: int, group: int | None) -> tuple[int, int]:
        """The shape of a weight's scale tensor: one float32 per row and group of K."""
        return n, k // (group or k)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group: int | None) -> torch.Tensor:
        """A weight's codes [N, K] (any dtype) -> float32 [N, K]: decode(code) · scale, group by group."""
        n, k = codes.shape
        g = group or k
        values = self.decode(codes.reshape(n, k // g, g), None if zero is None else zero.unsqueeze(-1))
        return (values * scale.float().unsqueeze(-1)).reshape(n, k)

    def qrange(self, symmetric: bool = True) -> tuple[float, float]:
        """The codes' range [qmin, qmax] (symmetric: centred on 0; else starting at 0)."""
        raise NotImplementedError

    def encode(self, t: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """t = v / s (float32) -> the nearest code, as float32 (plus the zero point, clamped)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes (any dtype) -> float32 values in units of the scale: code - zero."""
        values = codes.float()
        return values if zero is None else values - zero.float()

    def store(self, q: torch.Tensor, zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A weight's codes [N, K] (and zero points) -> (qweight, stored zero points) for the op."""
        raise NotImplementedError

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        """qweight -> the stored codes [N, K]: int8 for integers, the float8 dtype for e4m3."""
        raise NotImplementedError

    def storage(self, k: int) -> tuple[torch.dtype, int]:
        """(dtype, columns) of qweight for a weight with k input channels."""
        raise NotImplementedError

    def width_problem(self, k: int) -> str | None:
        """Why a weight with k input channels cannot be stored in this format, or None."""
        return None


@dataclass(frozen=True)
class IntegerFormat(NumberFormat):
    """b-bit two's-complement integers (storage: kernels/packing.py). Kernels: as the constants
    below give them (int4 / int8 both paths, int3 the weight-only GEMM; the other widths none)."""

    @property
    def integer(self) -> bool:
        return True

    @property
    def asymmetric(self) -> bool:
        return True

    def qrange(self, symmetric: bool = True) -> tuple[int, int]:
        if symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def encode(self, t: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        qmin, qmax = self.qrange(zero is None)
        rounded = torch.round(t)
        return (rounded if zero is None else rounded + zero).clamp(qmin, qmax)

    def store(self, q, zero):
        # Signed storage: an asymmetric q in [0, 2^b - 1] and its zero point shift by 2^(b-1), so
        # q - zero (the value) is unchanged and the GEMM multiplies signed operands.
        if zero is not None:
            offset = 2 ** (self.bits - 1)
            q, zero = q - offset, (zero - offset).to(torch.int8)
        if self.bits == 4:
            return pack_int4(q), zero
        if self.bits == 3:
            return pack_int3(q), zero
        return q.to(torch.int8), zero

    def unpack(self, qweight):
        if self.bits == 4:
            return unpack_int4(qweight)
        if self.bits == 3:
            return unpack_int3(qweight)
        return qweight

    def storage(self, k):
        if self.bits == 4:
            return torch.uint8, k // 2
        if self.bits == 3:
            return torch.uint8, 3 * k // 8
        return torch.int8, k

    @property
    def width_multiple(self) -> int:
        """Input widths the storage holds are multiples of this: two int4 per byte, int3 bit planes
        of eight values."""
        return {4: 2, 3: 8}.get(self.bits, 1)

    def width_problem(self, k):
        if k % self.width_multiple == 0:
            return None
        if self.bits == 4:
            return f"input width {k} is odd: 4-bit packing needs an even width"
        return f"input width {k} is not a multiple of {self.width_multiple}: {self.bits}-bit packing needs one"


@dataclass(frozen=True)
class Float8Format(NumberFormat):
    """float8 e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, finite values up to ±448, no infinities.

    Encoding rounds to nearest (ties to even, torch's cast) after clamping to ±448: the cast alone
    would turn anything beyond the largest finite value into NaN. NaN stays NaN.
    """

    code_dtype: torch.dtype = torch.float8_e4m3fn
    kernels: tuple[str, ...] = ("scaled_mm",)  # SCALED_MM

    def qrange(self, symmetric: bool = True) -> tuple[float, float]:
        if not symmetric:
            raise ValueError(f"{self.name} is a symmetric format: it has no zero point")
        top = torch.finfo(self.code_dtype).max
        return -top, top

    def encode(self, t, zero):
        if zero is not None:
            raise ValueError(f"{self.name} is a symmetric format: it has no zero point")
        qmin, qmax = self.qrange()
        return t.clamp(qmin, qmax).to(self.code_dtype).float()

    def store(self, q, zero):
        return q.to(self.code_dtype), None

    def unpack(self, qweight):
        return qweight

    def storage(self, k):
        return self.code_dtype, k


@dataclass(frozen=True)
class TwinLogFormat(IntegerFormat):
    """LRQ-DiT's twin-log quantization (TLQ): per row, positive and negative weights on two log2 grids.

    A code c in [-L, L - 1], L = 2^(b-1), is a sign and a magnitude index m (c = m for the positive
    branch, c = -1 - m for the negative one, m in [0, L - 1]); with e = m - (L - 1) in [-(L-1), 0]

        value(c) = +max(a⁺ · 2^e − c⁺, 0)   (c >= 0),      value(c) = −max(a⁻ · 2^e − c⁻, 0)   (c < 0),

    where (a, c) of a branch are s / (1 − η) and s · η / (1 − η): the grid 2^e shifted down by η and
    stretched back so that its top level is the branch's clipping bound s (LRQ-DiT's ±(2^q − η)).
    η = 0 is the plain log2 grid (levels s, s/2, s/4, ...); a larger η thins the levels near zero and
    brings in exact zeros. The per-row parameters are the scale tensor, float32 [N, 4] =
    (a⁺, c⁺, a⁻, c⁻); the codes are stored as the b-bit integers they are (kernels/packing.py), so
    a tlq4 row costs what an int4 row does plus 16 bytes. Rows only: no groups, no zero points.
    The codes come from passes/twin_log.py (η and the clipping bounds searched per row).
    """

    kernels: tuple[str, ...] = ("weight-only",)  # WEIGHT_ONLY, decoding

    @property
    def integer(self) -> bool:
        return False

    @property
    def asymmetric(self) -> bool:
        return False

    @property
    def uniform(self) -> bool:
        return False

    @property
    def slot(self) -> NumberFormat:
        return integer_format(self.bits)

    @property
    def levels(self) -> int:
        """L = 2^(b-1): magnitudes per branch."""
        return 2 ** (self.bits - 1)

    def encode(self, t, zero):
        raise ValueError(f"{self.name} values are not a code times a scale: quantize with passes/twin_log.py")

    def scale_shape(self, n, k, group):
        if group:
            raise ValueError(f"{self.name} has one set of parameters per row: it takes no weight groups")
        return n, 4

    def dequantize(self, codes, scale, zero, group):
        if zero is not None or group:
            raise ValueError(f"{self.name} weights have no zero points and no groups")
        c = codes.to(torch.int32)
        positive = c >= 0
        m = torch.where(positive, c, -1 - c)
        power = torch.exp2((m - (self.levels - 1)).float())
        p = scale.float()
        a = torch.where(positive, p[:, 0:1], p[:, 2:3])
        shift = torch.where(positive, p[:, 1:2], p[:, 3:4])
        magnitude = (a * power - shift).clamp(min=0)
        return torch.where(positive, magnitude, -magnitude)


@dataclass(frozen=True)
class Unquantized(NumberFormat):
    """Activations left in the model's own dtype (weight-only modes)."""

    @property
    def quantizes(self) -> bool:
        return False


# The compiled paths a format's `kernels` can name (kernels/triton_linear.py): the integer
# tensor-core GEMM after the quantize kernel (both operands' formats must name it), the
# weight-only GEMM that dequantizes or decodes the weight in registers, torch._scaled_mm.
INTEGER_GEMM, WEIGHT_ONLY, SCALED_MM = "integer-gemm", "weight-only", "scaled_mm"

INT3 = IntegerFormat("int3", 3, kernels=(WEIGHT_ONLY,))
INT4, INT8 = (IntegerFormat(f"int{b}", b, kernels=(INTEGER_GEMM, WEIGHT_ONLY)) for b in (4, 8))
E4M3 = Float8Format("e4m3", 8)
NONE = Unquantized("none", 16)
TLQ3, TLQ4 = TwinLogFormat("tlq3", 3), TwinLogFormat("tlq4", 4)
FORMATS: dict[str, NumberFormat] = {f.name: f for f in (INT3, INT4, INT8, E4M3, NONE, TLQ3, TLQ4)}
# The non-uniform weight format of each integer width that has one (recipe lrq-dit).
TWIN_LOG = {3: TLQ3, 4: TLQ4}

# The `bits` option: (weight format, activation format); None for the model left as it is.
MODES: dict[str, tuple[NumberFormat | None, NumberFormat | None]] = {
    "w4a4": (INT4, INT4), "w4a8": (INT4, INT8), "w8a8": (INT8, INT8), "fp8": (E4M3, E4M3),
    "w3a16": (INT3, NONE), "w4a16": (INT4, NONE), "w8a16": (INT8, NONE), "w16a16": (None, None),
}


def get_format(name: str) -> NumberFormat:
    """The format called `name` ("int4", "e4m3", ...)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown number format {name!r}; the formats are {', '.join(FORMATS)}") from None


def integer_format(bits: int) -> IntegerFormat:
    """The b-bit integer grid, 2 <= b <= 8. Only those in FORMATS (3, 4, 8 bits) have a storage
    layout the op reads; the others serve the quantizers' math (e.g. GPTQ studies at 2 bits)."""
    if type(bits) is not int or not 2 <= bits <= 8:
        raise ValueError(f"integer formats have 2 to 8 bits; got {bits!r}")
    return FORMATS.get(f"int{bits}") or IntegerFormat(f"int{bits}", bits)


def as_format(fmt: NumberFormat | int) -> NumberFormat:
    """A number format; an integer b is the b-bit integer format."""
    return integer_format(fmt) if isinstance(fmt, int) else fmt


def mode_name(weights: NumberFormat, activations: NumberFormat) -> str:
    """The `bits` option of a (weight, activation) pair, e.g. "w4a8"; "int4/e4m3" for pairs no mode names."""
    for name, pair in MODES.items():
        if pair == (weights.slot, activations):
            return name if weights.slot == weights else f"{name} ({weights.name} weights)"
    return f"{weights.name}/{activations.name}"


def check_pair(weights: NumberFormat, activations: NumberFormat) -> None:
    """Refuse a (weight, activation) pair no kernel or reference computes with."""
    if activations.quantizes and weights.uniform and weights.integer != activations.integer:
        raise ValueError(f"weights in {weights.name} cannot be multiplied with activations in "
                         f"{activations.name}: integer weights need integer (or unquantized) activations, "
                         f"float8 weights float8 ones")
