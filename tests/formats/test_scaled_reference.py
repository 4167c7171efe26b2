"""The float64 reference of scaled formats (lightning_lowp.reference), checked on its own.

Three independent oracles: the block scales from the float32 bits of each block's amax, as
torchao's ScaleCalculationMode reads them (plain Python ints and numpy float32 arithmetic);
the elements by exact rational arithmetic (fractions.Fraction) against the element's decoded
code table, for every rounding mode; and the blocks by taking each block out and rounding it
as a one-block tensor. The inputs are adversarial blocks: exact ties and their float32
neighbours, amax at, just below and just above powers of two, float32-subnormal amax,
all-zero blocks, Inf/NaN inside blocks, partial runs and tiles, 0-d tensors.
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import f32
from scaled_inputs import adversarial_cases, codes, magnitudes

import lightning_lowp as lp
from lightning_lowp.formats import PRESETS, ROUNDING_MODES, SCALE_ROUNDINGS, FloatingPoint, ScaledFormat
from lightning_lowp.reference import kernel_counters, random_bits, reference_quantize, scaled_block_scales

SCALED_PRESETS = [name for name, fmt in PRESETS.items() if isinstance(fmt, ScaledFormat)]
ELEMENTS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fixed(8,6,symmetric=true)"]
KEY = 0x1234_5678_9ABC_DEF0


# ---- oracles ------------------------------------------------------------------------------


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def e8m0_oracle(amax: float, fmt: ScaledFormat) -> int:
    """E of the block scale 2^E from the float32 bits of amax (torchao's reading; floor by the
    true exponent, which only differs from the bits for a float32-subnormal amax)."""
    if amax == 0:
        return -127
    bits = f32_bits(amax)
    field, mantissa = bits >> 23, bits & 0x7FFFFF
    emax = fmt.element_emax
    rule = fmt.scale_rounding
    if rule == "floor":
        e = math.frexp(amax)[1] - 1 - emax
    elif rule == "ceil":
        e = field - 127 + (mantissa != 0) - emax
    elif rule == "even":
        el = fmt.element
        mbits = el.man if isinstance(el, FloatingPoint) else el.wl - 2
        e = ((bits + (1 << (22 - mbits))) >> 23) - 127 - emax
    else:  # rceil: ceil(log2 d), d the float32 quotient
        with np.errstate(over="ignore"):
            d = float(np.float32(amax) / np.float32(fmt.element_max))
        if d == 0:
            return -127
        if math.isinf(d):
            return 127
        m, ex = math.frexp(d)
        e = ex - 1 + (m != 0.5)
    return min(max(e, -127), 127)


def element_oracle(x: float, s: float, s_inf: float, grid, rounding: str, rbits: int) -> float:
    """One element, by exact rational arithmetic: |x| / s rounded onto the grid, saturated,
    times s, rounded once to float32; the sign of x put back."""
    if math.isnan(x):
        return x
    grid, even = grid
    big = grid[-1]
    if math.isinf(x):
        return math.copysign(float(np.float32(float(big * Fraction(s_inf)))), x)
    if s == 0:
        return math.copysign(0.0, x)
    t = Fraction(abs(x)) / Fraction(s)
    negative = math.copysign(1.0, x) < 0
    if t >= big:
        q = big
    else:
        i = bisect.bisect_right(grid, t) - 1
        lo, hi = grid[i], grid[i + 1]
        frac = (t - lo) / (hi - lo)
        if frac == 0:
            q = lo
        elif rounding == "nearest":
            # (Without subnormals 0 and 2^emin both have even codes; the contract sends that tie to 0.)
            q = lo if frac < Fraction(1, 2) or (frac == Fraction(1, 2) and even[i]) else hi
        elif rounding == "nearest_away":
            q = hi if frac >= Fraction(1, 2) else lo
        elif rounding == "toward_zero":
            q = lo
        elif rounding == "down":
            q = hi if negative else lo
        elif rounding == "up":
            q = lo if negative else hi
        else:
            q = hi if rbits < math.floor(frac * 2**32) else lo
    with np.errstate(over="ignore"):
        return math.copysign(float(np.float32(float(q * Fraction(s)))), x)


def oracle(x: torch.Tensor, fmt: ScaledFormat, rounding: str, key: int = KEY, idx=None) -> torch.Tensor:
    """reference_quantize by the oracles at the flat indices idx (default all; flattened): block
    scales from the reference (checked on their own below), elements one by one in Fractions."""
    idx = torch.arange(x.numel()) if idx is None else idx
    s = scaled_block_scales(x, fmt).flatten()[idx].tolist()
    tiny = {"e8m0": 0.0, "fp32": 2.0**-149, "fp8_e4m3": 2.0**-9}[fmt.scale]
    if fmt.tensor_scale:
        finite = x[torch.isfinite(x)].abs()
        amax = np.float32(finite.max().item() if finite.numel() else 0.0)
        pts = np.float32(amax / np.float32(448 * fmt.element_max))
        tiny = float(np.float32(pts * np.float32(2.0**-9)))
    counters = kernel_counters(x, fmt).flatten()[idx].numpy().astype(np.uint64)
    rbits = random_bits(key, counters).tolist()
    grid = codes(fmt.element)
    out = [
        element_oracle(v, si, si if si > 0 else tiny, grid, rounding, r)
        for v, si, r in zip(x.flatten()[idx].tolist(), s, rbits, strict=True)
    ]
    return torch.tensor(out, dtype=torch.float32)


def check_against_oracle(x: torch.Tensor, fmt: ScaledFormat, rounding: str, limit: int = 4000) -> None:
    """reference_quantize(x) == the oracle, on all elements or a random sample of ``limit``."""
    got = reference_quantize(x, fmt, rounding, key=KEY).flatten()
    idx = None
    if x.numel() > limit:
        idx = torch.from_numpy(np.random.default_rng(x.numel()).choice(x.numel(), limit, replace=False))
        got = got[idx]
    assert_same_bits(got, oracle(x, fmt, rounding, idx=idx), f"{fmt} {rounding} shape={tuple(x.shape)}")


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    nan_g, nan_e = torch.isnan(got), torch.isnan(expected)
    bad = (nan_g != nan_e) | (~nan_g & (got.view(torch.int32) != expected.view(torch.int32)))
    if bad.any():
        idx = bad.flatten().nonzero()[:5].flatten()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} differ: got {got.flatten()[idx].tolist()}, "
            f"expected {expected.flatten()[idx].tolist()}"
        )


# ---- adversarial blocks -----------------------------------------------------------------------


def mx(element: str, rule: str = "floor", **kwargs) -> ScaledFormat:
    return ScaledFormat(element, kwargs.pop("block", 32), scale_rounding=rule, **kwargs)


# ---- the scales -----------------------------------------------------------------------------------


def amax_bit_patterns() -> list[float]:
    """Every float32 binade (subnormals included) with mantissas at the rounding edges."""
    edges = [0, 1, 2, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x3FFFFF, 0x700000, 0x6FFFFF, 0x780000, 0x77FFFF, 0x7C0000]
    edges += [0x7BFFFF, 0x7E0000, 0x7DFFFF, 0x7F0000, 0x7EFFFF, 0x7F8000, 0x7F7FFF, 0x7FC000, 0x7FBFFF]
    bits = [(field << 23) | m for field in range(255) for m in edges]
    return [v for v in np.array(bits, dtype=np.uint32).view(np.float32).astype(np.float64).tolist() if v > 0]


@pytest.mark.parametrize("rule", SCALE_ROUNDINGS)
@pytest.mark.parametrize("element", [*ELEMENTS, "fixed(8,10)", "fixed(4,0)", "fixed(6,4)", "float(3,0,specials=none)"])
def test_e8m0_scales_follow_the_bits_of_amax(element, rule):
    """E8M0 scales equal the bit formulas on every binade, subnormal amax included (also for
    elements whose largest value is below 1, where the clamps to -127..127 bind)."""
    fmt = mx(element, rule, block=1)
    amax = amax_bit_patterns()
    got = scaled_block_scales(f32(amax), fmt)
    expected = [2.0 ** e8m0_oracle(a, fmt) for a in amax]
    assert got.tolist() == expected


def test_e8m0_scale_of_an_empty_or_non_finite_block_is_2_to_the_minus_127():
    fmt = PRESETS["mxfp8_e4m3"]
    x = f32([[0.0] * 4, [-0.0, math.inf, math.nan, 0.0], [math.nan] * 4])
    assert scaled_block_scales(x, fmt).tolist() == [[2.0**-127] * 4] * 3


@pytest.mark.parametrize("element", ELEMENTS)
def test_float_scales_are_float32_quotients(element):
    """fp32 scales are float32(amax / max_element); fp8_e4m3 scales that rounded to nearest
    E4M3 (saturating at 448): numpy's float32 division and torch's E4M3 cast agree."""
    amax = np.array(amax_bit_patterns(), dtype=np.float32)
    x = torch.from_numpy(amax)
    el_max = np.float32(lp.parse_format(element).max_value)
    with np.errstate(over="ignore", under="ignore"):
        quotient = amax / el_max
    fp32 = scaled_block_scales(x, ScaledFormat(element, 1, scale="fp32"))
    assert fp32.tolist() == quotient.astype(np.float64).tolist()
    e4m3 = scaled_block_scales(x, ScaledFormat(element, 1, scale="fp8_e4m3"))
    expected = torch.from_numpy(np.minimum(quotient, 448)).to(torch.float8_e4m3fn).double()
    assert e4m3.tolist() == expected.tolist()


def test_nvfp4_scales_follow_torchaos_float32_operations():
    """tensor scale = amax_tensor / 2688; block = amax / 6; e4m3 = E4M3(clamp(block / tensor
    scale, 2^-6, 448)); scale = tensor scale * e4m3 - each a float32 operation. A block without
    a finite nonzero value has scale 0."""
    rng = np.random.default_rng(3)
    x = f32(rng.standard_normal((64, 16)) * 2.0 ** rng.uniform(-30, 10, (64, 1)))
    x[5] = 0.0
    x[6, 3] = math.inf
    got = scaled_block_scales(x, "nvfp4")[:, 0]
    amax = x.abs().nan_to_num(posinf=0.0).amax(dim=1)
    pts = amax.max() / np.float32(2688.0)  # float32 tensor ops
    e4m3 = torch.clamp(amax / np.float32(6.0) / pts, 2.0**-6, 448.0).to(torch.float8_e4m3fn).float()
    expected = torch.where(amax == 0, 0.0, pts * e4m3).double()
    assert torch.equal(got, expected)
    assert got[5] == 0


# ---- the elements ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("name", SCALED_PRESETS)
def test_presets_on_adversarial_blocks_match_exact_arithmetic(name, rounding):
    fmt = PRESETS[name]
    assert isinstance(fmt, ScaledFormat)
    rng = np.random.default_rng(SCALED_PRESETS.index(name) * 10 + ROUNDING_MODES.index(rounding))
    for x in adversarial_cases(fmt, rng):
        check_against_oracle(x, fmt, rounding)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize(
    "fmt",
    [
        *(mx(e, r) for e in ELEMENTS for r in ("ceil", "even", "rceil")),
        ScaledFormat("fp4_e2m1", 16, scale="fp8_e4m3"),
        ScaledFormat("fp6_e2m3", 8, scale="fp32"),
        ScaledFormat("fixed(8,6,symmetric=true)", 32, scale="fp32"),
        ScaledFormat("fp6_e3m2", (3, 5), scale="fp32"),
        ScaledFormat("float(3,4,subnormals=false)", 32),
        ScaledFormat("fixed(5,2)", 32, scale_rounding="ceil"),
        ScaledFormat("fp6_e2m3", 16, scale="fp8_e4m3", tensor_scale=True),
    ],
    ids=str,
)
def test_other_scaled_formats_match_exact_arithmetic(fmt, rounding):
    rng = np.random.default_rng(ROUNDING_MODES.index(rounding))
    for x in adversarial_cases(fmt, rng)[:12]:
        check_against_oracle(x, fmt, rounding, limit=1500)


@pytest.mark.parametrize("scale", ["fp32", "fp8_e4m3"])
def test_float_scales_round_near_ties_correctly(scale):
    """With a scale that is not a power of two, x / s is not a float: elements a float32 step
    either side of s * (a midpoint of the element grid) must round to the side they are on,
    and exact ties (possible when s has few significant bits) to the even code."""
    fmt = ScaledFormat("fp4_e2m1", 8, scale=scale)
    grid = [float(v) for v in magnitudes(fmt.element)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(grid)]
    rows = []
    for amax in (6.0 * 1.1, 6.0 * 1.125, 6.0 * 0.7, 6.0 * 2.0**-100 * 1.3, 6.0 * 3.0 * 2.0**-140):
        s = float(scaled_block_scales(f32([amax]), fmt)[0])
        for m in mids:
            v = np.float32(m * s)
            rows.append([amax, v, np.nextafter(v, np.float32(0)), np.nextafter(v, np.float32(np.inf)), -v, 0, 0, 0])
    x = f32(rows)
    for rounding in ROUNDING_MODES:
        check_against_oracle(x, fmt, rounding)


def test_microxcaling_957_block():
    """microxcaling issue 4: in MXFP8 E4M3 with floor scales (OCP MX v1.0) the amax 957 gets
    2^(floor(log2 957) - 8) = 2, 957 / 2 = 478.5 is past 448, so it clips to 896. ceil and
    rceil take scale 4 (957 / 4 = 239.25 -> 240 -> 960); even rounds 957 to 4 significant
    bits (960, still below 1024) and so takes floor's scale, and clips too."""
    x = f32([957.0, 500.0, 100.0, 30.0, 1.0, 0.3, 0.01, -0.004] + [0.0] * 24)
    expected = {
        "floor": (2.0, [896.0, 512.0, 96.0, 30.0, 1.0, 0.3125, 0.01171875, -0.00390625]),
        "even": (2.0, [896.0, 512.0, 96.0, 30.0, 1.0, 0.3125, 0.01171875, -0.00390625]),
        "ceil": (4.0, [960.0, 512.0, 96.0, 30.0, 1.0, 0.3125, 0.0078125, -0.0078125]),
        "rceil": (4.0, [960.0, 512.0, 96.0, 30.0, 1.0, 0.3125, 0.0078125, -0.0078125]),
    }
    for rule, (scale, values) in expected.items():
        fmt = mx("fp8_e4m3", rule)
        assert scaled_block_scales(x, fmt)[0].item() == scale, rule
        assert reference_quantize(x, fmt)[:8].tolist() == values, rule
    # Where even and floor part: 1000 rounds to 1024 at 4 significant bits.
    y = f32([1000.0] + [1.0] * 31)
    assert [reference_quantize(y, mx("fp8_e4m3", r))[0].item() for r in SCALE_ROUNDINGS] == [
        896.0,
        1024.0,
        1024.0,
        1024.0,
    ]


