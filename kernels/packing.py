"""Storage format of quantized weights, as the `clq::quant_linear` op and its kernels read them.

Every stored integer is signed: an asymmetric b-bit weight q in [0, 2^b - 1] with zero point z is
stored as q - 2^(b-1) with zero point z - 2^(b-1) (the difference q - z, and so the dequantized
value, is unchanged). The integer GEMM then always multiplies signed operands, and asymmetry costs
only a zero-point correction through the activation's row sums.

4-bit values are packed two per byte along K: byte j of a row holds element 2j in its low nibble
and element 2j + 1 in its high nibble, both as 4-bit two's complement.

3-bit values (two's complement, [-4, 3]) are stored as two bit planes, so that unpacking is two
shifts and an OR, with no value straddling a byte: a row of K values (K divisible by 8) is
K / 4 bytes of low two bits (byte j holds element 4j + i in bits 2i, 2i + 1) followed by K / 8
bytes of high bits (byte K / 4 + j holds element 8j + i's third bit in bit i): 3K / 8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .formats import NumberFormat
    from .quantize import Quantized


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: integer [..., K] with values in [-8, 7], K even -> uint8 [..., K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of columns; got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("4-bit packing needs values in [-8, 7]")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [..., K // 2] -> int8 [..., K] with values in [-8, 7]."""
    # Shifting the nibble into the top of a signed byte and back sign-extends it.
    low = (packed.view(torch.int8) << 4) >> 4
    high = packed.view(torch.int8) >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """q: integer [..., K] with values in [-4, 3], K divisible by 8 -> uint8 [..., 3K // 8]."""
    if q.shape[-1] % 8:
        raise ValueError(f"3-bit packing needs a multiple of 8 columns; got {q.shape[-1]}")
    if q.numel() and (q.min() < -4 or q.max() > 3):
        raise ValueError("3-bit packing needs values in [-4, 3]")
    bits = (q.to(torch.int16) & 0x7).to(torch.uint8)
    low = (bits & 0x3).unflatten(-1, (-1, 4))
    high = (bits >> 2).unflatten(-1, (-1, 8))
    low = sum(low[..., i] << (2 * i) for i in range(4))
    high = sum(high[..., i] << i for i in range(8))
    return torch.cat([low, high], dim=-1)


def unpack_int3(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [..., 3K // 8] -> int8 [..., K] with values in [-4, 3]."""
    k = packed.shape[-1] // 3 * 8
    low, high = packed[..., :k // 4], packed[..., k // 4:]
    low = torch.stack([(low >> (2 * i)) & 0x3 for i in range(4)], dim=-1).flatten(-2)
    high = torch.stack([(high >> i) & 0x1 for i in range(8)], dim=-1).flatten(-2)
    bits = (low | (high << 2)).view(torch.int8)
    # Three bits moved to the top of a signed byte and back sign-extend.
    return (bits << 5) >> 5


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight in the op's storage format.

    qweight: as format.storage(K) says: uint8 [N, K // 2] (int4), int8 [N, K] (int8),
             uint8 [N, 3K // 8] (int3), float8_e4m3fn [N, K] (e4m3)
    scale:   float32 [N, K // group]
    zero:    int8 [N, K // group] (signed, shifted as the module docstring says) or None
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    format: NumberFormat
    in_features: int
    group: int | None

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def nbytes(self) -> int:
        """Bytes held by the integers, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def pack_weight(w: Quantized) -> PackedWeight:
    """Turn a quantized weight (signed or asymmetric) into the op's storage format."""
    qweight, zero = w.format.store(w.q, w.zero)
    return PackedWeight(qweight, w.scale.float().contiguous(), zero, w.format, w.q.shape[1], w.group)


def unpack_weight(qweight: torch.Tensor, fmt: NumberFormat | int) -> torch.Tensor:
    """The stored codes of a weight [N, K]: int8 for integer formats (an integer b names the b-bit
    one), float8 for e4m3."""
    from .formats import as_format  # formats imports this module's packers

    return as_format(fmt).unpack(qweight)
