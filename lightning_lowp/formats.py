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

from __future__ import annotations

import math
import re
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "Format",
    "FormatLike",
    "FixedPoint",
    "FloatingPoint",
    "BlockFloatingPoint",
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

#: The six rounding modes of the numerics contract, in the order the kernels number them.
ROUNDING_MODES = ("nearest", "nearest_away", "toward_zero", "down", "up", "stochastic")
#: What a float format's top exponent code means (``FloatingPoint.specials``).
SPECIALS = ("ieee", "fn", "none")
#: What happens past a float format's largest finite value (``FloatingPoint.overflow``).
OVERFLOWS = ("inf", "saturate")

_FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127


def check_rounding(rounding: str, argument: str = "rounding") -> str:
    """Return ``rounding`` if it is one of :data:`ROUNDING_MODES`.

    Raises:
        ValueError: naming ``argument`` and the accepted modes.
    """
    if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
        raise ValueError(f"{argument}={rounding!r} is not a rounding mode; accepted: {', '.join(ROUNDING_MODES)}")
    return rounding


def check_int(name: str, value: object, lo: int, hi: int, what: str = "") -> None:
    """Check that argument ``name`` is an int (not a bool) in ``lo..hi``.

    Raises:
        ValueError: naming the argument and the accepted range (``what`` is appended to it).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; accepted: {lo}..{hi}{what}")


def check_bool(name: str, value: object) -> None:
    """Check that argument ``name`` is ``True`` or ``False``.

    Raises:
        ValueError: naming the argument.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


class Format:
    """Base class of the number formats.

    A subclass is a frozen dataclass that names its spec (``fixed(...)``), its positional spec
    fields, and the kind of kernel it runs on with that kernel's parameters by name.
    """

    #: The name of the format in specs, as in ``fixed(8,7)``.
    spec_name: ClassVar[str]
    #: Fields written positionally in specs; the others are ``key=value``.
    positional_names: ClassVar[tuple[str, ...]]
    #: The kind of format the kernels know it as (``lightning_lowp._C.FORMAT_KINDS``).
    kernel_kind: ClassVar[str]

    def kernel_params(self) -> dict[str, int]:
        """The kernel's parameters for this format, by the names in ``_C.FORMAT_PARAMS[kernel_kind]``."""
        raise NotImplementedError

    def __str__(self) -> str:  # canonical spec; parse_format(str(fmt)) == fmt
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        positional = [str(getattr(self, n)) for n in self.positional_names]
        extra = [
            f"{f.name}={_spec_value(getattr(self, f.name))}"
            for f in fields(self)  # type: ignore[arg-type]  # every subclass is a dataclass
            if f.name not in self.positional_names and getattr(self, f.name) != self._default(f)
        ]
        return f"{self.spec_name}({','.join(positional + extra)})"

    def _default(self, field: Field[Any]) -> Any:
        return field.default


#: A format object or a spec string, accepted wherever a format is.
FormatLike = Format | str


def _spec_value(v: object) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass(frozen=True)
class FixedPoint(Format):
    """Fixed point: values k * 2**-fl with k an integer in [-2**(wl-1), 2**(wl-1) - 1].

    ``symmetric=True`` drops the lowest code (range [-2**(wl-1)+1, 2**(wl-1)-1]);
    ``clamp=False`` keeps the grid but not the range. ``wl`` is limited to 1..25 so that
    every grid value inside the range is exactly a float32.
    """

    wl: int
    fl: int
    clamp: bool = True
    symmetric: bool = False

    spec_name: ClassVar[str] = "fixed"
    positional_names: ClassVar[tuple[str, ...]] = ("wl", "fl")
    kernel_kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        check_int("wl", self.wl, 1, 25, " (word length, sign included; float32 holds 25-bit fixed point exactly)")
        # The grid step 2**-fl must be a float32 (>= 2**-149) and the range end finite.
        check_int("fl", self.fl, self.wl - 128, 149, f" for wl={self.wl} (step 2**-fl and range must fit float32)")
        check_bool("clamp", self.clamp)
        check_bool("symmetric", self.symmetric)

    def kernel_params(self) -> dict[str, int]:
        return {"wl": self.wl, "fl": self.fl, "clamp": int(self.clamp), "symmetric": int(self.symmetric)}

    @property
    def step(self) -> float:
        """The grid step, 2**-fl."""
        return 2.0**-self.fl

    @property
    def max_value(self) -> float:
        """Largest value (``inf`` without clamping)."""
        return (2.0 ** (self.wl - 1) - 1) * self.step if self.clamp else math.inf

    @property
    def min_value(self) -> float:
        """Most negative value (``-inf`` without clamping)."""
        if not self.clamp:
            return -math.inf
        return -(2.0 ** (self.wl - 1) - (1 if self.symmetric else 0)) * self.step


