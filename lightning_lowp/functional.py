"""The functional API: validate arguments, then call the compiled kernels."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from lightning_lowp import ops
from lightning_lowp.formats import (
    ROUNDING_MODES,
    BlockFloatingPoint,
    Format,
    FormatLike,
    ScaledFormat,
    as_format,
    check_rounding,
)
from lightning_lowp.sharding import is_dtensor, quantize_dtensor

__all__ = ["quantize", "quantize_", "quantize_foreach_"]


def _check_tensor(x: object, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, float64), got {x.dtype}")


@functools.lru_cache(maxsize=256)
def _kernel_call(fmt: FormatLike, rounding: str) -> tuple[Format, int, list[int], int]:
    """(format, kind, params, mode) for a format or spec and a rounding mode, validated once.

    Quantization sits in the inner loop of training, where parsing each call would show.
    """
    fmt = as_format(fmt)
    check_rounding(rounding)
    kind, params = ops.kernel_args(fmt)
    return fmt, kind, params, ROUNDING_MODES.index(rounding)


def check_dims(fmt: Format, ndim: int, name: str = "x") -> None:
    """Check that ``fmt`` can quantize a tensor of ``ndim`` dims.

    A block format's ``dim`` must be one the tensor has (``-1`` always is; a 0-d tensor counts
    as 1-d), and a scaled format's ``(rows, cols)`` tile needs 2 or more dims.

    Args:
        fmt: a parsed format.
        ndim: the number of dims of the tensor.
        name: what the error calls the tensor.

    Raises:
        ValueError: saying which of the two it is.
    """
    if isinstance(fmt, (BlockFloatingPoint, ScaledFormat)) and not (
        fmt.dim == -1 or -max(ndim, 1) <= fmt.dim < max(ndim, 1)
    ):
        raise ValueError(f"dim={fmt.dim} of {fmt} is out of range for a tensor with {ndim} dims")
    if isinstance(fmt, ScaledFormat) and isinstance(fmt.block, tuple) and ndim < 2:
        raise ValueError(
            f"block={fmt.block} of {fmt} is a tile over the last two dims; {name} must have 2 or more dims, got {ndim}"
        )


def _check(
    x: torch.Tensor, fmt: FormatLike, rounding: str, generator: torch.Generator | None
) -> tuple[Format, int, list[int], int]:
    _check_tensor(x)
    try:
        # (torch.compile traces the function itself: a cache is only for eager calls)
        call = _kernel_call.__wrapped__ if torch.compiler.is_compiling() else _kernel_call
        fmt, kind, params, mode = call(fmt, rounding)  # the format, parsed
    except TypeError:  # unhashable: let as_format / check_rounding say what is wrong
        as_format(fmt)
        check_rounding(rounding)
        raise
    check_dims(fmt, x.dim())
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator (stochastic rounding draws its key on the host so a seed "
                f"gives the same bits on every device), got one on {generator.device}"
            )
    return fmt, kind, params, mode


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` to the values of ``fmt``, as a new tensor.

    The result has x's shape, dtype, device and memory format. The gradient passes through
    unchanged (the straight-through estimator); to quantize the gradient as well, use
    :func:`lightning_lowp.quantizer`.

    Args:
        x: a floating-point tensor (float32, float16, bfloat16 or float64; computed in float32).
        fmt: a format, or a spec string such as ``"fixed(8,7)"`` or ``"bf16"``.
        rounding: ``nearest``, ``nearest_away``, ``toward_zero``, ``down``, ``up`` or ``stochastic``.
        generator: a CPU generator for stochastic rounding (default: torch's default generator),
            so ``torch.manual_seed`` makes it reproducible on CPU and CUDA alike.

    Returns:
        The quantized tensor.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``fmt`` not a format or spec.
        ValueError: an unknown spec or rounding mode, or a block ``dim`` the tensor does not have.

    Example:
        >>> lp.quantize(torch.tensor([0.3, -1.7]), "fixed(4,1)")
        tensor([ 0.5000, -1.5000])
    """
    fmt_checked, kind, params, mode = _check(x, fmt, rounding, generator)
    if is_dtensor(x):  # shard-invariant (lightning_lowp.sharding)
        return quantize_dtensor(x, fmt_checked, rounding, lambda t: quantize(t, fmt_checked, rounding, generator))
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return ops.quantize(x, kind, params, mode, generator)  # with its straight-through gradient
    # No gradient to track: skip the operator's autograd layer (Python, ~10 us a call).
    with torch._C._AutoDispatchBelowAutograd():
        return ops.quantize(x, kind, params, mode, generator)


