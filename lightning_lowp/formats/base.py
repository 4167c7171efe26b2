"""What every format shares: the base class, the rounding modes, argument checks."""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any, ClassVar

__all__ = [
    "Format",
    "FormatLike",
    "ROUNDING_MODES",
    "SPECIALS",
    "OVERFLOWS",
    "check_rounding",
    "check_int",
    "check_bool",
    "spec_value",
]

#: The six rounding modes of the numerics contract, in the order the kernels number them.
ROUNDING_MODES = ("nearest", "nearest_away", "toward_zero", "down", "up", "stochastic")
#: What a float format's top exponent code means (``FloatingPoint.specials``).
SPECIALS = ("ieee", "fn", "none")
#: What happens past a float format's largest finite value (``FloatingPoint.overflow``).
OVERFLOWS = ("inf", "saturate")


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
        from lightning_lowp.formats.spec import PRESETS  # (the presets are built from the formats)

        for name, preset in PRESETS.items():
            if preset == self:
                return name
        positional = [spec_value(getattr(self, n)) for n in self.positional_names]
        extra = [
            f"{f.name}={spec_value(getattr(self, f.name))}"
            for f in fields(self)  # type: ignore[arg-type]  # every subclass is a dataclass
            if f.name not in self.positional_names and getattr(self, f.name) != self._default(f)
        ]
        return f"{self.spec_name}({','.join(positional + extra)})"

    def _default(self, field: Field[Any]) -> Any:
        return field.default


#: A format object or a spec string, accepted wherever a format is.
FormatLike = Format | str


def spec_value(v: object) -> str:
    """How a field's value is written in a spec."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):  # a tile
        return "x".join(str(n) for n in v)
    return str(v)
