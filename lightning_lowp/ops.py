"""The compiled operators, their fake implementations, and the vocabulary shared with C++.

The operators (``torch.ops.lowp.quantize``, ``quantize_`` and ``quantize_foreach_``) are defined
in ``cpp/ops.cpp`` and come into being when ``lightning_lowp._C`` is imported. The fake (meta)
implementations below let ``torch.compile`` trace them without running them.

The operators take a format as ``(kind, params)`` and a rounding mode as integers. What those
integers mean is defined once, in ``cpp/vocabulary.h``, and exported by ``_C`` by name; this
module checks at import that Python's names are the same, and :func:`kernel_args` builds the
integers from a format by name, so the two sides cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch

import lightning_lowp._C as _C
from lightning_lowp.formats import OVERFLOWS, ROUNDING_MODES, SCALE_ROUNDINGS, SCALES, SPECIALS, Format

__all__ = [
    "BUILT_WITH_CUDA",
    "check_vocabulary",
    "kernel_args",
    "matmul_accumulate",
    "matmul_aligned",
    "quantize",
    "quantize_",
    "quantize_foreach_",
]

BUILT_WITH_CUDA = bool(_C.built_with_cuda)


def check_vocabulary() -> None:
    """Check that Python and the compiled kernels number every setting alike.

    Raises:
        ImportError: when ``lightning_lowp._C`` was built from other sources than this package
            (rebuild it with ``pip install --no-build-isolation -e .``).
    """
    for what, python, compiled in (
        ("rounding modes", ROUNDING_MODES, _C.ROUNDING_MODES),
        ("float specials", SPECIALS, _C.SPECIALS),
        ("float overflow modes", OVERFLOWS, _C.OVERFLOWS),
        ("scale roundings", SCALE_ROUNDINGS, _C.SCALE_ROUNDINGS),
        ("scales", SCALES, _C.SCALES),
    ):
        if tuple(python) != tuple(compiled):
            raise ImportError(
                f"lightning_lowp._C numbers the {what} as {tuple(compiled)}, Python as {tuple(python)}; "
                "the compiled extension is stale: rebuild it with 'pip install --no-build-isolation -e .'"
            )


check_vocabulary()


def kernel_args(fmt: Format) -> tuple[int, list[int]]:
    """The ``(kind, params)`` pair the operators take for a format, built by name.

    Args:
        fmt: a format object.

    Returns:
        The index of ``fmt.kernel_kind`` in ``_C.FORMAT_KINDS``, and ``fmt.kernel_params()``
        in the order of ``_C.FORMAT_PARAMS[fmt.kernel_kind]``.
    """
    kind = getattr(fmt, "kernel_kind", None)
    if kind not in _C.FORMAT_KINDS:
        raise TypeError(f"fmt must be a format the kernels run ({', '.join(_C.FORMAT_KINDS)}), got {fmt!r}")
    params = fmt.kernel_params()
    names = tuple(_C.FORMAT_PARAMS[kind])
    if set(params) != set(names):
        raise RuntimeError(
            f"{type(fmt).__name__}.kernel_params() gives {sorted(params)}, the {kind} kernel takes {list(names)}"
        )
    return _C.FORMAT_KINDS.index(kind), [params[name] for name in names]


@torch.library.register_fake("lowp::quantize")
def _quantize_fake(
    x: torch.Tensor, kind: int, params: list[int], rounding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("lowp::quantize_")
def _quantize_inplace_fake(
    x: torch.Tensor, kind: int, params: list[int], rounding: int, generator: torch.Generator | None = None
) -> None:
    return None


@torch.library.register_fake("lowp::quantize_foreach_")
def _quantize_foreach_fake(
    out: list[torch.Tensor],
    x: list[torch.Tensor],
    kind: int,
    params: list[int],
    rounding: int,
    generator: torch.Generator | None = None,
) -> None:
    # The dispatcher picks one kernel for the whole list; with a meta tensor among CPU ones it
    # picks this one, which would otherwise leave the CPU tensors as they were.
    devices = sorted({str(t.device) for t in (*out, *x)})
    if len(devices) > 1:
        raise ValueError(f"lowp::quantize_foreach_: every tensor must be on one device, got {devices}")


@torch.library.register_fake("lowp::matmul_accumulate")
def _matmul_accumulate_fake(
    a: torch.Tensor,
    b: torch.Tensor,
    kind: int,
    params: list[int],
    rounding: int,
    chunk: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


@torch.library.register_fake("lowp::matmul_aligned")
def _matmul_aligned_fake(
    a: torch.Tensor, b: torch.Tensor, group: int, bits: int, rounding: int, chunk: int
) -> torch.Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def _straight_through(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return grad, None, None, None, None


# Rounding has a zero derivative almost everywhere; like every quantization-aware training
# library we let the gradient pass unchanged (the straight-through estimator).
torch.library.register_autograd("lowp::quantize", _straight_through)

quantize = torch.ops.lowp.quantize.default
quantize_ = torch.ops.lowp.quantize_.default
quantize_foreach_ = torch.ops.lowp.quantize_foreach_.default
matmul_accumulate = torch.ops.lowp.matmul_accumulate.default
matmul_aligned = torch.ops.lowp.matmul_aligned.default
