"""The compiled kernels against the float64 reference (lightning_lowp.reference), bit for bit.

Every format kind x every rounding mode, on hypothesis-drawn float32 bit patterns and on
adversarial inputs built per format (exact ties, their float32 neighbours, subnormals of
float32 and of the format, the largest finite value and the overflow threshold, NaN, +-Inf,
+-0, all-zero blocks, blocks holding Inf/NaN, ragged block runs along every dim). Also: other
input dtypes, non-contiguous inputs, an independent check of the reference itself (decoded
code tables and torch's casts), and statistical tests of stochastic rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import f32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_lowp as lp
from lightning_lowp.formats import PRESETS, ROUNDING_MODES, BlockFloatingPoint, FixedPoint, FloatingPoint
from lightning_lowp.reference import kernel_counters, random_bits, reference_quantize

FLOAT_PRESETS = [fmt for fmt in PRESETS.values() if isinstance(fmt, FloatingPoint)]  # the element-wise presets

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = 2.0**-149
SPECIAL_VALUES = [0.0, -0.0, math.inf, -math.inf, math.nan, F32_MAX, -F32_MAX, F32_TINY, -F32_TINY, 2.0**-126]


# ---- helpers ------------------------------------------------------------------------------


def from_bits(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint64).astype(np.uint32).view(np.float32).copy())


def with_neighbours(x: torch.Tensor) -> torch.Tensor:
    """x, its float32 neighbours on both sides, and all of them negated."""
    a = x.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        up = np.nextafter(a, np.float32(np.inf))
        down = np.nextafter(a, np.float32(-np.inf))
    out = torch.from_numpy(np.concatenate([a, up, down]))
    return torch.cat([out, -out, torch.tensor(SPECIAL_VALUES, dtype=torch.float32)])


def ties_around(points, steps) -> np.ndarray:
    """Grid points p and p + {1/4, 1/2, 3/4, 1} * q (exact ties and quarter points)."""
    p = np.asarray(points, dtype=np.float64)[:, None]
    q = np.broadcast_to(np.asarray(steps, dtype=np.float64), p.shape[:1])[:, None]
    return (p + q * np.array([0.0, 0.25, 0.5, 0.75, 1.0])).ravel()


def as_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64)  # exact for every floating dtype


def assert_same(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality (signed zeros included); NaN must meet NaN."""
    assert got.shape == expected.shape, what
    assert got.dtype == expected.dtype, what
    g, e = as_f64(got), as_f64(expected)
    g_nan, e_nan = torch.isnan(g), torch.isnan(e)
    bad = (g_nan != e_nan) | (~g_nan & (g.view(torch.int64) != e.view(torch.int64)))
    if bad.any():
        idx = bad.flatten().nonzero()[:6].flatten()
        xs = as_f64(x).flatten()[idx]
        rows = [
            f"x={xv!r} (f32 bits {xb & 0xFFFFFFFF:#010x}): kernel {gv!r}, reference {ev!r}"
            for xv, xb, gv, ev in zip(
                xs.tolist(),
                x.detach().cpu().float().flatten()[idx].view(torch.int32).tolist(),
                g.flatten()[idx].tolist(),
                e.flatten()[idx].tolist(),
                strict=False,
            )
        ]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ\n  " + "\n  ".join(rows))


def check(x: torch.Tensor, fmt, rounding: str, seed: int = 1234) -> torch.Tensor:
    """quantize(x) == reference_quantize(x) with the key the kernel drew."""
    got = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(seed))
    key = torch.ops.lowp.draw_key(torch.Generator().manual_seed(seed))
    expected = reference_quantize(x, fmt, rounding, key=key)
    assert_same(got, expected, x, f"{fmt!r} {rounding} shape={tuple(x.shape)}")
    return got


# ---- formats and inputs -----------------------------------------------------------------------

rounding_modes = st.sampled_from(ROUNDING_MODES)


@st.composite
def fixed_formats(draw):
    wl = draw(st.integers(1, 25))
    fl = draw(st.one_of(st.integers(-8, 30), st.integers(wl - 128, 149)))
    return FixedPoint(wl, fl, clamp=draw(st.booleans()), symmetric=draw(st.booleans()))