def test_inf_nan_and_zero_blocks():
    fmt = PRESETS["mxfp4"]  # E2M1, max 6, blocks of 32, floor
    row = [3.0, -1.1, 0.2, math.inf, math.nan, -math.inf, -0.0, 0.0] + [0.5] * 24
    x = f32([row, [0.0, -0.0, math.inf, math.nan] + [0.0] * 28])
    nan_payload = struct.unpack("<f", struct.pack("<I", 0x7FC0_1234))[0]
    x[0, 8] = nan_payload
    got = reference_quantize(x, fmt)
    # Row 0: amax 3 from the finite values (Inf/NaN left out): scale 2^(1 - 2) = 1/2.
    assert scaled_block_scales(x, fmt)[0, 0] == 0.5
    assert got[0, :4].tolist() == [3.0, -1.0, 0.25, 3.0]  # -1.1 / 0.5 = -2.2 -> -2, 0.4 -> 0.5; Inf: max * s
    assert math.isnan(got[0, 4])
    assert got[0, 5] == -3.0
    assert [math.copysign(1, v) for v in got[0, 6:8].tolist()] == [-1.0, 1.0]
    assert got[0, 8:9].view(torch.int32).item() == x[0, 8:9].view(torch.int32).item()  # NaN payload kept
    # Row 1: no finite nonzero value: scale 2^-127, Inf -> 6 * 2^-127; zeros keep their sign.
    assert got[1, 2].item() == 6.0 * 2.0**-127
    assert math.isnan(got[1, 3])
    assert got[1, :2].tolist() == [0.0, -0.0]
    assert math.copysign(1, got[1, 1]) == -1
    # Float scales: a zero scale; Inf takes the smallest positive scale of the format.
    for scale, tiny in (("fp32", 2.0**-149), ("fp8_e4m3", 2.0**-9)):
        g = reference_quantize(x, ScaledFormat("fp4_e2m1", 32, scale=scale))
        assert g[1, 2].item() == float(np.float32(6.0 * tiny))
        assert g[1, :2].tolist() == [0.0, -0.0]
        assert math.copysign(1, g[1, 1]) == -1
    nv = reference_quantize(x, "nvfp4")  # tensor scale 3 / 2688; the all-zero block: scale 0
    pts = np.float32(np.float32(3.0) / np.float32(2688.0))
    assert nv[1, 2].item() == float(np.float32(6.0 * float(np.float32(pts * np.float32(2.0**-9)))))


