"""The exact, sequential reference of low-precision accumulation (DESIGN.md, "Accumulation").

``reference_matmul(a, b, accumulate, accumulate_rounding, chunk, key)`` computes, for every
output element, the products ``fl32(a[m, k] * b[k, n])`` in k order and adds each one into an
accumulator held in the ``accumulate`` format, rounding every addition once, correctly, from
the exact sum (a ``fractions.Fraction``; no float64 intermediate, which could round twice or
lose a small addend next to a large one). With ``chunk=c`` the accumulator is added into a
float32 accumulator (rounded to nearest) every ``c`` products and reset to zero (promotion,
as in DeepSeek-V3's N_C = 128). Slow and obviously correct: the kernels are held to it.

With ``accumulate=AlignedSum(group, bits)`` (the tensor-core model, see
``lightning_lowp.accumulators``) the products are taken ``group`` at a time instead
(``_aligned_group``: align to the largest exponent, truncate to ``bits`` bits, sum exactly,
round to float32 in ``accumulate_rounding``); promotion happens after whole groups.

Conventions the kernels follow:

* the random bits of the addition of product k into output element (m, n) of an M x N
  result with K products each are ``random_bits(key, (m * N + n) * K + k)`` (batches
  flattened into m);
* stochastic rounding rounds the magnitude up when those 32 bits are below
  ``floor(2**32 * frac)``, frac the exact fraction of a step above the lower neighbour;
* an exact zero sum is +0 (the sum of two float32 values rounded to nearest, as the kernels'
  first addition computes it), so ``-0 + -0`` is -0 and ``x + -x`` is +0 in every mode;
* a non-finite product or accumulator propagates as in float32 (NaN stays NaN; Inf stays Inf
  in a format with Inf, else becomes its largest value); a finite sum beyond the format's
  largest value overflows as a rounding there does (to Inf where the format overflows to Inf
  and the mode rounds away from zero, else to the largest value).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from lightning_lowp.accumulators import FLOAT32, Accumulation, AccumulatorLike, AlignedSum
from lightning_lowp.formats import FloatingPoint
from lightning_lowp.reference import random_bits

__all__ = ["reference_matmul", "round_exact"]


def _floor_log2(v: Fraction) -> int:
    """floor(log2(v)) of a positive rational, exactly."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    # 2^e <= v < 2^(e+1) after at most one correction
    if Fraction(2) ** e > v:
        e -= 1
    elif Fraction(2) ** (e + 1) <= v:
        e += 1
    return e


def _may_round_away(rounding: str, negative: bool) -> bool:
    if rounding == "toward_zero":
        return False
    if rounding == "down":
        return negative
    if rounding == "up":
        return not negative
    return True


def round_exact(v: Fraction, fmt: FloatingPoint, rounding: str, rbits: int = 0) -> float:
    """The exact rational ``v`` rounded once to ``fmt`` in ``rounding`` (a Python float).

    Args:
        v: the exact value (nonzero; zeros are the caller's, see the module's conventions).
        fmt: the float format.
        rounding: one of ``lp.ROUNDING_MODES``.
        rbits: 32 random bits for ``"stochastic"``.
    """
    negative = v < 0
    a = -v if negative else v
    e = _floor_log2(a)
    below_normals = fmt.emin - fmt.man if fmt.subnormals else fmt.emin
    e_q = e - fmt.man if e >= fmt.emin else below_normals
    q = a / Fraction(2) ** e_q
    k = math.floor(q)
    frac = q - k
    if rounding == "nearest":
        up = frac > Fraction(1, 2) or (frac == Fraction(1, 2) and k % 2 == 1)
    elif rounding == "nearest_away":
        up = frac >= Fraction(1, 2)
    elif rounding == "toward_zero":
        up = False
    elif rounding == "down":
        up = negative and frac > 0
    elif rounding == "up":
        up = (not negative) and frac > 0
    else:  # stochastic
        up = rbits < math.floor(frac * 2**32)
    mag = Fraction(k + int(up)) * Fraction(2) ** e_q
    if mag > Fraction(fmt.max_value):
        mag_f = math.inf if fmt.overflow == "inf" and _may_round_away(rounding, negative) else fmt.max_value
    else:
        mag_f = float(mag)  # on fmt's grid, within float32's range: exact
    return -mag_f if negative else mag_f


def _add(acc: float, p: float, fmt: FloatingPoint, rounding: str, rbits: int) -> float:
    """The sum acc + p rounded once to fmt (acc on fmt's grid, p a float32 value)."""
    if not (math.isfinite(acc) and math.isfinite(p)):
        s = acc + p  # inf or nan, as in float32
        if math.isnan(s) or fmt.overflow == "inf":
            return s
        return math.copysign(fmt.max_value, s)
    exact = Fraction(acc) + Fraction(p)
    if exact == 0:
        return -0.0 if math.copysign(1.0, acc) < 0 and math.copysign(1.0, p) < 0 else 0.0
    return round_exact(exact, fmt, rounding, rbits)


