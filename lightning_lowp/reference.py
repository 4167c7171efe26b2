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

* ScaledFormat: as BlockFloatingPoint: when the blocks are runs of ``k`` or ``"row"`` along a
  dim that is not the last, the row-major index in ``x.movedim(dim, -1)``; otherwise (tiles,
  ``"tensor"``, blocks along the last dim, 0-d tensors) the row-major logical index.

A consequence of the counters: stochastic results depend on the memory layout of ``x``, not only on its
values and the seed (``quantize(x.t().contiguous().t())`` draws differently from
``quantize(x)``); non-stochastic modes do not.

Scaled formats (:class:`~lightning_lowp.formats.ScaledFormat`, see :func:`scaled_block_scales`
for the scales) round ``x / s`` onto the element's grid, ``s`` the block's scale, and return
``float32(q * s)``. The scale is a power of two (E8M0) or a float32 (``fp32``, and
``fp8_e4m3`` values, possibly times NVFP4's float32 tensor scale), so ``s = S * 2**b`` with
``S`` an integer below 2**24. Every step below is exact in float64 and correctly rounded with
respect to the real quotient ``|x| / s``, with no double rounding:

* ``xs = |x| * 2**-b`` is exact (a power-of-two scaling), so ``|x| / s = xs / S``;
* a quotient at or past the element's largest value ``max`` (``xs >= max * S``, exact)
  saturates to ``max`` in every mode; below it, the element's neighbours ``lo = k * step``
  and ``hi = lo + step`` of ``xs / S`` are found from the rounded float64 quotient and then
  *checked* exactly: ``k * step * S <= xs < (k + 1) * step * S`` (``k + 1 <= 2**24`` and
  ``S < 2**24``: at most 48 significant bits), and the binade of a float element the same
  way (``2**e * S <= xs < 2**(e+1) * S``);
* the remainder ``u = (xs - lo * S) / step`` in ``[0, S)`` is exact: xs (24 bits) and
  ``lo * S`` are multiples of the smaller of their units, and the difference, below
  ``step * S``, is fewer than 2**48 of them (if ``lo > 0`` then ``xs >= step``, so xs's unit
  is above ``step * 2**-24``). Then ``frac = u / S``: nearest compares ``2u`` with ``S``, the
  directed modes ``u`` with 0, and stochastic rounding needs ``floor(frac * 2**32) =
  floor(floor(u * 2**32) / S)``, an integer division of integers below 2**56 (in int64);
* ``q * s`` has at most 25 + 24 significant bits, so it is exact, and the final cast to
  float32 is the one rounding (to nearest even; past float32's range it is Inf, as IEEE 754
  says: e.g. ``ceil`` scales can round a block near 2**128 up to it).

The float32 arithmetic of the scales themselves (``amax / max_element``, NVFP4's
``block / tensor_scale`` and ``tensor_scale * e4m3``) is done in float64 and then rounded to
float32: a product of two float32 is exact in float64, and a quotient held to 53 bits
(more than 2 * 24 + 2) rounds to the correctly rounded float32 quotient, subnormal results
included, so this is exactly IEEE float32 arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from lightning_lowp.formats import (
    BlockFloatingPoint,
    FixedPoint,
    FloatingPoint,
    Format,
    FormatLike,
    ScaledFormat,
    as_format,
    check_rounding,
)

__all__ = ["reference_quantize", "random_bits", "kernel_counters", "block_range", "scaled_block_scales"]

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
    if isinstance(fmt, ScaledFormat):
        if x.dim() > 0 and (isinstance(fmt.block, int) or fmt.block == "row"):
            d = _scaled_dim(x.dim(), fmt)
            if d != x.dim() - 1:
                moved = torch.arange(x.numel(), dtype=torch.int64).reshape(x.movedim(d, -1).shape)
                return moved.movedim(-1, d).contiguous()
        return torch.arange(x.numel(), dtype=torch.int64).reshape(shape)
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


# ---- scaled formats -----------------------------------------------------------------------

_E4M3 = FloatingPoint(4, 3, specials="fn", overflow="saturate")  # the fp8_e4m3 preset (OCP E4M3)
_E4M3_MAX = _E4M3.max_value  # 448
_E4M3_TINY = 2.0**-9  # the smallest positive E4M3 value (a subnormal)
_E4M3_EPS = 2.0**-6  # the smallest normal E4M3 value: torchao's NVFP4 block-scale floor (E4M3_EPS)
_FP32_TINY = 2.0**-149  # the smallest positive float32
_E8M0_RANGE = (-127, 127)  # the exponents an E8M0 scale 2^E holds (255 is NaN)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to nearest float32 (ties to even; beyond float32's range +-Inf), as float64."""
    return t.to(torch.float32).to(_F64)


def _ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """ceil(log2(a)) for positive finite float64 a, exactly."""
    e = _floor_log2(a)
    return e + (a != _pow2(e)).to(torch.int64)


def _scaled_dim(ndim: int, fmt: ScaledFormat) -> int:
    """The dim (in 0..ndim-1) the runs or rows of ``fmt`` follow in a tensor of ``ndim`` dims."""
    n = max(ndim, 1)
    if not -n <= fmt.dim < n:
        raise ValueError(f"dim={fmt.dim} of {fmt} is out of range for a tensor with {ndim} dims")
    return fmt.dim % n


def _block_ids(shape: torch.Size, fmt: ScaledFormat) -> tuple[torch.Tensor, int]:
    """The block of every element (int64, of the given shape) and the number of blocks."""
    ndim = len(shape)
    block = fmt.block
    if isinstance(block, tuple):
        if ndim < 2:
            raise ValueError(f"block={block!r} is a tile over the last two dims; the tensor has {ndim} dims")
        (r, c), (rows, cols) = block, shape[-2:]
        lead = math.prod(shape[:-2])
        n_r, n_c = -(-rows // r), -(-cols // c)
        ids = (torch.arange(lead).view(-1, 1, 1) * n_r + (torch.arange(rows) // r).view(1, -1, 1)) * n_c + (
            torch.arange(cols) // c
        ).view(1, 1, -1)
        return ids.reshape(shape), lead * n_r * n_c
    d = _scaled_dim(ndim, fmt)
    if block == "tensor" or ndim == 0:
        return torch.zeros(shape, dtype=torch.int64), 1
    size = shape[d]
    others = math.prod(shape) // size if size else 0
    per_row = 1 if block == "row" else -(-size // int(block))
    along = torch.zeros(size, dtype=torch.int64) if block == "row" else torch.arange(size) // int(block)
    moved_shape = [*shape[:d], *shape[d + 1 :], size]
    ids = (torch.arange(others).view(-1, 1) * per_row + along.view(1, -1)).reshape(moved_shape)
    return ids.movedim(-1, d).contiguous(), others * per_row


def _element_mbits(element: FixedPoint | FloatingPoint) -> int:
    """The element's mantissa bits, as torchao's EVEN rule counts them (fixed point: wl - 2)."""
    return element.man if isinstance(element, FloatingPoint) else element.wl - 2


def _e8m0_exponent(amax: torch.Tensor, fmt: ScaledFormat) -> torch.Tensor:
    """E of the scales 2^E of blocks with largest finite magnitudes ``amax`` (float64, >= 0).

    torchao's ScaleCalculationMode reads E off the float32 bits of amax; here the same numbers
    in real terms, emax = floor(log2(max_element)):

    * floor: floor(log2 amax) - emax (a float32-subnormal amax by its true exponent);
    * ceil: ceil(log2 amax) - emax; torchao's bits (biased exponent + (mantissa != 0)) read a
      subnormal amax as 2^-126 (exponent field 0 - 127, plus 1), so amax is raised to 2^-126
      first;
    * even: floor(log2(amax + h)) - emax, h = 2^(e - mbits - 1) half a unit in the (mbits+1)-th
      significant place of amax (e = its binade, at least -126 as float32 encodes it): adding
      1 << (22 - mbits) to the bits carries into the exponent field exactly when amax + h
      reaches the next power of two; an exponent field of 0 reads as -127. No rounding for
      mbits >= 23;
    * rceil: ceil(log2 d) with d = float32(amax / max_element); d = 0 gives -127 and d = Inf
      (max_element < 1) 127, as torchao's ``_to_mx_rceil`` does.

    Then E is clamped to -127..127, and a block with no finite nonzero value gets -127.
    """
    emax = fmt.element_emax
    zero = amax == 0
    safe = torch.where(zero, 1.0, amax)
    rule = fmt.scale_rounding
    if rule == "floor":
        e = _floor_log2(safe) - emax
    elif rule == "ceil":
        e = _ceil_log2(torch.clamp(safe, min=2.0**-126)) - emax
    elif rule == "even":
        mbits = _element_mbits(fmt.element)
        binade = torch.clamp(_floor_log2(safe), min=-126)
        half = _pow2(binade - mbits - 1) if mbits <= 22 else torch.zeros_like(safe)
        e = torch.clamp(_floor_log2(safe + half), min=-127) - emax  # amax + half: exact (few bits)
    else:  # rceil
        d = _f32(safe / fmt.element_max)  # float32 division
        ceil_d = _ceil_log2(torch.where((d > 0) & torch.isfinite(d), d, 1.0))
        e = torch.where(d == 0, -127, torch.where(torch.isinf(d), 127, ceil_d))
    return torch.where(zero, _E8M0_RANGE[0], torch.clamp(e, *_E8M0_RANGE))


def _round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 values rounded to nearest E4M3, saturating at 448 (Inf included)."""
    return _float(v, torch.isfinite(v), torch.zeros_like(v, dtype=torch.bool), _E4M3, "nearest", None)


def _block_scales(amax: torch.Tensor, tensor_amax: torch.Tensor, fmt: ScaledFormat) -> tuple[torch.Tensor, float]:
    """(The scale of each block, float64, 0 for a zero scale; Inf's scale where that is 0).

    Inf's scale in a block whose scale is 0 is the smallest positive scale of the format.
    """
    zero = amax == 0  # no finite nonzero value: the scale is 0 (every element rounds to +-0)
    if fmt.scale == "e8m0":
        return _pow2(_e8m0_exponent(amax, fmt)), 0.0  # never 0
    max_element = fmt.element_max
    if not fmt.tensor_scale:
        s = _f32(amax / max_element)  # float32 division
        if fmt.scale == "fp8_e4m3":
            return torch.where(zero, 0.0, _round_e4m3(s)), _E4M3_TINY
        return torch.where(zero, 0.0, s), _FP32_TINY
    # NVFP4, in torchao's float32 operations (nvfp4_quantize with a per-tensor scale):
    # per_tensor_scale = amax_tensor / (448 * 6); block = amax / 6; scaled = block / per_tensor_scale,
    # clamped to [E4M3_EPS, 448] and cast to E4M3; total = per_tensor_scale * e4m3 (get_hp_scales).
    pts = _f32(tensor_amax / float(_f32(torch.tensor(_E4M3_MAX * max_element, dtype=_F64))))
    block = _f32(amax / max_element)
    scaled = _f32(torch.where(zero, 1.0, block) / pts)  # pts == 0: Inf, clamped to 448 (total 0)
    e4m3 = _round_e4m3(torch.clamp(scaled, _E4M3_EPS, _E4M3_MAX))
    total = _f32(pts * e4m3)
    return torch.where(zero, 0.0, total), float(_f32(pts * _E4M3_TINY))


def _scales(v: torch.Tensor, fmt: ScaledFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, Inf's scale) of every element of v (float64 holding float32 values; v's shape).

    Inf's scale is the block's scale, or where that is 0 the smallest positive scale the
    format has: 2^-149 (fp32), 2^-9 (fp8_e4m3), 2^-9 * the tensor scale (NVFP4, in float32).
    """
    ids, n_blocks = _block_ids(v.shape, fmt)
    a = torch.where(torch.isfinite(v), v.abs(), 0.0).flatten()
    amax = torch.zeros(n_blocks, dtype=_F64).scatter_reduce(0, ids.flatten(), a, "amax")
    tensor_amax = a.max() if a.numel() else torch.tensor(0.0, dtype=_F64)
    per_block, tiny = _block_scales(amax, tensor_amax, fmt)
    s = per_block[ids]
    return s, torch.where(s == 0, tiny, s)


def scaled_block_scales(x: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """The scale ``s`` of every element's block under a scaled format (float64, x's shape).

    E8M0 scales are 2^E; float scales are float32 values; a block with no finite nonzero
    value (or whose float scale underflows) has scale 0, and its finite elements become +-0.

    Args:
        x: a floating-point tensor (its values as float32 set the scales).
        fmt: a :class:`~lightning_lowp.formats.ScaledFormat` or its spec.

    Returns:
        A float64 CPU tensor of x's shape.

    Raises:
        TypeError: if ``fmt`` is not a scaled format.
        ValueError: for a tile on a tensor of fewer than 2 dims (naming ``block``), or a dim
            out of range.
    """
    fmt = as_format(fmt)
    if not isinstance(fmt, ScaledFormat):
        raise TypeError(f"fmt must be a ScaledFormat, got {type(fmt).__name__}")
    _check_element(fmt)
    return _scales(x.detach().cpu().to(torch.float32).to(_F64), fmt)[0]


def _check_element(fmt: ScaledFormat) -> None:
    if not fmt.element_max > 0:
        raise ValueError(f"element={fmt.element} has no positive value to scale a block to")


def _round_scaled(
    a: torch.Tensor,
    s: torch.Tensor,
    negative: torch.Tensor,
    element: FixedPoint | FloatingPoint,
    rounding: str,
    rbits: torch.Tensor | None,
) -> torch.Tensor:
    """The element q nearest |x| / s in the mode (float64 magnitudes), saturated at max.

    For finite a = |x| >= 0 and s > 0; see the module docstring for why every step is exact.
    """
    big = element.max_value
    m, e = torch.frexp(s)
    big_s = m * 2.0**24  # S: an integer below 2**24 (s has at most 24 significant bits)
    xs = torch.ldexp(a, 24 - e.to(torch.int64))  # |x| / 2**b, b = e - 24: so |x| / s = xs / S
    over = xs >= big * big_s  # |x| / s >= max: every mode gives max (max is on the grid)
    inside = (xs > 0) & ~over
    xs = torch.where(inside, xs, 0.5)  # (stand-ins where the result is set below)
    big_s = torch.where(inside, big_s, 1.0)
    t = xs / big_s  # the quotient rounded to float64: a first guess, checked exactly below
    if isinstance(element, FloatingPoint):
        eb = _floor_log2(t)
        eb = eb - (_pow2(eb) * big_s > xs).to(torch.int64)
        eb = eb + (_pow2(eb + 1) * big_s <= xs).to(torch.int64)  # 2**eb <= |x| / s < 2**(eb+1)
        e_step = (
            torch.clamp(eb, min=element.emin) - element.man
            if element.subnormals
            else torch.where(eb < element.emin, torch.full_like(eb, element.emin), eb - element.man)
        )
        step = _pow2(e_step)
    else:
        step = torch.full_like(t, element.step)
    k = torch.floor(t / step)
    k = k - (k * step * big_s > xs).to(_F64)
    k = k + ((k + 1) * step * big_s <= xs).to(_F64)  # lo = k * step <= |x| / s < lo + step
    u = (xs - k * step * big_s) / step  # frac = u / S, u in [0, S)
    if rounding == "nearest":
        up = (2 * u > big_s) | ((2 * u == big_s) & (torch.remainder(k, 2) == 1))
    elif rounding == "nearest_away":
        up = 2 * u >= big_s
    elif rounding == "toward_zero":
        up = torch.zeros_like(u, dtype=torch.bool)
    elif rounding == "down":
        up = negative & (u > 0)
    elif rounding == "up":
        up = ~negative & (u > 0)
    else:  # stochastic: away from zero iff r < floor(frac * 2**32) = floor(floor(u * 2**32) / S)
        if rbits is None:
            raise ValueError(f"rounding={rounding!r} needs the random bits")
        threshold = torch.floor(u * _TWO32).to(torch.int64) // big_s.to(torch.int64)
        up = rbits < threshold.to(_F64)
    q = torch.minimum(torch.where(up, (k + 1) * step, k * step), torch.tensor(big, dtype=_F64))
    return torch.where(over, big, torch.where(inside, q, 0.0))


def _scaled(
    v: torch.Tensor, finite: torch.Tensor, fmt: ScaledFormat, rounding: str, rbits: torch.Tensor | None
) -> torch.Tensor:
    """|result| before the final float32 rounding: q * s (exact), max * s for +-Inf."""
    _check_element(fmt)
    s, inf_s = _scales(v, fmt)
    a = v.abs()
    positive_scale = s > 0
    q = _round_scaled(
        torch.where(finite & positive_scale, a, 0.0),
        torch.where(positive_scale, s, 1.0),
        torch.signbit(v),
        fmt.element,
        rounding,
        rbits,
    )
    mag = torch.where(positive_scale, q * s, 0.0)  # a zero scale: every finite element is +-0
    return torch.where(finite, mag, fmt.element_max * inf_s)  # +-Inf: +-max times the scale


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
        ValueError: for an unknown rounding mode or a bad format string; for a scaled format,
            a tile (``block=(r, c)``) on a tensor of fewer than 2 dims (naming ``block``) or a
            ``dim`` out of range.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    fmt = as_format(fmt)
    check_rounding(rounding)
    x32 = x.detach().cpu().to(torch.float32)
    if isinstance(fmt, ScaledFormat):
        _check_element(fmt)
        _block_ids(torch.Size([0] * x.dim()), fmt)  # a tile needs 2 dims, dim must be in range
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
    if isinstance(fmt, ScaledFormat):
        mag = _scaled(v, finite, fmt, rounding, rbits)
    elif isinstance(fmt, FixedPoint):
        mag = _fixed(a, finite, negative, fmt, rounding, rbits)
    elif isinstance(fmt, FloatingPoint):
        mag = _float(a, finite, negative, fmt, rounding, rbits)
    elif isinstance(fmt, BlockFloatingPoint):
        mag = _block(a, finite, negative, fmt, rounding, rbits)
    else:
        raise TypeError(
            f"fmt must be FixedPoint, FloatingPoint, BlockFloatingPoint or ScaledFormat, got {type(fmt).__name__}"
        )
    # Every rounded magnitude is a float32 or at least 2**128 (-> Inf), so this cast is exact;
    # except a scaled format's q * s (exact in float64), which it rounds to nearest, once.
    result = torch.copysign(mag, v).to(torch.float32)
    result = torch.where(nan, x32, result)  # NaN stays NaN (payload kept)
    return result.to(x.dtype).to(x.device)