def test_inf_saturates_and_the_result_may_round_to_inf_past_float32():
    """Inf saturates to max * s; q * s is rounded to float32 as IEEE 754 does, so a ceil scale
    near float32's top can round an element up to 2^128: Inf (torchao's dequantization does the
    same float32 multiplication)."""
    top = float(np.finfo(np.float32).max)
    x = f32([top, math.inf] + [1.0] * 30)
    ceil = reference_quantize(x, mx("fp8_e4m3", "ceil"))  # scale 2^120; top / 2^120 -> 256
    assert math.isinf(ceil[0])
    assert ceil[1] == 448 * 2.0**120
    floor = reference_quantize(x, "mxfp8_e4m3")  # scale 2^119; top / 2^119 -> 448 (saturated)
    assert floor[:2].tolist() == [448 * 2.0**119] * 2


# ---- the blocks -----------------------------------------------------------------------------------


def blocks_one_by_one(x: torch.Tensor, fmt: ScaledFormat) -> torch.Tensor:
    """Each block taken out and rounded as a one-block ("tensor") format."""
    whole = ScaledFormat(fmt.element, "tensor", scale=fmt.scale, scale_rounding=fmt.scale_rounding)
    out = torch.empty_like(x)
    if isinstance(fmt.block, tuple):
        r, c = fmt.block
        for lead in itertools.product(*(range(n) for n in x.shape[:-2])):
            for i in range(0, x.shape[-2], r):
                for j in range(0, x.shape[-1], c):
                    idx = (*lead, slice(i, i + r), slice(j, j + c))
                    out[idx] = reference_quantize(x[idx].contiguous(), whole)
        return out
    if fmt.block == "tensor" or x.dim() == 0:
        return reference_quantize(x, whole)
    d = fmt.dim % x.dim()
    xm, om = x.movedim(d, -1), out.movedim(d, -1)
    k = xm.shape[-1] if fmt.block == "row" else fmt.block
    for lead in itertools.product(*(range(n) for n in xm.shape[:-1])):
        for j in range(0, xm.shape[-1], k):
            om[(*lead, slice(j, j + k))] = reference_quantize(xm[(*lead, slice(j, j + k))].contiguous(), whole)
    return out