def quantize_(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` in place to the values of ``fmt``; returns ``x``.

    The arguments are those of :func:`quantize`. Under autograd it behaves as torch's own
    in-place ops: a leaf that requires grad is refused, a backward that saved ``x`` before
    refuses to run, and the gradient through ``x`` passes unchanged (straight-through).
    """
    fmt_checked, kind, params, mode = _check(x, fmt, rounding, generator)
    if is_dtensor(x):
        q = quantize(x, fmt_checked, rounding, generator)
        with torch.no_grad():
            x.to_local().copy_(q.to_local())  # type: ignore[attr-defined]
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return x.copy_(ops.quantize(x, kind, params, mode, generator))  # copy_ records the in-place write
    ops.quantize_(x, kind, params, mode, generator)
    return x


def quantize_foreach_(
    tensors: Sequence[torch.Tensor],
    fmt: FormatLike,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    sources: Sequence[torch.Tensor] | None = None,
) -> None:
    """Quantize every tensor of a list in one call, in place.

    The multi-tensor form of :func:`quantize_`, like torch's ``_foreach`` ops:
    ``tensors[i] = quantize(sources[i])``, or in place without ``sources``. The same bits as
    calling :func:`quantize_` on each tensor in list order (stochastic rounding draws one key
    per tensor).

    Args:
        tensors: the tensors to write.
        fmt: a format or a spec string.
        rounding: a rounding mode, as in :func:`quantize`.
        generator: a CPU generator for stochastic rounding.
        sources: tensors to read instead of ``tensors``; each ``sources[i]`` must match
            ``tensors[i]`` in shape, dtype and device, and be it or not overlap it.

    Raises:
        ValueError: tensors on more than one device, a source that does not match its tensor,
            or a tensor that shares memory with another one of the call (other than its own
            source, when that is the same view).

    Not differentiable: a tensor that requires grad comes out without a derivative (use
    :func:`quantize_` for a straight-through one).

    Example:
        >>> params = [torch.randn(3, 4), torch.randn(4)]
        >>> lp.quantize_foreach_(params, "bf16")
    """
    tensors = list(tensors)
    sources = tensors if sources is None else list(sources)
    if len(sources) != len(tensors):
        raise ValueError(f"sources must have one tensor per tensor of tensors, got {len(sources)} and {len(tensors)}")
    if not tensors:
        return
    for i, (t, s) in enumerate(zip(tensors, sources, strict=True)):
        _check_tensor(t, f"tensors[{i}]")
        _check_tensor(s, f"sources[{i}]")
        if t.device != tensors[0].device:
            raise ValueError(
                f"tensors must all be on one device; tensors[{i}] is on {t.device}, tensors[0] on {tensors[0].device}"
            )
        if s is not t and (s.shape != t.shape or s.dtype != t.dtype or s.device != t.device):
            raise ValueError(
                f"sources[{i}] must match tensors[{i}] in shape, dtype and device, got "
                f"{tuple(s.shape)} {s.dtype} {s.device} and {tuple(t.shape)} {t.dtype} {t.device}"
            )
    fmt, kind, params, mode = _check(tensors[0], fmt, rounding, generator)
    if any(is_dtensor(t) or is_dtensor(s) for t, s in zip(tensors, sources, strict=True)):
        # one tensor at a time, in list order: the same keys as the multi-tensor call draws
        for t, s in zip(tensors, sources, strict=True):
            q = quantize(s, fmt, rounding, generator)
            with torch.no_grad():
                (t.to_local() if is_dtensor(t) else t).copy_(q.to_local() if is_dtensor(q) else q)  # type: ignore[attr-defined]
        return
    if isinstance(fmt, (BlockFloatingPoint, ScaledFormat)):  # every tensor needs the blocking dim
        for t in tensors[1:]:
            _check(t, fmt, rounding, None)
    ops.quantize_foreach_(tensors, sources, kind, params, mode, generator)
