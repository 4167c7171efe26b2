"""What a matmul's accumulator is: the settings of low-precision accumulation, checked.

Two accumulator models (DESIGN.md, "Accumulation"):

* a float format (``FloatingPoint`` or a spec such as ``"fp16"``): every addition of a
  product into the accumulator is rounded once, correctly, to that format;
* ``AlignedSum(group, bits)``: the tensor-core model. The products are taken ``group`` at a
  time; the accumulator and the group's products are aligned to the largest exponent among
  them, each kept to ``bits`` bits below and including that leading bit (truncated toward
  zero, the bits shifted out are lost), summed exactly, and the sum is stored into a float32
  accumulator. DeepSeek-V3 (arXiv 2412.19437, §3.3 and §3.5.2) describes this for the FP8
  GEMMs of H800 ("about 14 bits" retained); Fasi et al. ("Numerical behavior of NVIDIA
  tensor cores", PeerJ CS 2021) measured it on V100/T4/A100 (groups of 4 or 8, 24 bits plus
  the accumulator, truncation), as do later bit-accurate models up to B200 (arXiv 2512.07004).

``Accumulation`` bundles an accumulator with its rounding mode and the promotion interval
``chunk``: one object per GEMM, which ``QuantizeMatmuls`` keeps per fprop, dgrad and wgrad.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lightning_lowp.formats import FloatingPoint, Format, as_format, check_rounding
from lightning_lowp.formats.base import check_int

__all__ = [
    "AlignedSum",
    "Accumulation",
    "AccumulatorLike",
    "as_accumulation",
    "check_accumulator",
    "check_chunk",
    "FLOAT32",
]

#: float32 as a FloatingPoint: the promotion accumulator (and AlignedSum's storage).
FLOAT32 = FloatingPoint(8, 23)

#: The roundings an AlignedSum's store into float32 accepts (the alignment always truncates).
ALIGNED_ROUNDINGS = ("toward_zero", "nearest")


@dataclass(frozen=True)
class AlignedSum:
    """The tensor-core accumulator: groups of ``group`` products aligned and kept to ``bits`` bits.

    For every group of ``group`` consecutive products (the last one may be shorter): let
    ``e`` be the largest exponent (``floor(log2|v|)``) among the nonzero finite accumulator
    and products; each of them is truncated toward zero to a multiple of ``2**(e - bits + 1)``;
    the truncated values are summed exactly; the sum is rounded to float32 (in the
    accumulation's rounding, ``"toward_zero"`` or ``"nearest"``; the sum needs at most
    ``bits + ceil(log2(group + 1))`` bits, so with ``bits <= 18`` and ``group <= 32`` it is
    exact). Inf and NaN propagate as in a float32 sum.

    Args:
        group: products per alignment group, 1..65536.
        bits: bits kept after alignment, counting the leading bit of the largest term, 2..32.
    """

    group: int = 32
    bits: int = 14

    def __post_init__(self) -> None:
        check_int("group", self.group, 1, 1 << 16, "products per alignment group")
        check_int("bits", self.bits, 2, 32, "bits kept after alignment")

    def __str__(self) -> str:
        return f"aligned({self.group},{self.bits})"


AccumulatorLike = FloatingPoint | AlignedSum | str

_ALIGNED_SPEC = re.compile(r"^\s*aligned\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")


def check_accumulator(accumulate: object, argument: str = "accumulate") -> FloatingPoint | AlignedSum:
    """The accumulator parsed (``"aligned(g,b)"`` is an ``AlignedSum``), or a ValueError naming ``argument``.

    A fixed-point, block or scaled format has no per-addition meaning here and is refused.
    """
    if isinstance(accumulate, AlignedSum):
        return accumulate
    if isinstance(accumulate, str):
        match = _ALIGNED_SPEC.match(accumulate)
        if match:
            return AlignedSum(int(match.group(1)), int(match.group(2)))
    if not isinstance(accumulate, (str, Format)):
        raise ValueError(
            f"{argument} must be a float format, a spec string or an lp.AlignedSum, got {type(accumulate).__name__}"
        )
    parsed = as_format(accumulate, argument)
    if not isinstance(parsed, FloatingPoint):
        raise ValueError(
            f"{argument}={parsed} is not a float format; an accumulator is a FloatingPoint "
            "(e.g. 'fp16', 'bf16', 'fp8_e4m3', 'float(5,9)') or an lp.AlignedSum (e.g. 'aligned(32,14)')"
        )
    return parsed


def check_chunk(chunk: object, argument: str = "chunk") -> int | None:
    """``chunk`` if it is a positive int or None, else a ValueError naming ``argument``."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{argument} must be a positive int or None, got {chunk!r}")
    return chunk


@dataclass(frozen=True)
class Accumulation:
    """How one GEMM accumulates: the accumulator, its rounding and the promotion interval.

    Args:
        accumulate: a float format or spec (every addition rounded to it) or an ``AlignedSum``
            (or ``"aligned(g,b)"``).
        rounding: the rounding of every addition (one of ``lp.ROUNDING_MODES``); for an
            ``AlignedSum``, of its store into float32 (``"toward_zero"`` or ``"nearest"``).
        chunk: add the accumulator into a float32 accumulator and reset it every ``chunk``
            products (promotion); ``None``: never. For an ``AlignedSum`` a multiple of its group.
    """

    accumulate: FloatingPoint | AlignedSum | str
    rounding: str = "nearest"
    chunk: int | None = None

    def __post_init__(self) -> None:
        acc = check_accumulator(self.accumulate, "accumulate")
        object.__setattr__(self, "accumulate", acc)
        check_rounding(self.rounding, "accumulate_rounding")
        check_chunk(self.chunk)
        if isinstance(acc, AlignedSum):
            if self.rounding not in ALIGNED_ROUNDINGS:
                raise ValueError(
                    f"accumulate_rounding={self.rounding!r} is not accepted with {acc} (the alignment "
                    f"truncates; the store into float32 rounds): accepted: {', '.join(ALIGNED_ROUNDINGS)}"
                )
            if self.chunk is not None and self.chunk % acc.group:
                raise ValueError(
                    f"chunk={self.chunk} must be a multiple of the group of {acc} (a promotion cannot split a group)"
                )

    @property
    def accumulator(self) -> FloatingPoint | AlignedSum:
        """``accumulate`` as parsed (never a spec string once constructed)."""
        acc = self.accumulate
        assert not isinstance(acc, str)  # __post_init__ parsed it
        return acc

    def __str__(self) -> str:
        text = str(self.accumulate)
        if self.rounding != "nearest":
            text += f",{self.rounding}"
        if self.chunk is not None:
            text += f",chunk={self.chunk}"
        return text


def as_accumulation(value: object, argument: str = "accumulate") -> Accumulation | None:
    """An ``Accumulation`` from one, from an accumulator (rounded to nearest, no chunks), or None."""
    if value is None or isinstance(value, Accumulation):
        return value
    return Accumulation(check_accumulator(value, argument))
