"""Presets and the spec grammar (see :mod:`lightning_lowp.formats`)."""

from __future__ import annotations

import re
from dataclasses import fields

from lightning_lowp.formats.base import Format, FormatLike
from lightning_lowp.formats.block import BlockFloatingPoint
from lightning_lowp.formats.element import FixedPoint, FloatingPoint

__all__ = ["PRESETS", "parse_format", "as_format"]

PRESETS = {
    "fp32": FloatingPoint(8, 23),
    "bf16": FloatingPoint(8, 7),
    "fp16": FloatingPoint(5, 10),
    "fp8_e4m3": FloatingPoint(4, 3, specials="fn", overflow="saturate"),
    "fp8_e5m2": FloatingPoint(5, 2),
    "fp6_e3m2": FloatingPoint(3, 2, specials="none"),
    "fp6_e2m3": FloatingPoint(2, 3, specials="none"),
    "fp4_e2m1": FloatingPoint(2, 1, specials="none"),
}

_CALLS: dict[str, type[Format]] = {"fixed": FixedPoint, "float": FloatingPoint, "bfp": BlockFloatingPoint}
_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in _CALLS.values()}  # type: ignore[arg-type]
_CALL_RE = re.compile(r"^([a-z_]+)\((.*)\)$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_GRAMMAR_HINT = (
    "a preset (" + ", ".join(PRESETS) + ") or fixed(wl,fl[,clamp=..,symmetric=..]), "
    "float(exp,man[,subnormals=..,specials=..,overflow=..]), bfp(wl[,dim=..,block_size=..])"
)


def _parse_value(key: str, text: str) -> int | bool | str | None:
    if key in ("specials", "overflow"):  # words, where "none" is a word too
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
    args: list[int] = []
    kwargs: dict[str, int | bool | str | None] = {}
    items = m.group(2).split(",") if m.group(2) else []
    for item in items:
        if not item:
            raise ValueError(f"format spec {spec!r}: empty argument; accepted: {_GRAMMAR_HINT}")
        if "=" in item:
            key, _, value = item.partition("=")
            if key not in _FIELD_NAMES[cls]:
                accepted = ", ".join(_FIELD_NAMES[cls])
                raise ValueError(f"format spec {spec!r}: unknown keyword {key!r}; accepted: {accepted}")
            if key in kwargs:
                raise ValueError(f"format spec {spec!r}: keyword {key!r} given twice")
            kwargs[key] = _parse_value(key, value)
        elif kwargs:
            raise ValueError(f"format spec {spec!r}: positional value after a keyword")
        elif not _INT_RE.match(item):
            raise ValueError(f"format spec {spec!r}: {item!r} is not an integer")
        else:
            args.append(int(item))
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