@dataclass(frozen=True)
class FloatingPoint(Format):
    """A custom float: sign, ``exp`` exponent bits (bias 2**(exp-1) - 1), ``man`` mantissa bits.

    specials: "ieee" (top exponent code is Inf/NaN), "fn" (no Inf; only the all-ones code is
    NaN), "none" (every code is a finite number). overflow: "inf" (only with "ieee") or
    "saturate"; its default is "inf" for "ieee" and "saturate" otherwise.
    """

    exp: int
    man: int
    subnormals: bool = True
    specials: str = "ieee"
    overflow: str | None = None

    spec_name: ClassVar[str] = "float"
    positional_names: ClassVar[tuple[str, ...]] = ("exp", "man")
    kernel_kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        check_int("exp", self.exp, 1, 8)
        check_int("man", self.man, 0, 23)
        check_bool("subnormals", self.subnormals)
        if self.specials not in SPECIALS:
            raise ValueError(f"specials={self.specials!r} is not accepted; accepted: {', '.join(SPECIALS)}")
        if self.overflow is None:
            object.__setattr__(self, "overflow", "inf" if self.specials == "ieee" else "saturate")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow={self.overflow!r} is not accepted; accepted: {', '.join(OVERFLOWS)}")
        if self.overflow == "inf" and self.specials != "ieee":
            raise ValueError(
                f"overflow='inf' needs Inf codes, which specials={self.specials!r} does not have; "
                "use overflow='saturate' or specials='ieee'"
            )
        if self.specials == "ieee" and self.exp == 1:
            raise ValueError("exp=1 with specials='ieee' leaves no finite normal exponent; use exp >= 2")
        if self.specials == "fn" and self.exp == 1 and self.man == 0:
            raise ValueError("exp=1, man=0 with specials='fn' has no finite nonzero value")
        if self.max_value > _FLOAT32_MAX:
            raise ValueError(
                f"exp={self.exp} with specials={self.specials!r} has values beyond float32's range "
                f"(largest {self.max_value:.4g}), which the float32 simulation cannot hold; use specials='ieee'"
            )

    def _default(self, field: Field[Any]) -> Any:
        if field.name == "overflow":
            return "inf" if self.specials == "ieee" else "saturate"
        return field.default

    def kernel_params(self) -> dict[str, int]:
        return {
            "exp": self.exp,
            "man": self.man,
            "subnormals": int(self.subnormals),
            "specials": SPECIALS.index(self.specials),
            "overflow": OVERFLOWS.index(self.overflow or "inf"),
        }

    @property
    def bias(self) -> int:
        return 2 ** (self.exp - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_value(self) -> float:
        """Largest finite value."""
        top = 2**self.exp - 1 - self.bias  # exponent of the top code
        if self.specials == "ieee":
            return (2.0 - 2.0**-self.man) * 2.0 ** (top - 1)
        if self.specials == "fn":  # the all-ones mantissa of the top exponent is NaN
            if self.man == 0:
                return 2.0 ** (top - 1)
            return (2.0 - 2.0 ** (1 - self.man)) * 2.0**top
        return (2.0 - 2.0**-self.man) * 2.0**top

    @property
    def min_value(self) -> float:
        """Most negative finite value."""
        return -self.max_value


@dataclass(frozen=True)
class BlockFloatingPoint(Format):
    """Block floating point: each block shares the exponent of its largest finite magnitude.

    ``wl`` bits = sign + wl-1 magnitude bits. Blocks: ``dim=-1`` and no ``block_size`` - the
    whole tensor; ``dim=d`` - one exponent per index along d; ``block_size=k`` - runs of k
    consecutive elements along ``dim`` (the last dim if ``dim=-1``), as in OCP microscaling.
    """

    wl: int
    dim: int = -1
    block_size: int | None = None

    spec_name: ClassVar[str] = "bfp"
    positional_names: ClassVar[tuple[str, ...]] = ("wl",)
    kernel_kind: ClassVar[str] = "block"

    def __post_init__(self) -> None:
        check_int("wl", self.wl, 1, 25, " (sign + wl-1 magnitude bits)")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"dim must be an int, got {self.dim!r}")
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1, 2**31 - 1, " or None")

    def kernel_params(self) -> dict[str, int]:
        return {"wl": self.wl, "dim": self.dim, "block_size": self.block_size or 0}


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