def _f32(x: float) -> float:
    """The value x rounded to float32 (nearest even; overflow to Inf), as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _aligned_group(acc: float, products: list[float], group: AlignedSum, rounding: str) -> float:
    """One group of the tensor-core accumulator (``AlignedSum``): the new float32 accumulator.

    The accumulator and the products are aligned to the largest exponent ``e`` among the
    nonzero finite ones, truncated toward zero to multiples of ``2**(e - bits + 1)``, summed
    exactly, and the sum rounded to float32. A zero sum is -0 only when every term is -0
    (as in IEEE addition; a negative term truncated to zero counts as -0). Inf and NaN
    propagate as in a float32 sum.
    """
    terms = [acc, *products]
    special = [t for t in terms if not math.isfinite(t)]
    if special:
        return sum(special, 0.0)  # Inf, or NaN for NaN or Inf - Inf
    nonzero = [t for t in terms if t != 0]
    if not nonzero:
        return -0.0 if all(math.copysign(1.0, t) < 0 for t in terms) else 0.0
    e = max(_floor_log2(abs(Fraction(t))) for t in nonzero)
    step = Fraction(2) ** (e - group.bits + 1)
    truncated = [math.trunc(Fraction(t) / step) * step for t in terms]
    total = sum(truncated, Fraction(0))
    if total == 0:
        negative_zero = all(v == 0 and math.copysign(1.0, t) < 0 for v, t in zip(truncated, terms, strict=True))
        return -0.0 if negative_zero else 0.0
    return round_exact(total, FLOAT32, rounding)


def reference_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    accumulate: AccumulatorLike,
    accumulate_rounding: str = "nearest",
    chunk: int | None = None,
    key: int = 0,
) -> torch.Tensor:
    """``a @ b`` with every addition of the products rounded once to ``accumulate`` (see the module).

    Args:
        a: (..., M, K), float32 values.
        b: (K, N) or (..., K, N), float32 values (broadcast as in ``torch.matmul``).
        accumulate: the accumulator's float format, or an ``AlignedSum``.
        accumulate_rounding: the rounding mode of every addition (of an ``AlignedSum``'s store).
        chunk: promote into a float32 accumulator every ``chunk`` products; ``None``: never.
        key: the stochastic-rounding key.

    Returns:
        A float32 tensor (..., M, N).
    """
    acc_fmt = Accumulation(accumulate, accumulate_rounding, chunk).accumulator  # checks all three
    a3 = a.detach().to(torch.float32).cpu()
    b3 = b.detach().to(torch.float32).cpu()
    batch = torch.broadcast_shapes(a3.shape[:-2], b3.shape[:-2])
    a3 = a3.expand(*batch, *a3.shape[-2:]).reshape(-1, *a3.shape[-2:])
    b3 = b3.expand(*batch, *b3.shape[-2:]).reshape(-1, *b3.shape[-2:])
    n_batch, m_rows, k_len = a3.shape
    n_cols = b3.shape[-1]
    out = torch.empty(n_batch, m_rows, n_cols, dtype=torch.float32)
    av, bv = a3.numpy().astype(np.float64), b3.numpy().astype(np.float64)
    counters = np.arange(n_batch * m_rows * n_cols * k_len, dtype=np.uint64)
    rbits = random_bits(key, counters) if accumulate_rounding == "stochastic" else None
    for i in range(n_batch):
        for m in range(m_rows):
            for n in range(n_cols):
                row = (i * m_rows + m) * n_cols + n
                # fl32(a * b): exact in float64, then rounded to float32
                products = [_f32(av[i, m, k] * bv[i, k, n]) for k in range(k_len)]
                acc, acc32 = 0.0, 0.0
                if isinstance(acc_fmt, AlignedSum):
                    step = acc_fmt.group
                    for k0 in range(0, k_len, step):
                        acc = _aligned_group(acc, products[k0 : k0 + step], acc_fmt, accumulate_rounding)
                        if chunk is not None and (k0 + step) % chunk == 0:
                            acc32, acc = _add(acc32, acc, FLOAT32, "nearest", 0), 0.0
                else:
                    for k, p in enumerate(products):
                        r = int(rbits[row * k_len + k]) if rbits is not None else 0
                        acc = _add(acc, p, acc_fmt, accumulate_rounding, r)
                        if chunk is not None and (k + 1) % chunk == 0:
                            acc32, acc = _add(acc32, acc, FLOAT32, "nearest", 0), 0.0
                out[i, m, n] = _add(acc32, acc, FLOAT32, "nearest", 0) if chunk is not None else acc
    return out.reshape(*batch, m_rows, n_cols)
