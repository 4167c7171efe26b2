"""Adversarial inputs for scaled formats, shared by the reference's tests and the kernels'.

Blocks whose amax sits at, just below and just above powers of two, float32-subnormal amax,
exact ties of each block's element grid and their float32 neighbours, all-zero blocks,
Inf/NaN inside blocks, partial runs and tiles.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import torch
from helpers import f32

from lightning_lowp.formats import FixedPoint, ScaledFormat
from lightning_lowp.reference import scaled_block_scales


def codes(element) -> tuple[list[Fraction], list[bool]]:
    """The element's non-negative values up to its largest, in increasing order, decoded from
    its codes, and whether each one's code is even (ties go to the even code)."""
    if isinstance(element, FixedPoint):
        ks = range(2 ** (element.wl - 1))
        return [Fraction(k) / 2**element.fl for k in ks], [k % 2 == 0 for k in ks]
    bias, values, even = 2 ** (element.exp - 1) - 1, [], []
    for code in range(2 ** (element.exp + element.man)):
        e, m = divmod(code, 2**element.man)
        if e == 0 and m and not element.subnormals:
            continue
        if e == 0:
            v = Fraction(m, 2**element.man) * Fraction(2) ** (1 - bias)
        else:
            v = (1 + Fraction(m, 2**element.man)) * Fraction(2) ** (e - bias)
        if v > Fraction(element.max_value):
            break
        values.append(v)
        even.append(code % 2 == 0)
    return values, even


def magnitudes(element) -> list[Fraction]:
    return codes(element)[0]


AMAXES = [
    *(2.0**e * m for e in (-140, -127, -126, -125, -60, -1, 0, 1, 9, 30, 100, 120, 126, 127)
      for m in (1.0, 1 - 2.0**-24, 1 + 2.0**-23, 1.75, 2 - 2.0**-23)),
    957.0, 1000.0, 448.0 * 2 ** (1 / 3), 6.0 * 1.1, 2.0**-149, 3 * 2.0**-149,
]  # fmt: skip


def regions_of(fmt: ScaledFormat, shape: tuple[int, ...]) -> list[tuple]:
    """The blocks of fmt in a tensor of that shape, as index tuples (basic slicing).

    (Runs along the last dim and rows only: the layouts the adversarial inputs use.)"""
    if fmt.block == "tensor":
        return [tuple(slice(None) for _ in shape)]
    if isinstance(fmt.block, tuple):
        r, c = fmt.block
        return [(slice(i, i + r), slice(j, j + c)) for i in range(0, shape[0], r) for j in range(0, shape[1], c)]
    assert fmt.dim == -1
    k = shape[-1] if fmt.block == "row" else fmt.block
    return [(i, slice(j, j + k)) for i in range(shape[0]) for j in range(0, shape[1], k)]


def adversarial(fmt: ScaledFormat, shape: tuple[int, ...], amaxes, rng, specials: bool = True) -> torch.Tensor:
    """A tensor whose blocks each hold an amax from the list and, for the rest, exact ties of
    that block's element grid (x = s * midpoint, when that is a float32) and their float32
    neighbours, at most amax, random signs. The first four blocks are special (when asked):
    all zeros (and -0), Inf/NaN among normal values, only Inf/NaN, and a NaN among small values."""
    grid = [float(v) for v in magnitudes(fmt.element)]
    mids = np.array([(a + b) / 2 for a, b in itertools.pairwise(grid)] + grid)
    x = torch.zeros(shape)
    regions = regions_of(fmt, shape)
    normal = []
    for i, reg in enumerate(regions):
        n = x[reg].numel()
        if specials and i < 4 and len(regions) > 4:
            v = np.zeros(n)
            if i == 0:
                v[::2] = -0.0
            elif i == 1:
                v = rng.standard_normal(n)
                v[rng.integers(0, n, 3)] = [np.inf, np.nan, -np.inf]
            elif i == 2:
                v[::3], v[1::3] = -np.inf, np.nan
            else:
                v = rng.standard_normal(n) * 1e-3
                v[0] = np.nan
            x[reg] = f32(v).reshape(x[reg].shape)
        else:
            amax = float(f32([amaxes[len(normal) % len(amaxes)]])[0])
            if not 0 < amax < math.inf:
                continue
            flat = torch.zeros(n)
            flat[0] = amax
            x[reg] = flat.reshape(x[reg].shape)
            normal.append((reg, amax))
    scales = scaled_block_scales(x, fmt)  # the other elements do not change any block's amax
    for reg, amax in normal:
        n = x[reg].numel()
        s = float(scales[reg].flatten()[0])
        vals = f32(np.minimum(rng.choice(mids, n - 1) * s, amax)).numpy()
        with np.errstate(over="ignore"):
            toward = rng.choice([-np.inf, 0.0, np.inf], n - 1).astype(np.float32)
            vals = np.where(toward == 0, vals, np.nextafter(vals, toward))
        flat = x[reg].flatten().clone()
        flat[1:] = f32(np.minimum(np.abs(vals.astype(np.float64)), amax) * rng.choice([-1.0, 1.0], n - 1))
        x[reg] = flat.reshape(x[reg].shape)
    return x


def adversarial_cases(fmt: ScaledFormat, rng: np.random.Generator) -> list[torch.Tensor]:
    """Adversarial tensors for a format: one holding a block per amax (blocks of 32 for runs
    and rows), one per amax for whole-tensor blocks, a few of partial tiles, and for a tensor
    scale (NVFP4) one per amax with blocks at fractions of it (the tensor scale moves)."""
    if fmt.tensor_scale:
        k = fmt.block if isinstance(fmt.block, int) else 16
        return [adversarial(fmt, (4, k), [a, a * 0.37, a * 0.011, a * 3e-5], rng, False) for a in AMAXES]
    if fmt.block == "tensor":
        return [adversarial(fmt, (1, 32), [a], rng) for a in AMAXES]
    if isinstance(fmt.block, tuple):
        r, c = fmt.block
        shape = (2 * r + 1, 2 * c + 3)  # partial tiles at both edges
        return [adversarial(fmt, shape, AMAXES[i::5], rng, i == 0) for i in range(2)]
    k = fmt.block if isinstance(fmt.block, int) else 32
    return [adversarial(fmt, (len(AMAXES) + 4, k), AMAXES, rng)]