def mixed(shape, seed) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    v = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)
    v[rng.integers(0, n, 3)] = [np.inf, -np.inf, np.nan]
    v[rng.integers(0, n, 2)] = [0.0, -0.0]
    return f32(v).reshape(shape)


@pytest.mark.parametrize(
    ("block", "dim", "shape"),
    [
        (5, -1, (3, 4, 13)),  # partial last runs along the last dim
        (5, 1, (3, 13, 4)),
        (4, 0, (10, 3)),
        (1, -1, (2, 7)),
        ("row", 0, (6, 5)),  # one block per column: all of dim 0
        ("row", -1, (2, 3, 9)),
        ("row", 1, (2, 7, 3)),
        ((2, 3), -1, (5, 7)),  # tiles with partial edges
        ((4, 4), -1, (2, 6, 5)),
        ((1, 8), -1, (3, 8)),
        ("tensor", -1, (4, 6)),
        (3, -1, (7,)),
        ("row", 0, (7,)),
    ],
    ids=str,
)
@pytest.mark.parametrize("scale", ["e8m0", "fp32"])
def test_blocks_are_independent_one_block_tensors(block, dim, shape, scale):
    fmt = ScaledFormat("fp6_e2m3", block, dim=dim, scale=scale)
    x = mixed(shape, seed=len(shape) * 7 + shape[-1])
    assert_same_bits(reference_quantize(x, fmt), blocks_one_by_one(x, fmt), f"{fmt} {shape}")