@st.composite
def float_formats(draw):
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(FLOAT_PRESETS))
    specials = draw(st.sampled_from(["ieee", "fn", "none"]))
    # exp=8 without Inf codes reaches past float32's range and is refused by FloatingPoint.
    exp = draw(st.integers(2 if specials == "ieee" else 1, 8 if specials == "ieee" else 7))
    man = draw(st.integers(1 if (specials == "fn" and exp == 1) else 0, 23))
    overflow = draw(st.sampled_from(["inf", "saturate"])) if specials == "ieee" else "saturate"
    return FloatingPoint(exp, man, subnormals=draw(st.booleans()), specials=specials, overflow=overflow)


@st.composite
def block_formats(draw, ndim: int):
    wl = draw(st.integers(1, 25))
    dim = draw(st.sampled_from(list(range(-max(ndim, 1), max(ndim, 1)))))
    block_size = draw(st.one_of(st.none(), st.integers(1, 9)))
    return BlockFloatingPoint(wl, dim=dim, block_size=block_size)


float32_bits = st.integers(0, 2**32 - 1)
float32_values = st.one_of(
    float32_bits.map(lambda b: float(from_bits([b])[0])),
    st.floats(-16, 16, width=32),
    st.sampled_from(SPECIAL_VALUES),
)


def fixed_adversarial(fmt: FixedPoint, rng: np.random.Generator) -> torch.Tensor:
    q, top = 2.0**-fmt.fl, 2 ** (fmt.wl - 1)
    ks = np.array([0, 1, 2, 3, top - 2, top - 1, top, top + 1, 2 * top, *list(rng.integers(0, top + 1, 16))])
    ks = ks[ks >= 0]
    return with_neighbours(f32(ties_around(ks * q, q)))


def float_adversarial(fmt: FloatingPoint, rng: np.random.Generator) -> torch.Tensor:
    emin, man = fmt.emin, fmt.man
    top = math.floor(math.log2(fmt.max_value))  # binade of the largest finite value
    exps = sorted(
        set(range(emin - man - 3, emin + 3))
        | set(range(top - 2, top + 3))
        | set(rng.integers(emin, top + 1, 6).tolist())
    )
    points, steps = [], []
    for e in exps:
        q = 2.0 ** (max(e, emin) - man)
        js = {0, 1, 2**man - 1} | set(rng.integers(0, 2**man, 4).tolist())
        for j in js:
            points.append(2.0**e * (1 + j / 2**man) if e >= emin else j * q)
            steps.append(q)
    qtop = 2.0 ** (top - man)
    extra = [
        fmt.max_value,
        fmt.max_value + qtop / 2,
        fmt.max_value + qtop,
        2.0 ** (top + 1),
        2.0**emin,
        2.0 ** (emin - 1),
    ]
    values = np.concatenate([ties_around(points, steps), extra])
    return with_neighbours(f32(values[np.abs(values) < 2.0**129]))


def block_rows(wl: int, rng: np.random.Generator, cols: int = 12) -> torch.Tensor:
    """Rows meant as blocks: a chosen maximum, then ties/neighbours on that block's grid;
    plus an all-zero row (with -0), rows holding Inf/NaN, an all -Inf row but one 0, and NaN among zeros."""
    rows = []
    exps = [-149, -140, -127, -126, -125, -1, 0, 1, 20, 126, 127, *rng.integers(-149, 128, 3).tolist()]
    for e in exps:
        q = 2.0 ** (e - wl + 2)
        vmax = 2.0 ** (e + 1) - q
        for m in (2.0**e, vmax, vmax + q / 2, 2.0 ** (e + 1) * (1 - 2.0**-24)):
            with np.errstate(over="ignore"):
                m32 = float(np.float32(m))
            if not (2.0**e <= m32 < 2.0 ** (e + 1)):  # keep E = floor(log2 max) as intended
                continue
            ks = rng.integers(0, max(2, 2 ** (wl - 1)), cols - 1)
            frac = rng.choice([0.0, 0.25, 0.5, 0.75], cols - 1)
            vals = f32(np.minimum((ks + frac) * q, m32)).numpy()
            with np.errstate(over="ignore"):
                nudged = np.where(
                    rng.random(cols - 1) < 0.3, np.nextafter(vals, np.float32(rng.choice([-1, 1]) * np.inf)), vals
                )
            signs = rng.choice([-1.0, 1.0], cols)
            row = np.concatenate([[m32], np.minimum(np.abs(nudged), m32)]) * signs
            rows.append(row)
            with_inf = row.copy()  # Inf does not count for the maximum and becomes +-range end
            with_inf[1 + rng.integers(0, cols - 1)] = rng.choice([-np.inf, np.inf])
            rows.append(with_inf)
    special = np.zeros((4, cols))
    special[0, ::2] = -0.0
    special[1] = rng.standard_normal(cols)
    special[1, 3], special[1, 5] = np.inf, np.nan
    special[2, :] = -np.inf
    special[2, 1] = 0.0
    special[3, 0] = np.nan
    return f32(np.concatenate([np.stack(rows), special]))


