"""Element-wise formats: every value is rounded on its own."""

from __future__ import annotations

import math
from dataclasses import Field, dataclass
from typing import Any, ClassVar

from lightning_lowp.formats.base import OVERFLOWS, SPECIALS, Format, check_bool, check_int

__all__ = ["FixedPoint", "FloatingPoint"]

_FLOAT32_MAX = (2.0 - 2.0**-23) * 2.0**127


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