@pytest.mark.parametrize("block", [32, "row", "tensor"])
def test_zero_dim_tensor_is_one_block(block):
    fmt = ScaledFormat("fp4_e2m1", block)
    for v in (0.3, -5.0, 0.0, -0.0, math.inf, math.nan, 1e-40):
        got = reference_quantize(torch.tensor(v), fmt)
        assert got.shape == ()
        assert_same_bits(got.reshape(1), reference_quantize(torch.tensor([v]), fmt), f"{v}")
    assert reference_quantize(torch.tensor(-5.0), fmt).item() == -4.0  # scale 1; a tie between 4 and 6: even
    assert reference_quantize(torch.tensor(5.5), fmt).item() == 6.0


def test_bad_blocks_and_dims_are_refused():
    with pytest.raises(ValueError, match="block"):
        reference_quantize(torch.ones(8), ScaledFormat("fp8_e4m3", (2, 2)))
    with pytest.raises(ValueError, match="block"):
        reference_quantize(torch.tensor(1.0), "fp8_blockwise_128x128")
    with pytest.raises(ValueError, match="block"):
        scaled_block_scales(torch.ones(0), ScaledFormat("fp8_e4m3", (2, 2)))
    with pytest.raises(ValueError, match="dim"):
        reference_quantize(torch.ones(2, 3), ScaledFormat("fp8_e4m3", 2, dim=2))
    with pytest.raises(ValueError, match="element"):
        reference_quantize(torch.ones(4), ScaledFormat("fixed(1,0)", 2))


