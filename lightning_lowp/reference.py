"""A slow, obviously-correct reference of every format and rounding mode.

This module restates the numerics contract of DESIGN.md in real-number terms, in float64
PyTorch, without any of the kernels' bit tricks: for each value it finds the grid step ``q``
the format has around ``|x|``, the two neighbouring representable magnitudes
``lo = floor(|x| / q) * q <= |x| <= hi = lo + q``, picks one according to the rounding mode,
applies the format's range, and puts the sign of ``x`` back. The tests hold the compiled
kernels (:func:`lightning_lowp.quantize`) to it bit for bit.

Why float64 is exact here: every input is a float32 (24 significant bits, exponent in
[-149, 127]) and every step ``q`` is a power of two in [2^-172, 2^127], so ``|x| / q``,
``floor``, ``|x| / q - floor(|x| / q)``, ``k * q`` and ``(k + 1) * q`` are all exact in
float64 (53 significant bits, exponent range far wider than needed).

Stochastic rounding rounds away from zero iff ``r < floor(frac * 2**32)``, with
``frac = (|x| - lo) / q`` and ``r`` the element's 32 random bits: ``random_bits(key, i)``,
a keyed hash of the element's counter ``i`` (see :func:`random_bits`). The counter is the
index of the element in the buffer the kernel walks, which :func:`kernel_counters` states:

* FixedPoint / FloatingPoint: if ``x`` is non-overlapping and dense (contiguous, transposed,
  channels-last, ...), the kernel walks memory in storage order, so ``i`` is the element's
  offset in memory (``sum(index_d * stride_d)``); otherwise (e.g. a strided slice) it walks
  ``x.contiguous()``, so ``i`` is the row-major logical index.
* BlockFloatingPoint: the kernel always walks a contiguous copy; when ``block_size`` runs
  along a dim that is not the last, that dim is first moved last, so ``i`` is the row-major
  index in ``x.movedim(dim, -1)``; in every other case it is the row-major logical index.

A consequence of the counters: stochastic results depend on the memory layout of ``x``, not only on its
values and the seed (``quantize(x.t().contiguous().t())`` draws differently from
``quantize(x)``); non-stochastic modes do not.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from lightning_lowp.formats import (
    BlockFloatingPoint,
    FixedPoint,
    FloatingPoint,
    Format,
    FormatLike,
    as_format,
    check_rounding,
)

__all__ = ["reference_quantize", "random_bits", "kernel_counters", "block_range"]

_F64 = torch.float64
_MASK32 = np.uint64(0xFFFFFFFF)
_TWO32 = 2.0**32


# ---- random bits -----------------------------------------------------------------------


def _mix32(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """lowbias32 on uint32 values held in uint64 (products masked back to 32 bits)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _MASK32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _MASK32
    return x ^ (x >> np.uint64(16))


