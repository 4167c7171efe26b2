"""Block floating point: the elements of a block share an exponent (QPyTorch's meaning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_lowp.formats.base import Format, check_int

__all__ = ["BlockFloatingPoint"]


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
