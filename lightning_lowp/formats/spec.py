"""Presets and the spec grammar (see :mod:`lightning_lowp.formats`)."""

from __future__ import annotations

import re
from dataclasses import fields

from lightning_lowp.formats.base import Format, FormatLike
from lightning_lowp.formats.block import BlockFloatingPoint
from lightning_lowp.formats.element import FixedPoint, FloatingPoint
from lightning_lowp.formats.scaled import ScaledFormat

__all__ = ["PRESETS", "parse_format", "as_format"]

_FLOATS: dict[str, FloatingPoint] = {
    "fp32": FloatingPoint(8, 23),
    "bf16": FloatingPoint(8, 7),
    "fp16": FloatingPoint(5, 10),
    "fp8_e4m3": FloatingPoint(4, 3, specials="fn", overflow="saturate"),
    "fp8_e5m2": FloatingPoint(5, 2),
    "fp6_e3m2": FloatingPoint(3, 2, specials="none"),
    "fp6_e2m3": FloatingPoint(2, 3, specials="none"),
    "fp4_e2m1": FloatingPoint(2, 1, specials="none"),
}
_E4M3 = _FLOATS["fp8_e4m3"]
#: Every format with a name of its own, accepted wherever a format is.
PRESETS: dict[str, Format] = dict(_FLOATS)
PRESETS.update(
    {
        # OCP microscaling (MX v1.0): blocks of 32 along the last dim, E8M0 scales, floor.
        "mxfp8_e4m3": ScaledFormat(_E4M3),
        "mxfp8_e5m2": ScaledFormat(_FLOATS["fp8_e5m2"]),
        "mxfp6_e3m2": ScaledFormat(_FLOATS["fp6_e3m2"]),
        "mxfp6_e2m3": ScaledFormat(_FLOATS["fp6_e2m3"]),
        "mxfp4": ScaledFormat(_FLOATS["fp4_e2m1"]),
        "mxint8": ScaledFormat(FixedPoint(8, 6, symmetric=True)),
        # NVIDIA's NVFP4: E2M1 in blocks of 16, E4M3 block scales under a float32 tensor scale.
        "nvfp4": ScaledFormat(_FLOATS["fp4_e2m1"], 16, scale="fp8_e4m3", tensor_scale=True),
        # torchao's float8 training recipes: one float32 scale per tensor; one power-of-two
        # scale per row (rowwise with round_scales_to_power_of_2, which rounds 448/amax down,
        # i.e. amax/448 up: rceil).
        "fp8_tensorwise": ScaledFormat(_E4M3, "tensor", scale="fp32"),
        "fp8_rowwise": ScaledFormat(_E4M3, "row", scale_rounding="rceil"),
        # DeepSeek-V3's FP8 training: float32 scales per 1x128 run (activations) and per
        # 128x128 tile (weights).
        "fp8_blockwise_1x128": ScaledFormat(_E4M3, 128, scale="fp32"),
        "fp8_blockwise_128x128": ScaledFormat(_E4M3, (128, 128), scale="fp32"),
    }
)

_CALLS: dict[str, type[Format]] = {
    "fixed": FixedPoint,
    "float": FloatingPoint,
    "bfp": BlockFloatingPoint,
    "mx": ScaledFormat,
}
_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in _CALLS.values()}  # type: ignore[arg-type]
_CALL_RE = re.compile(r"^([a-z_]+)\((.*)\)$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_KEYWORD_RE = re.compile(r"^[a-z_]+=")
_TILE_RE = re.compile(r"^(\d+)x(\d+)$")
_GRAMMAR_HINT = (
    "a preset (" + ", ".join(PRESETS) + ") or fixed(wl,fl[,clamp=..,symmetric=..]), "
    "float(exp,man[,subnormals=..,specials=..,overflow=..]), bfp(wl[,dim=..,block_size=..]), "
    "mx(element,block[,dim=..,scale=..,scale_rounding=..,tensor_scale=..]) with block k, RxC, row or tensor"
)
_WORDS = ("specials", "overflow", "scale", "scale_rounding")  # keys whose values are words


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses (an element spec holds its own)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _parse_positional(cls: type[Format], index: int, text: str) -> object:
    if cls is ScaledFormat and index == 0:
        return text  # the element's own spec, parsed by ScaledFormat
    if cls is ScaledFormat and index == 1:
        tile = _TILE_RE.match(text)
        if tile:
            return (int(tile.group(1)), int(tile.group(2)))
        if text in ("row", "tensor"):
            return text
    if not _INT_RE.match(text):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _parse_value(key: str, text: str) -> int | bool | str | None:
    if key in _WORDS:  # words, where "none" is a word too
        return text
    if _INT_RE.match(text):
        return int(text)
    return {"true": True, "false": False, "none": None}.get(text, text)


def parse_format(spec: str) -> Format:
    """Parse a format spec (see the module docstring for the grammar)."""
    if not isinstance(spec, str):
        raise TypeError(f"format spec must be a str, got {type(spec).__name__}")
    text = re.sub(r"\s+", "", spec).lower()
    if text in PRESETS:
        return PRESETS[text]
    m = _CALL_RE.match(text)
    if not m or m.group(1) not in _CALLS:
        raise ValueError(f"format spec {spec!r} does not parse; accepted: {_GRAMMAR_HINT}")
    cls = _CALLS[m.group(1)]
    args: list[object] = []
    kwargs: dict[str, int | bool | str | None] = {}
    items = _split_top_level(m.group(2)) if m.group(2) else []
    for item in items:
        if not item:
            raise ValueError(f"format spec {spec!r}: empty argument; accepted: {_GRAMMAR_HINT}")
        if _KEYWORD_RE.match(item):
            key, _, value = item.partition("=")
            if key not in _FIELD_NAMES[cls]:
                accepted = ", ".join(_FIELD_NAMES[cls])
                raise ValueError(f"format spec {spec!r}: unknown keyword {key!r}; accepted: {accepted}")
            if key in kwargs:
                raise ValueError(f"format spec {spec!r}: keyword {key!r} given twice")
            kwargs[key] = _parse_value(key, value)
        elif kwargs:
            raise ValueError(f"format spec {spec!r}: positional value after a keyword")
        else:
            try:
                args.append(_parse_positional(cls, len(args), item))
            except ValueError as err:
                raise ValueError(f"format spec {spec!r}: {err}") from None
    try:
        return cls(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"format spec {spec!r}: {err}; accepted: {_GRAMMAR_HINT}") from None


def as_format(fmt: FormatLike, argument: str = "fmt") -> Format:
    """A format from a format object or a spec string."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        return parse_format(fmt)
    raise TypeError(f"{argument} must be a format or a spec string, got {type(fmt).__name__}")