def random_bits(key: int, counters: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """The 32 random bits (as uint64 values < 2**32) of the elements with the given counters.

    ``random_bits(key, c) = mix32(mix32(lo32(c) ^ lo32(key)) + (hi32(key) ^ hi32(c) * 0x9e3779b9))``
    in uint32 arithmetic.

    Args:
        key: the stochastic-rounding key, taken modulo 2**64 (so the signed value
            ``torch.ops.lowp.draw_key`` returns can be passed as is).
        counters: the elements' counters (see :func:`kernel_counters`), converted to uint64.

    Returns:
        The random bits, a uint64 array of the counters' shape.
    """
    key = int(key) % 2**64
    c = np.asarray(counters, dtype=np.uint64)
    key_lo, key_hi = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    h = _mix32((c & _MASK32) ^ key_lo)
    h = (h + (key_hi ^ (((c >> np.uint64(32)) * np.uint64(0x9E3779B9)) & _MASK32))) & _MASK32
    return _mix32(h)


def kernel_counters(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The stochastic-rounding counter of every element of ``x`` (int64, x's shape).

    See the module docstring: storage order for dense tensors and the element-wise formats,
    row-major order of the (possibly dim-moved) tensor otherwise.

    Args:
        x: the tensor a ``quantize`` call rounds (its layout matters, not its values).
        fmt: the format it rounds to.

    Returns:
        An int64 tensor of x's shape (on the CPU): each element's counter.
    """
    shape = x.shape
    if isinstance(fmt, BlockFloatingPoint):
        if fmt.block_size is not None and x.dim() > 0:
            d = fmt.dim % x.dim()
            if d != x.dim() - 1:
                moved = torch.arange(x.numel(), dtype=torch.int64).reshape(x.movedim(d, -1).shape)
                return moved.movedim(-1, d).contiguous()
        return torch.arange(x.numel(), dtype=torch.int64).reshape(shape)
    # Offsets in memory (relative to the storage offset); x is non-overlapping and dense iff
    # they are a permutation of 0..numel-1.
    offsets = torch.zeros(shape, dtype=torch.int64)
    for d, (size, stride) in enumerate(zip(shape, x.stride(), strict=False)):
        view = [1] * len(shape)
        view[d] = size
        offsets = offsets + (torch.arange(size, dtype=torch.int64) * stride).reshape(view)
    if torch.equal(offsets.flatten().sort().values, torch.arange(x.numel(), dtype=torch.int64)):
        return offsets
    return torch.arange(x.numel(), dtype=torch.int64).reshape(shape)


# ---- rounding on the real line -----------------------------------------------------------


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e (float64) for an integer tensor e."""
    return torch.ldexp(torch.ones_like(e, dtype=_F64), e.to(torch.int64))


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for positive finite float64 a, exactly (frexp: a = m * 2**k, m in [0.5, 1))."""
    _, k = torch.frexp(a)
    return k.to(torch.int64) - 1


def _round_magnitude(
    a: torch.Tensor, q: torch.Tensor, negative: torch.Tensor, rounding: str, rbits: torch.Tensor | None
) -> torch.Tensor:
    """|x| = a (float64, finite, >= 0) rounded to a multiple of q; returns float64."""
    t = a / q
    k = torch.floor(t)
    frac = t - k  # in [0, 1), exact
    if rounding == "nearest":
        odd = torch.remainder(k, 2) == 1
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    elif rounding == "nearest_away":
        up = frac >= 0.5
    elif rounding == "toward_zero":
        up = torch.zeros_like(frac, dtype=torch.bool)
    elif rounding == "down":  # toward -inf: away from zero for negative values
        up = negative & (frac > 0)
    elif rounding == "up":  # toward +inf: away from zero for positive values
        up = ~negative & (frac > 0)
    else:  # stochastic: away from zero with probability floor(frac * 2**32) / 2**32
        if rbits is None:
            raise ValueError(f"rounding={rounding!r} needs the random bits")
        up = rbits < torch.floor(frac * _TWO32)
    return torch.where(up, (k + 1) * q, k * q)


def _may_round_away(rounding: str, negative: torch.Tensor) -> torch.Tensor:
    """Whether the mode rounds away from zero for each sign (IEEE 754 overflow: Inf vs max)."""
    if rounding == "toward_zero":
        return torch.zeros_like(negative)
    if rounding == "down":
        return negative.clone()
    if rounding == "up":
        return ~negative
    return torch.ones_like(negative)


# ---- formats ------------------------------------------------------------------------------


def _fixed(
    a: torch.Tensor,
    finite: torch.Tensor,
    negative: torch.Tensor,
    fmt: FixedPoint,
    rounding: str,
    rbits: torch.Tensor | None,
) -> torch.Tensor:
    limit = torch.where(negative, torch.tensor(-fmt.min_value, dtype=_F64), torch.tensor(fmt.max_value, dtype=_F64))
    mag = _round_magnitude(torch.where(finite, a, 0.0), torch.full_like(a, fmt.step), negative, rounding, rbits)
    mag = torch.minimum(mag, limit)  # saturate to the range end (no-op without clamping)
    return torch.where(finite, mag, limit)  # +-Inf: the range end (Inf itself without clamping)


def _float(
    a: torch.Tensor,
    finite: torch.Tensor,
    negative: torch.Tensor,
    fmt: FloatingPoint,
    rounding: str,
    rbits: torch.Tensor | None,
) -> torch.Tensor:
    max_value = fmt.max_value
    safe = torch.where(finite & (a > 0), a, 1.0)
    e = _floor_log2(safe)  # binade of |x|
    e_step = (
        torch.clamp(e, min=fmt.emin) - fmt.man
        if fmt.subnormals
        else torch.where(e < fmt.emin, torch.full_like(e, fmt.emin), e - fmt.man)
    )
    mag = _round_magnitude(torch.where(finite, a, 0.0), _pow2(e_step), negative, rounding, rbits)
    big = torch.tensor(max_value, dtype=_F64)
    if fmt.overflow == "inf":
        over = torch.where(_may_round_away(rounding, negative), torch.tensor(float("inf"), dtype=_F64), big)
        inf_input = torch.full_like(a, float("inf"))
    else:
        over = big.expand_as(a)
        inf_input = big.expand_as(a)
    mag = torch.where(mag > max_value, over, mag)
    return torch.where(finite, mag, inf_input)


def _block_max(a: torch.Tensor, fmt: BlockFloatingPoint) -> torch.Tensor:
    """The largest finite magnitude of each element's block, broadcast to a's shape."""
    finite_a = torch.where(torch.isfinite(a), a, 0.0)
    if a.dim() == 0:
        return finite_a.clone()
    if fmt.block_size is None:
        if fmt.dim == -1:  # the whole tensor is one block
            return finite_a.max().expand_as(a).clone()
        d = fmt.dim % a.dim()  # one block per index along d
        others = [i for i in range(a.dim()) if i != d]
        return finite_a.amax(dim=others, keepdim=True).expand_as(a).clone() if others else finite_a.clone()
    d = fmt.dim % a.dim()
    k = fmt.block_size
    moved = finite_a.movedim(d, -1)
    n = moved.shape[-1]
    nb = -(-n // k)
    padded = torch.nn.functional.pad(moved, (0, nb * k - n))  # zeros never raise a maximum
    maxima = padded.reshape(*moved.shape[:-1], nb, k).amax(dim=-1)
    per_element = maxima.repeat_interleave(k, dim=-1)[..., :n]
    return per_element.movedim(-1, d).contiguous()


def block_range(a: torch.Tensor, fmt: BlockFloatingPoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, limit) of each element's block, for magnitudes ``a`` (float64).

    The block holds multiples of ``step`` up to ``limit``; a block with no nonzero finite value,
    or wl=1, holds only 0.

    Args:
        a: the magnitudes (float64).
        fmt: the block floating-point format.

    Returns:
        ``(step, limit)``, float64 tensors of a's shape.
    """
    m = _block_max(a, fmt)
    zero_block = (m == 0) | (fmt.wl == 1)
    e = _floor_log2(torch.where(zero_block, 1.0, m))
    q = _pow2(e - fmt.wl + 2)
    limit = _pow2(e + 1) - q
    # Below 2**-149 the step is finer than float32: the range is the largest float32 below 2**(E+1).
    limit = torch.where(q < 2.0**-149, _pow2(e + 1) - 2.0**-149, limit)
    return q, torch.where(zero_block, 0.0, limit)


def _block(
    a: torch.Tensor,
    finite: torch.Tensor,
    negative: torch.Tensor,
    fmt: BlockFloatingPoint,
    rounding: str,
    rbits: torch.Tensor | None,
) -> torch.Tensor:
    q, limit = block_range(a, fmt)
    mag = _round_magnitude(torch.where(finite, a, 0.0), q, negative, rounding, rbits)
    mag = torch.minimum(mag, limit)
    return torch.where(finite, mag, limit)  # +-Inf: +-range end (0 for an all-zero block)


def reference_quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: str = "nearest",
    key: int | None = None,
) -> torch.Tensor:
    """``x`` rounded to ``fmt`` exactly as the contract says; x's dtype and shape.

    The sign of zero follows x (-0.3 -> -0.0).

    Args:
        x: a floating-point tensor.
        fmt: the format (a ``Format`` or a format string).
        rounding: the rounding mode.
        key: seeds stochastic rounding (the value ``torch.ops.lowp.draw_key`` returns, i.e.
            the key a ``quantize`` call draws); ``None`` draws one from torch's default
            generator, as :func:`lightning_lowp.quantize` does.

    Returns:
        The rounded tensor, of x's dtype, shape and device.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor or ``fmt`` not one of the formats.
        ValueError: for an unknown rounding mode or a bad format string.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    fmt = as_format(fmt)
    check_rounding(rounding)
    x32 = x.detach().cpu().to(torch.float32)
    if x32.numel() == 0:
        return x.detach().clone()
    rbits: torch.Tensor | None = None
    if rounding == "stochastic":
        if key is None:
            key = int(torch.ops.lowp.draw_key())
        counters = kernel_counters(x, fmt).flatten().numpy().astype(np.uint64)
        rbits = torch.from_numpy(random_bits(key, counters).astype(np.float64)).reshape(x.shape)
    v = x32.to(_F64)
    nan = torch.isnan(v)
    finite = torch.isfinite(v)
    negative = torch.signbit(v)
    a = v.abs()
    if isinstance(fmt, FixedPoint):
        mag = _fixed(a, finite, negative, fmt, rounding, rbits)
    elif isinstance(fmt, FloatingPoint):
        mag = _float(a, finite, negative, fmt, rounding, rbits)
    elif isinstance(fmt, BlockFloatingPoint):
        mag = _block(a, finite, negative, fmt, rounding, rbits)
    else:
        raise TypeError(f"fmt must be FixedPoint, FloatingPoint or BlockFloatingPoint, got {type(fmt).__name__}")
    # Every rounded magnitude is a float32 or at least 2**128 (-> Inf), so this cast is exact.
    result = torch.copysign(mag, v).to(torch.float32)
    result = torch.where(nan, x32, result)  # NaN stays NaN (payload kept)
    return result.to(x.dtype).to(x.device)
