"""Scaled formats: a block of values shares a scale, each element is stored in a small format.

OCP microscaling (MXFP8, MXFP6, MXFP4, MXINT8), NVIDIA's NVFP4, and FP8 with per-tensor,
per-row or per-tile scales are all one description here: an element-wise format composed with
a scale rule. A block of values ``x`` with largest finite magnitude ``amax`` gets a scale ``s``;
each element is stored as ``q`` in the element format and means ``s * q``.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass
from typing import Any, ClassVar, Literal

from lightning_lowp.formats.base import SPECIALS, Format, check_bool, check_int
from lightning_lowp.formats.element import FixedPoint, FloatingPoint

__all__ = ["ScaledFormat", "SCALES", "SCALE_ROUNDINGS", "BlockShape"]

#: The formats a block's scale is stored in: a power of two (OCP's E8M0), NVFP4's E4M3 block
#: scale, or a float32 scale (torchao's and DeepSeek-V3's FP8 recipes).
SCALES = ("e8m0", "fp8_e4m3", "fp32")
#: How an E8M0 scale is chosen from a block's amax, as torchao's ``ScaleCalculationMode``:
#: ``floor`` 2^(floor(log2 amax) - emax) (OCP MX v1.0), ``ceil`` 2^(ceil(log2 amax) - emax),
#: ``even`` floor after rounding amax to the element's mantissa width, ``rceil``
#: 2^ceil(log2(amax / max_element)). (emax: the exponent of the element's largest value.)
SCALE_ROUNDINGS = ("floor", "ceil", "even", "rceil")
#: Float scales are ``amax / max_element`` rounded to nearest in the scale's format.
_FLOAT_SCALE_ROUNDING = "nearest"

#: ``k`` consecutive elements along ``dim``, an ``(rows, cols)`` tile over the last two dims,
#: all of ``dim`` (``"row"``), or the whole tensor (``"tensor"``).
BlockShape = int | tuple[int, int] | Literal["row", "tensor"]

# How the kernels are told a block of all of dim, or of the whole tensor (cpp/vocabulary.h).
_ROW, _WHOLE_TENSOR = -1, 0

_BLOCK_HINT = "a positive int, a (rows, cols) tile of positive ints, 'row' or 'tensor'"


@dataclass(frozen=True)
class ScaledFormat(Format):
    """Blocks of values that share a scale, elements in an element-wise format.

    Elements are rounded in any of the six rounding modes and saturate at the element's
    largest finite value (whatever the element's own ``overflow`` says). A block's scale comes
    from its largest finite magnitude: Inf and NaN are left out of it, as in block floating
    point. An all-zero block stays zero; NaN stays NaN; ±Inf saturates to ±(scale · the
    element's largest value).

    Args:
        element: the element format: a ``FloatingPoint`` (MXFP*, NVFP4, FP8) or a
            ``FixedPoint`` (MXINT8), or its spec string.
        block: ``k`` consecutive elements along ``dim`` (a shorter last run is its own block),
            a ``(rows, cols)`` tile over the last two dims, ``"row"`` (all of ``dim``), or
            ``"tensor"`` (one scale).
        dim: the dim the blocks of ``k`` and the rows run along (default: the last).
        scale: ``"e8m0"`` (a power of two 2^e, e in -127..127), ``"fp8_e4m3"`` or ``"fp32"``.
        scale_rounding: for ``"e8m0"``: ``floor`` (OCP MX v1.0), ``ceil``, ``even`` or
            ``rceil`` (torchao's ``ScaleCalculationMode``); float scales are always rounded
            to nearest (``"nearest"``).
        tensor_scale: NVFP4's second level: a float32 scale for the whole tensor,
            amax / (448 · max_element), under ``fp8_e4m3`` block scales.

    Example:
        >>> mx = lp.ScaledFormat("fp8_e4m3", block=32, scale_rounding="rceil")
        >>> str(mx)
        'mx(fp8_e4m3,32,scale_rounding=rceil)'
    """

    element: FixedPoint | FloatingPoint
    block: BlockShape = 32
    dim: int = -1
    scale: str = "e8m0"
    scale_rounding: str = "floor"
    tensor_scale: bool = False

    spec_name: ClassVar[str] = "mx"
    positional_names: ClassVar[tuple[str, ...]] = ("element", "block")
    kernel_kind: ClassVar[str] = "scaled"

    def __post_init__(self) -> None:
        element: Any = self.element
        if isinstance(element, str):
            from lightning_lowp.formats.spec import as_format  # (the spec grammar knows this class)

            element = as_format(element, "element")
            object.__setattr__(self, "element", element)
        if not isinstance(element, (FixedPoint, FloatingPoint)):
            raise ValueError(
                f"element must be an element-wise format (FixedPoint or FloatingPoint, or its spec), got {element!r}"
            )
        if isinstance(element, FixedPoint) and not element.clamp:
            raise ValueError(f"element={element} has no largest value (clamp=False) to scale a block to")
        object.__setattr__(self, "block", _check_block(self.block))
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"dim must be an int, got {self.dim!r}")
        if self.dim != -1 and (isinstance(self.block, tuple) or self.block == "tensor"):
            raise ValueError(f"dim={self.dim} does not apply to block={self.block!r}; leave dim=-1")
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r} is not accepted; accepted: {', '.join(SCALES)}")
        if self.scale == "e8m0":
            if self.scale_rounding not in SCALE_ROUNDINGS:
                raise ValueError(
                    f"scale_rounding={self.scale_rounding!r} is not accepted for scale='e8m0'; "
                    f"accepted: {', '.join(SCALE_ROUNDINGS)}"
                )
        else:
            if self.scale_rounding == "floor":  # the default: float scales round to nearest
                object.__setattr__(self, "scale_rounding", _FLOAT_SCALE_ROUNDING)
            if self.scale_rounding != _FLOAT_SCALE_ROUNDING:
                raise ValueError(
                    f"scale_rounding={self.scale_rounding!r} does not apply to scale={self.scale!r}, which is "
                    f"amax / max_element rounded to nearest; accepted: {_FLOAT_SCALE_ROUNDING!r}"
                )
        check_bool("tensor_scale", self.tensor_scale)
        if self.tensor_scale and self.scale != "fp8_e4m3":
            raise ValueError(
                f"tensor_scale=True is NVFP4's second level under fp8_e4m3 block scales; got scale={self.scale!r}"
            )

    def _default(self, field: Field[Any]) -> Any:
        if field.name == "scale_rounding":
            return "floor" if self.scale == "e8m0" else _FLOAT_SCALE_ROUNDING
        return field.default

    @property
    def element_max(self) -> float:
        """The element format's largest finite value."""
        return self.element.max_value

    @property
    def element_emax(self) -> int:
        """The exponent of the element format's largest value, floor(log2(max))."""
        return math.frexp(self.element_max)[1] - 1

    def kernel_params(self) -> dict[str, int]:
        e = self.element
        fixed = isinstance(e, FixedPoint)
        tile_rows = 1
        if isinstance(self.block, tuple):  # (rows, cols): runs of cols, grouped tile_rows rows at a time
            tile_rows, block = self.block
        else:
            block = {"tensor": _WHOLE_TENSOR, "row": _ROW}.get(self.block, self.block)  # type: ignore[arg-type]
        return {
            "element_kind": 0 if fixed else 1,
            "wl": e.wl if isinstance(e, FixedPoint) else 0,
            "fl": e.fl if isinstance(e, FixedPoint) else 0,
            "symmetric": int(e.symmetric) if isinstance(e, FixedPoint) else 0,
            "exp": e.exp if isinstance(e, FloatingPoint) else 0,
            "man": e.man if isinstance(e, FloatingPoint) else 0,
            "subnormals": int(e.subnormals) if isinstance(e, FloatingPoint) else 0,
            "specials": SPECIALS.index(e.specials) if isinstance(e, FloatingPoint) else 0,
            "dim": self.dim,
            "block_size": int(block),
            # (float scales always round to nearest: the kernels ignore scale_rounding for them)
            "scale_rounding": SCALE_ROUNDINGS.index(self.scale_rounding) if self.scale == "e8m0" else 0,
            "scale": SCALES.index(self.scale),
            "tensor_scale": int(self.tensor_scale),
            "tile_rows": tile_rows,
        }


def _check_block(block: object) -> BlockShape:
    if block in ("row", "tensor"):
        return block
    if isinstance(block, list):
        block = tuple(block)
    if isinstance(block, tuple):
        if len(block) != 2:
            raise ValueError(f"block={block!r} is not a tile; accepted: {_BLOCK_HINT}")
        for n in block:
            check_int("block", n, 1, 2**31 - 1, f" in each dim of a tile; accepted: {_BLOCK_HINT}")
        return (int(block[0]), int(block[1]))
    if isinstance(block, (str, bool)) or not isinstance(block, int):
        raise ValueError(f"block={block!r} is not accepted; accepted: {_BLOCK_HINT}")
    check_int("block", block, 1, 2**31 - 1, f" ({_BLOCK_HINT})")
    return block
