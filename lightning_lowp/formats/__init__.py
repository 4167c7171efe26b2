"""Number formats: pure descriptions, no torch ops.

A format says which values are representable; ``lightning_lowp.functional.quantize``
rounds a tensor onto that set. Formats are frozen dataclasses: immutable, comparable,
hashable, and ``parse_format(str(fmt)) == fmt`` for every format.

Spec grammar (accepted wherever a format is)::

    spec    := preset | call
    preset  := "fp32" | "bf16" | "fp16" | "fp8_e4m3" | "fp8_e5m2"
             | "fp6_e3m2" | "fp6_e2m3" | "fp4_e2m1"
    call    := name "(" int ("," int)* ("," key "=" value)* ")"
    name    := "fixed" | "float" | "bfp"
    value   := int | "true" | "false" | "none" | word

    fixed(8,7)                      FixedPoint(wl=8, fl=7)
    fixed(8,7,clamp=false,symmetric=true)
    float(5,10)                     FloatingPoint(exp=5, man=10)   (== fp16)
    float(4,3,specials=fn,overflow=saturate,subnormals=false)
    bfp(8)                          BlockFloatingPoint(wl=8)       (whole tensor one block)
    bfp(8,dim=0)                    one shared exponent per index along dim 0
    bfp(8,block_size=32)            blocks of 32 consecutive elements along the last dim

Spaces are ignored; names and keywords are case-insensitive.
"""

from lightning_lowp.formats.base import (
    OVERFLOWS,
    ROUNDING_MODES,
    SPECIALS,
    Format,
    FormatLike,
    check_bool,
    check_int,
    check_rounding,
)
from lightning_lowp.formats.block import BlockFloatingPoint
from lightning_lowp.formats.element import FixedPoint, FloatingPoint
from lightning_lowp.formats.scaled import SCALE_ROUNDINGS, SCALES, ScaledFormat
from lightning_lowp.formats.spec import PRESETS, as_format, parse_format

__all__ = [
    "Format",
    "FormatLike",
    "FixedPoint",
    "FloatingPoint",
    "BlockFloatingPoint",
    "ScaledFormat",
    "SCALES",
    "SCALE_ROUNDINGS",
    "ROUNDING_MODES",
    "SPECIALS",
    "OVERFLOWS",
    "PRESETS",
    "parse_format",
    "as_format",
    "check_rounding",
    "check_int",
    "check_bool",
]