def test_other_input_dtypes_round_through_float32():
    x = mixed((4, 32), seed=9)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        got = reference_quantize(xd, "mxfp6_e3m2")
        assert got.dtype == dtype
        assert_same_bits(got.float(), reference_quantize(xd.float(), "mxfp6_e3m2").to(dtype).float(), str(dtype))


# ---- stochastic rounding -------------------------------------------------------------------------


def test_stochastic_counters_follow_the_moved_dim():
    """Runs and rows along a dim that is not the last count in x.movedim(dim, -1)'s row-major
    order; tiles, whole tensors and runs along the last dim in x's."""
    x = torch.zeros(4, 6)
    assert kernel_counters(x, ScaledFormat("fp8_e4m3", 2, dim=0))[1, 0] == 1
    assert kernel_counters(x, ScaledFormat("fp8_e4m3", "row", dim=0))[0, 1] == 4
    for fmt in (ScaledFormat("fp8_e4m3", 2), ScaledFormat("fp8_e4m3", (2, 2)), ScaledFormat("fp8_e4m3", "tensor")):
        assert torch.equal(kernel_counters(x.t(), fmt), torch.arange(24).reshape(6, 4))
    y = mixed((12, 40), seed=4)
    for block in (8, "row"):
        along0 = reference_quantize(y, ScaledFormat("fp4_e2m1", block, dim=0), "stochastic", key=KEY)
        along1 = reference_quantize(y.t().contiguous(), ScaledFormat("fp4_e2m1", block), "stochastic", key=KEY)
        assert_same_bits(along0, along1.t(), f"block={block}")


@pytest.mark.parametrize(
    ("fmt", "value"),
    [
        ("mxfp4", 0.7),  # block (6, 0.7): scale 1, 0.7 between 0.5 and 1
        ("mxfp8_e4m3", -0.0123),
        ("mxint8", 0.3),
        ("nvfp4", 1.3),
        ("fp8_blockwise_1x128", 2.2),  # fp32 scale 6 / 448: not a power of two
        (ScaledFormat("fp4_e2m1", 16, scale="fp8_e4m3"), 4.4),
    ],
    ids=str,
)
def test_stochastic_is_unbiased_between_neighbours(fmt, value):
    """Many keys over many copies of one block [6, value, 0...]: only the two neighbours of
    value (on the block's grid) appear, and the mean is value within 6 standard errors."""
    fmt = lp.parse_format(fmt) if isinstance(fmt, str) else fmt
    k = fmt.block if isinstance(fmt.block, int) else 32
    row = torch.zeros(k)
    row[0], row[1] = 6.0, value
    x = row.repeat(512, 1)
    lo = reference_quantize(x, fmt, "down")[0, 1].item()
    hi = reference_quantize(x, fmt, "up")[0, 1].item()
    assert lo < value < hi
    draws = torch.cat([reference_quantize(x, fmt, "stochastic", key=key)[:, 1] for key in range(32)])
    assert set(draws.tolist()) == {lo, hi}
    assert torch.equal(reference_quantize(x, fmt, "stochastic", key=7), reference_quantize(x, fmt, "stochastic", key=7))
    # Away from zero with probability p = frac (to 2^-32), frac = the exact fraction of |value| / s
    # between its grid neighbours; the mean of n draws has standard error |hi - lo| sqrt(p (1 - p) / n).
    s = scaled_block_scales(x[:1], fmt)[0, 1].item()
    t = abs(Fraction(np.float32(value).item())) / Fraction(s)
    grid = magnitudes(fmt.element)
    i = bisect.bisect_right(grid, t) - 1
    p = float((t - grid[i]) / (grid[i + 1] - grid[i]))
    toward = reference_quantize(x, fmt, "toward_zero")[0, 1].item()
    away = hi if toward == lo else lo
    expected = toward + (away - toward) * p
    se = (hi - lo) * math.sqrt(p * (1 - p) / draws.numel())
    assert abs(draws.double().mean().item() - expected) <= 6 * se + (hi - lo) * 2.0**-32