# ---- the kernels against the reference ---------------------------------------------------------


@SETTINGS
@given(
    fmt=fixed_formats(),
    rounding=rounding_modes,
    xs=st.lists(float32_values, min_size=1, max_size=48),
    seed=st.integers(0, 2**32 - 1),
)
def test_fixed_point_matches_reference(fmt, rounding, xs, seed):
    rng = np.random.default_rng(seed)
    check(torch.cat([f32(xs), fixed_adversarial(fmt, rng)]), fmt, rounding, seed)


@SETTINGS
@given(
    fmt=float_formats(),
    rounding=rounding_modes,
    xs=st.lists(float32_values, min_size=1, max_size=48),
    seed=st.integers(0, 2**32 - 1),
)
def test_floating_point_matches_reference(fmt, rounding, xs, seed):
    rng = np.random.default_rng(seed)
    check(torch.cat([f32(xs), float_adversarial(fmt, rng)]), fmt, rounding, seed)


@st.composite
def shapes_and_blocks(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
    return shape, draw(block_formats(len(shape)))


@SETTINGS
@given(sb=shapes_and_blocks(), rounding=rounding_modes, data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_block_floating_point_matches_reference(sb, rounding, data, seed):
    shape, fmt = sb
    n = math.prod(shape)
    scale = data.draw(st.sampled_from([None, 1.0, 2.0**-140, 2.0**100]), label="scale")
    if scale is None:
        xs = f32(data.draw(st.lists(float32_values, min_size=n, max_size=n), label="xs"))
    else:  # a narrow dynamic range, so that most elements survive the shared exponent
        xs = f32(np.random.default_rng(seed).standard_normal(n) * scale)
    check(xs.reshape(shape), fmt, rounding, seed)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("wl", [1, 2, 3, 4, 8, 12, 23, 24, 25])
def test_block_adversarial_rows(wl, rounding):
    rng = np.random.default_rng(wl)
    x = block_rows(wl, rng)  # each row is meant to be one block
    cols = x.shape[1]
    got_dim0 = check(x, BlockFloatingPoint(wl, dim=0), rounding)
    got_runs = check(x, BlockFloatingPoint(wl, block_size=cols), rounding)
    # The same blocks as runs along dim 0 of the transpose (the kernel moves that dim last).
    got_moved = check(x.t().contiguous(), BlockFloatingPoint(wl, dim=0, block_size=cols), rounding)
    if rounding != "stochastic":
        assert_same(got_runs, got_dim0, x, "block_size=cols vs dim=0")
        assert_same(got_moved.t(), got_dim0, x, "moved runs vs dim=0")
    for row in x[::5]:  # whole-tensor blocks
        check(row, BlockFloatingPoint(wl), rounding)
    # Runs that do not divide the dim, along every dim of a 3-d tensor.
    y = x[: (x.shape[0] // 2) * 2].reshape(2, -1, cols)
    for dim in (0, 1, 2, -1):
        for block_size in (1, 5, 7):
            check(y, BlockFloatingPoint(wl, dim=dim, block_size=block_size), rounding)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("name", [str(fmt) for fmt in FLOAT_PRESETS])
def test_presets_on_random_bit_patterns(name, rounding):
    rng = np.random.default_rng(7)
    x = torch.cat([from_bits(rng.integers(0, 2**32, 4096)), float_adversarial(PRESETS[name], rng)])
    check(x, name, rounding)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize(
    "fmt",
    [
        FloatingPoint(8, 7, subnormals=False),
        FloatingPoint(8, 23, subnormals=False),
        FloatingPoint(7, 3, subnormals=False, specials="fn", overflow="saturate"),
        FloatingPoint(7, 10, subnormals=False, specials="none"),
        FloatingPoint(8, 0, specials="fn"),
    ],
    ids=str,
)
def test_no_subnormals_with_exp8_on_float32_subnormals(fmt, rounding):
    """Regression: with emin = -126 every float32 subnormal lies below 2^emin, so it rounds on the
    2^-126 grid (0 or 2^-126), not on the 2^(-126-man) grid of the lowest binade."""
    x = with_neighbours(f32([2.0**-130, 1.5 * 2.0**-127, 2.0**-127, 0.75 * 2.0**-126, 2.0**-140 * 3]))
    check(x, fmt, rounding)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fl", [-102, -103, -104, -105, -120, 147, 149])
def test_fixed_point_steps_at_the_edges_of_the_float_shortcuts(fl, rounding):
    """Nearest and stochastic rounding take float-arithmetic shortcuts for steps 2^-149 ..
    2^103 and the general integer path beyond; both sides of the edge against the reference."""
    wl = min(25, 128 + fl)  # the widest the range allows
    fmt = FixedPoint(wl, fl, clamp=False)
    q = 2.0**-fl
    ks = np.array([0, 1, 2, 3, 2 ** (wl - 3) - 1, 2 ** (wl - 2) - 1, 2 ** (wl - 2), 2 ** (wl - 1) - 1])
    values = ties_around(ks * q, q)
    check(with_neighbours(f32(values[np.abs(values) < F32_MAX])), fmt, rounding)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("top", [101.0, 102.0, 103.0, 104.0, 126.0, 127.0])
def test_blocks_at_the_edges_of_the_float_shortcuts(top, rounding):
    """Blocks whose step crosses 2^103 (where the shortcuts stop) and near float32's top."""
    rng = np.random.default_rng(int(top))
    rows = 2.0**top * np.concatenate([[1.0, 1.5, 2.0 - 2.0**-23], rng.uniform(-2, 2, 29)])
    x = f32(np.stack([rows, rows * 2.0**-24, rows * 2.0**-30]))
    x = x[torch.isfinite(x).all(dim=1)]
    for wl in (2, 8, 24, 25):
        check(x, BlockFloatingPoint(wl, dim=0), rounding)


# ---- dtypes and layouts ---------------------------------------------------------------------

EVERY_KIND = [
    "fixed(8,4)",
    "fixed(12,3,clamp=false)",
    "fixed(6,2,symmetric=true)",
    "bf16",
    "fp8_e4m3",
    "fp4_e2m1",
    "float(5,10,overflow=saturate)",
    "float(3,2,subnormals=false)",
    "bfp(6)",
    "bfp(6,dim=0)",
    "bfp(6,dim=1)",
    "bfp(5,block_size=3)",
    "bfp(5,dim=0,block_size=3)",
]


def mixed_values(shape, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    v = rng.standard_normal(n) * 2.0 ** rng.integers(-12, 12, n)
    v[rng.integers(0, n, 3)] = [np.inf, -np.inf, np.nan]
    v[rng.integers(0, n, 2)] = [0.0, -0.0]
    return torch.from_numpy(v).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", EVERY_KIND)
def test_other_dtypes_match_reference(fmt, rounding, dtype):
    x = mixed_values((6, 10)).to(dtype)
    got = check(x, fmt, rounding)
    assert got.dtype == dtype


VIEWS = {
    "transposed": lambda t: t.t(),
    "strided_slice": lambda t: t[::2, 1::3],
    "transposed_slice": lambda t: t.t()[1:, ::2],
    "expanded": lambda t: t.unsqueeze(0).expand(2, 10, 12),
}


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", EVERY_KIND)
def test_non_contiguous_inputs(fmt, rounding):
    base = mixed_values((10, 12), seed=3).float()
    for name, view in VIEWS.items():
        x = view(base)
        got = check(x, fmt, rounding)  # stochastic too: the reference uses the kernel's counters
        if rounding == "stochastic":
            continue
        assert_same(got, lp.quantize(x.contiguous(), fmt, rounding), x, f"{name} vs contiguous")
        if name != "expanded":  # in place through the view
            target = base.clone()
            assert_same(lp.quantize_(view(target), fmt, rounding), got, x, f"quantize_ on {name}")


def test_stochastic_counters_follow_memory_order():
    """Documents the kernel's stochastic counters (see lightning_lowp.reference): element-wise
    formats count in storage order for dense tensors, so a column-major input draws differently
    from its row-major copy; block formats count in the (dim-moved) row-major order."""
    x = torch.full((64, 64), 1.0 / 3.0)
    xt = x.t().contiguous().t()  # same values, column-major memory
    assert kernel_counters(xt, FixedPoint(8, 4))[0, 1] == 64
    assert kernel_counters(xt[::2], FixedPoint(8, 4))[0, 1] == 1  # not dense: logical order
    assert kernel_counters(xt, BlockFloatingPoint(8))[0, 1] == 1
    assert kernel_counters(x, BlockFloatingPoint(8, dim=0, block_size=4))[1, 0] == 1
    for fmt in ("fixed(8,4)", "bf16"):  # channels-last 4-d: storage-order counters too
        check(mixed_values((2, 3, 4, 5)).float().to(memory_format=torch.channels_last), fmt, "stochastic")
    for fmt in ("fixed(8,4)", "bfp(8,dim=0,block_size=4)"):
        got = lp.quantize(xt, fmt, "stochastic", generator=torch.Generator().manual_seed(0))
        key = torch.ops.lowp.draw_key(torch.Generator().manual_seed(0))
        assert_same(got, reference_quantize(xt, fmt, "stochastic", key=key), xt, fmt)


def test_empty_and_zero_dim():
    for fmt in [*EVERY_KIND[:9], "bfp(6)", "bfp(6,dim=0)", "bfp(6,block_size=3)"]:
        for rounding in ROUNDING_MODES:
            check(torch.tensor(-0.3), fmt, rounding)
            check(torch.empty(0, 3), fmt, rounding)


# ---- the reference itself, independently of the kernels -----------------------------------------


def decoded_values(fmt) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of a small format from its codes (sorted), and whether its code is even."""
    vals, even = [], []
    if isinstance(fmt, FixedPoint):
        lo = -(2 ** (fmt.wl - 1)) + (1 if fmt.symmetric else 0)
        for k in range(lo, 2 ** (fmt.wl - 1)):
            vals.append(k * 2.0**-fmt.fl)
            even.append(k % 2 == 0)
    else:
        bias = 2 ** (fmt.exp - 1) - 1
        for e in range(2**fmt.exp):
            for m in range(2**fmt.man):
                if e == 2**fmt.exp - 1 and (fmt.specials == "ieee" or (fmt.specials == "fn" and m == 2**fmt.man - 1)):
                    continue  # Inf / NaN codes
                if e == 0 and m and not fmt.subnormals:
                    continue
                mag = m * 2.0 ** (1 - bias - fmt.man) if e == 0 else (1 + m / 2**fmt.man) * 2.0 ** (e - bias)
                for s in (1.0, -1.0):
                    vals.append(s * mag)
                    even.append(m % 2 == 0)
    order = np.argsort(vals, kind="stable")
    return np.asarray(vals)[order], np.asarray(even)[order]


@pytest.mark.parametrize(
    "fmt",
    [PRESETS[n] for n in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")]
    + [
        FixedPoint(5, 2),
        FixedPoint(4, -1, symmetric=True),
        FloatingPoint(3, 2, subnormals=False),
        FloatingPoint(4, 1, specials="fn"),
    ],
    ids=str,
)
def test_reference_picks_neighbours_from_decoded_codes(fmt):
    """down/up give the nearest code below/above, nearest the closer (ties: the even code),
    toward_zero/nearest_away the obvious ones, for values inside the range."""
    values, even = decoded_values(fmt)
    values, idx = np.unique(values, return_index=True)  # +0/-0 merge
    even = even[idx]
    rng = np.random.default_rng(0)
    mids = (values[1:] + values[:-1]) / 2
    x = np.concatenate([values, mids, rng.uniform(values[0], values[-1], 2000)])
    x = x[np.abs(x) < 2.0**100]
    xt = f32(x)
    x = xt.numpy().astype(np.float64)
    i_lo = np.searchsorted(values, x, side="right") - 1
    i_hi = np.searchsorted(values, x, side="left")
    lo, hi = values[i_lo], values[i_hi]
    ref = {m: reference_quantize(xt, fmt, m).numpy().astype(np.float64) for m in ROUNDING_MODES[:5]}
    np.testing.assert_array_equal(ref["down"], lo)
    np.testing.assert_array_equal(ref["up"], hi)
    np.testing.assert_array_equal(ref["toward_zero"], np.where(x >= 0, lo, hi))
    d_lo, d_hi = x - lo, hi - x
    # Ties go to the even code; without subnormals 0 and 2^emin are both even codes, and the
    # contract sends that tie to 0 (the even multiple of the step 2^emin).
    tie_lo = np.where(lo == 0, True, np.where(hi == 0, False, even[i_lo]))
    nearest = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(tie_lo, lo, hi)))
    np.testing.assert_array_equal(ref["nearest"], nearest)
    away = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(x >= 0, hi, lo)))
    np.testing.assert_array_equal(ref["nearest_away"], away)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp8_e5m2", torch.float8_e5m2),
        ("fp8_e4m3", torch.float8_e4m3fn),
    ],
)
def test_reference_matches_torch_casts(name, dtype):
    rng = np.random.default_rng(1)
    x = torch.cat([from_bits(rng.integers(0, 2**32, 20000)), float_adversarial(PRESETS[name], rng)])
    x = x[~torch.isnan(x)]
    assert_same(reference_quantize(x, name), x.to(dtype).float(), x, f"reference {name} vs torch cast")


def test_reference_fp32_is_identity():
    x = from_bits(np.random.default_rng(2).integers(0, 2**32, 20000))
    assert torch.equal(reference_quantize(x, "fp32").view(torch.int32), x.view(torch.int32))


def test_random_bits_known_values():
    # mix32 is lowbias32: mix32(0) = 0 and mix32(1) = 0x2c3c0b69 ... checked by recomputing in plain Python ints.
    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    for key in (0, 1, 2**63 + 12345, 2**64 - 1, -5):
        k = key % 2**64
        for c in (0, 1, 7, 2**32 + 3, 2**40 - 1):
            h = mix((c & 0xFFFFFFFF) ^ (k & 0xFFFFFFFF))
            h = (h + ((k >> 32) ^ (((c >> 32) * 0x9E3779B9) & 0xFFFFFFFF))) & 0xFFFFFFFF
            assert int(random_bits(key, [c])[0]) == mix(h)


# ---- stochastic rounding, statistically ----------------------------------------------------

N_DRAWS = 2**16


@pytest.mark.parametrize(
    ("fmt", "value"),
    [
        ("fixed(8,4)", 0.3),
        ("fixed(8,4)", -2.71),
        ("bf16", 1.0 + 2.0**-9),
        ("fp8_e4m3", -0.0123),
        ("fp4_e2m1", 4.9),
        ("float(5,10)", 3.0e-6),  # an fp16 subnormal
        ("bfp(4,dim=0)", 0.3),  # rows (0.3, 1.9) are the blocks: step 2^-2 around 0.3
    ],
)
def test_stochastic_is_unbiased_between_neighbours(fmt, value):
    x = torch.full((N_DRAWS,), value, dtype=torch.float32)
    if fmt.startswith("bfp"):  # one block per index along dim 0 of a (N, 2) tensor holding (x, 1.9)
        x = torch.stack([x, torch.full_like(x, 1.9)], dim=1)
    got = lp.quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(11))
    lo = reference_quantize(x, fmt, "down")
    hi = reference_quantize(x, fmt, "up")
    if fmt.startswith("bfp"):
        x, got, lo, hi = x[:, 0], got[:, 0], lo[:, 0], hi[:, 0]
    assert ((got == lo) | (got == hi)).all(), "only the two neighbours may appear"
    lo_v, hi_v = float(lo[0]), float(hi[0])
    assert lo_v < float(x[0]) < hi_v
    assert (got == lo).any()
    assert (got == hi).any()
    # P(hi) = p = floor((x - lo) / (hi - lo) * 2^32) / 2^32, so E[result] = x up to (hi - lo) * 2^-32.
    # The mean of n draws has standard error (hi - lo) * sqrt(p (1 - p) / n); we require
    # |mean - x| <= 6 standard errors (+ the 2^-32 bias), which a fair rounding fails with
    # probability about 2e-9 (the seed is fixed, so the test is deterministic anyway).
    xv = float(x[0])
    p = (xv - lo_v) / (hi_v - lo_v)
    se = (hi_v - lo_v) * math.sqrt(p * (1 - p) / N_DRAWS)
    mean = got.double().mean().item()
    assert abs(mean - xv) <= 6 * se + (hi_v - lo_v) * 2.0**-32, (mean, xv, se)


@pytest.mark.parametrize("fmt", ["fixed(8,0)", FloatingPoint(2, 0, specials="none"), "bfp(2)"], ids=repr)
def test_stochastic_threshold_is_exact(fmt):
    """Rounds away from zero iff r < floor(frac * 2^32). In each format the step around [0, 1)
    is 1 (bfp(2): the block maximum 1.0 sets it), so frac = x. Pick elements whose random bits
    r are small enough that x = (r + 1/2) / 2^32 and x = (r + 1) / 2^32 are float32 values:
    threshold == r must round to 0 and threshold == r + 1 up to 1 (both the kernel's paths,
    fewer and more than 32 dropped bits, are hit)."""
    n = 1 << 14
    key = torch.ops.lowp.draw_key(torch.Generator().manual_seed(5))
    r = random_bits(key, np.arange(n, dtype=np.uint64)).astype(np.float64)
    small = np.flatnonzero(r < 2**23)
    assert small.size > 5
    stay, go = small[::2], small[1::2]
    x = np.full(n, 0.5)
    x[stay] = (r[stay] + 0.5) * 2.0**-32
    x[go] = (r[go] + 1.0) * 2.0**-32
    x[np.setdiff1d(np.arange(n), small)[0]] = 1.0
    xt = f32(x)
    assert torch.equal(xt.double(), torch.from_numpy(x)), "the test values must be float32"
    got = lp.quantize(xt, fmt, "stochastic", generator=torch.Generator().manual_seed(5))
    assert_same(got, reference_quantize(xt, fmt, "stochastic", key=key), xt, fmt)
    assert (got[stay] == 0).all()
    assert (got[go] == 1).all()


def test_stochastic_reproducibility():
    x = torch.full((N_DRAWS,), 0.3)
    a = lp.quantize(x, "fixed(8,4)", "stochastic")
    b = lp.quantize(x, "fixed(8,4)", "stochastic")
    assert not torch.equal(a, b), "two calls must draw different keys"
    torch.manual_seed(123)
    c = lp.quantize(x, "fixed(8,4)", "stochastic")
    torch.manual_seed(123)
    d = lp.quantize(x, "fixed(8,4)", "stochastic")
    assert torch.equal(c, d), "torch.manual_seed makes stochastic rounding reproducible"
    e = lp.quantize(x, "fixed(8,4)", "stochastic", generator=torch.Generator().manual_seed(123))
    f = lp.quantize(x, "fixed(8,4)", "stochastic", generator=torch.Generator().manual_seed(123))
    g = lp.quantize(x, "fixed(8,4)", "stochastic", generator=torch.Generator().manual_seed(124))
    assert torch.equal(e, f)
    assert not torch.equal(e, g)
    # The default generator, re-seeded, draws the same key as a fresh generator with that seed.
    torch.manual_seed(123)
    assert torch.equal(reference_quantize(x, "fixed(8,4)", "stochastic"), e)
