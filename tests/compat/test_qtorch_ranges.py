"""lightning_lowp.compat.qtorch at the ends of every range, against QPyTorch's definitions.

Expected values are written out by hand from QPyTorch's kernels (``qtorch/quant/quant_cpu``,
``quant_cuda``), never taken from lightning_lowp:

- ``float_quantize(x, exp, man)``: bias 2^(exp-1)-1, smallest normal exponent emin =
  2-2^(exp-1), below it subnormals with step 2^(emin-man); no exponent code is reserved
  (``clip_exponent``'s max_exponent_store is 2^(exp-1)+127), so the top binade is
  [2^(2^(exp-1)), 2^(2^(exp-1)+1)) and the largest value (2-2^-man)*2^(2^(exp-1)); a result past
  it and +-Inf clamp to +-max. "nearest" adds half an ulp to the magnitude: ties away from zero.
  At exp=8 that clamp would be at float32's Inf code, so float32's own overflow is what happens:
  past (2-2^-man)*2^127 the result is +-Inf.
- ``fixed_point_quantize(x, wl, fl)``: multiples of 2^-fl clamped to [-2^(wl-fl-1),
  2^(wl-fl-1)-2^-fl] (``symmetric``: from -2^(wl-fl-1)+2^-fl); ``clamp=False`` keeps the grid.
- ``block_quantize(x, wl)``: E = floor(log2 max|x|), multiples of 2^(E-wl+2) clipped to
  +-(2^(E+1)-2^(E-wl+2)) (``clip_max_exponent``).
"""

import math

import numpy as np
import pytest
import torch
from helpers import assert_bits_equal, f32

import lightning_lowp as lp
from lightning_lowp.compat.qtorch import (
    FixedPoint,
    FloatingPoint,
    OptimLP,
    Quantizer,
    block_quantize,
    fixed_point_quantize,
    float_quantize,
    quantizer,
)

INF = math.inf

# ---- floating point: literal values ------------------------------------------------------------

# (exp, man, x, QPyTorch's float_quantize(x, exp, man, "nearest")), worked out by hand.
FLOAT_TABLE = [
    # exp=1: bias 0, emin 1, subnormal step 2^(1-man); top binade [2, 4); max (2-2^-man)*2
    (1, 2, 3.6, 3.5),  # 3.6 -> 3.5 (step 0.5); 3.75 would round to 4, past max
    (1, 2, 3.75, 3.5),
    (1, 2, -100.0, -3.5),
    (1, 2, 2.25, 2.5),  # tie, away from zero
    (1, 2, 0.25, 0.5),  # subnormal tie
    (1, 2, 0.2, 0.0),
    (1, 2, INF, 3.5),
    (1, 0, 1.0, 2.0),  # man=0: values 0 and 2 only; 1 is the tie
    (1, 0, 0.9, 0.0),
    (1, 0, 5.0, 2.0),
    # exp=2: bias 1, emin 0, top binade [4, 8); max (2-2^-man)*4
    (2, 2, 30.0, 7.0),
    (2, 2, -30.0, -7.0),
    (2, 2, 6.5, 7.0),  # tie
    (2, 2, 7.4, 7.0),
    (2, 2, 7.5, 7.0),  # tie up to 8, clamped
    (2, 2, 5.5, 6.0),
    (2, 2, 4.4, 4.0),
    (2, 2, 0.125, 0.25),  # half the smallest subnormal 2^-2: away from zero
    (2, 2, -INF, -7.0),
    (2, 1, 7.0, 6.0),  # step 2 on [4, 8): 7 -> 8, clamped to 1.5 * 4
    (2, 0, 5.9, 4.0),
    (2, 0, 6.0, 4.0),  # tie up to 8, clamped to the only top value 4
    # exp=3: bias 3, emin -2, top binade [16, 32); max (2-2^-man)*16
    (3, 1, 20.0, 24.0),  # step 8, tie
    (3, 1, 17.0, 16.0),
    (3, 1, 100.0, 24.0),
    (3, 3, 31.0, 30.0),  # step 2, tie up to 32, clamped
    (3, 3, -29.0, -30.0),  # tie, away from zero
    # exp=4: bias 7, top binade [256, 512); max (2-2^-man)*256 (IEEE-style e4m3 would stop at 240)
    (4, 3, 240.0, 240.0),
    (4, 3, 300.0, 9 * 32.0),  # step 32: 9.375 steps
    (4, 3, 464.0, 480.0),  # tie
    (4, 3, 496.0, 480.0),  # tie up to 512, clamped
    (4, 3, -1000.0, -480.0),
    # exp=5: bias 15, top binade [65536, 131072); max (2-2^-man)*65536
    (5, 10, 1e5, 100032.0),  # step 64: 1562.5 steps, a tie, away
    (5, 10, 65504.0, 65504.0),  # IEEE half's max is an ordinary value here
    (5, 10, 65520.0, 65536.0),  # step 32 below 65536: tie up into the top binade
    (5, 10, 131008.0, 131008.0),
    (5, 10, 131040.0, 131008.0),  # tie up to 131072, clamped
    (5, 10, -1e6, -131008.0),
    (5, 10, INF, 131008.0),
    (5, 2, 60000.0, 7 * 2.0**13),  # step 8192 on [32768, 65536): 7.32 steps
    (5, 2, 61440.0, 65536.0),  # 7.5 steps, a tie
    (5, 2, 1e5, 6 * 2.0**14),  # step 16384 on the top binade: 6.10 steps
    (5, 2, 1e30, 7 * 2.0**14),  # max 1.75 * 65536
    # exp=6: bias 31, top binade [2^32, 2^33); max (2-2^-man)*2^32
    (6, 5, 5e9, 37 * 2.0**27),  # step 2^27: 37.25 steps
    (6, 5, 1e10, 63 * 2.0**27),
    (6, 5, -1e10, -63 * 2.0**27),
    # exp=7: bias 63, top binade [2^64, 2^65); max (2-2^-man)*2^64
    (7, 3, 2.5e19, 11 * 2.0**61),  # step 2^61: 10.84 steps
    (7, 3, 3.5e19, 15 * 2.0**61),  # past max (3.46e19): clamped
    (7, 1, -3e19, -3 * 2.0**63),
    # exp=8: float32's range; past (2-2^-man)*2^127 float32 overflows (QPyTorch's kernels too)
    (8, 7, 3.3e38, 248 * 2.0**120),  # step 2^120: 248.26 steps
    (8, 7, 255 * 2.0**120, 255 * 2.0**120),  # bfloat16's max
    (8, 7, 255.5 * 2.0**120, INF),  # tie up to 2^128
    (8, 7, 3.4028234663852886e38, INF),  # float32's max
    (8, 7, -INF, -INF),
    (8, 23, 3.4028234663852886e38, 3.4028234663852886e38),  # man=23: float32 itself
    (8, 1, 2.0**-127, 2.0**-127),  # float32 subnormals are subnormals of exp=8
    (8, 1, 1.25 * 2.0**-126, 1.5 * 2.0**-126),  # tie, step 2^-127
]


@pytest.mark.parametrize(("exp", "man", "x", "expected"), FLOAT_TABLE)
def test_float_quantize_literal_values(exp, man, x, expected):
    got = float_quantize(f32([x, -x]), exp, man, "nearest").tolist()
    assert got == [expected, -expected]


def test_float_max_and_emin_are_qpytorchs():
    for exp in range(1, 9):
        for man in range(24):
            fmt = FloatingPoint(exp, man).to_lowp()
            assert fmt.emin == 2 - 2 ** (exp - 1)
            if exp < 8:
                assert fmt.max_value == (2 - 2.0**-man) * 2.0 ** (2 ** (exp - 1))
                assert (fmt.specials, fmt.overflow) == ("none", "saturate")
            else:
                assert fmt.max_value == (2 - 2.0**-man) * 2.0**127
                assert (fmt.specials, fmt.overflow) == ("ieee", "inf")
    assert FloatingPoint(5, 10).to_lowp().max_value == 131008.0
    assert FloatingPoint(2, 2).to_lowp().max_value == 7.0


# ---- floating point: the whole top binade --------------------------------------------------------


def _mantissas(man: int) -> torch.Tensor:
    """Every k in 0..2^man-1 for man <= 14; above, a spread: every 2^(man-12)-th k and both ends."""
    if man <= 14:
        return torch.arange(2**man, dtype=torch.float64)
    stride = 2 ** (man - 12)
    ks = torch.cat([torch.arange(0, 2**man, stride), torch.arange(64), torch.arange(2**man - 64, 2**man)])
    return torch.unique(ks).double()


def _top_binade_cases(exp: int, man: int, beyond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs on and around the grid (1 + k/2^man) * 2^t of the top binade t and QPyTorch's results.

    ``beyond`` is what a value past the largest one becomes (the largest one, or Inf at exp=8).
    """
    t = 2 ** (exp - 1) if exp < 8 else 127
    ulp = 2.0 ** (t - man)
    k = _mantissas(man)
    grid = 2.0**t + k * ulp
    nxt = torch.where(k + 1 < 2**man, grid + ulp, torch.full_like(grid, beyond))
    xs = [grid]
    ys = [grid]
    if man <= 22:  # the halfway points are float32 numbers
        mid = grid + ulp / 2
        with np.errstate(over="ignore"):  # exp=8, man=22: above the last halfway point is 2^128
            below = torch.from_numpy(np.nextafter(mid.float().numpy(), np.float32(0))).double()
            above = torch.from_numpy(np.nextafter(mid.float().numpy(), np.float32(np.inf))).double()
        xs += [mid, below, above]
        ys += [nxt, grid, nxt]
    past = [2.0 ** (t + 1), 1.5 * 2.0 ** (t + 1), INF]
    if exp < 8:
        past += [2.0**100, 2.0**127 * 1.75]
    xs.append(torch.tensor(past, dtype=torch.float64))
    ys.append(torch.full((len(past),), beyond, dtype=torch.float64))
    x, y = torch.cat(xs), torch.cat(ys)
    return torch.cat([x, -x]), torch.cat([y, -y])


@pytest.mark.parametrize("exp", range(1, 9))
def test_float_top_binade_every_mantissa(exp):
    for man in range(24):
        t = 2 ** (exp - 1) if exp < 8 else 127
        largest = (2 - 2.0**-man) * 2.0**t
        x64, expected64 = _top_binade_cases(exp, man, largest if exp < 8 else INF)
        x, expected = x64.float(), expected64.float()
        finite = x.isfinite()
        assert torch.equal(x[finite].double(), x64[finite])  # every input is exactly a float32
        assert torch.equal(expected.double(), expected64)
        got = float_quantize(x, exp, man, "nearest")
        assert torch.equal(got, expected), (exp, man, x[got != expected], got[got != expected])


@pytest.mark.parametrize("exp", [1, 2, 3, 5, 7])
def test_float_top_binade_stochastic_never_passes_max(exp):
    torch.manual_seed(exp)
    for man in (0, 1, 3, 10, 20):
        t = 2 ** (exp - 1)
        largest = (2 - 2.0**-man) * 2.0**t
        # the value before it: in the top binade, else 2^(t-1) - or 0 for exp=1, man=0 (values 0, 2)
        below = largest - 2.0 ** (t - man) if man else (2.0 ** (t - 1) if exp > 1 else 0.0)
        gap = largest - below
        inside = f32([largest - gap / 4] * 2000)  # between the last two values
        past = f32([largest + gap / 4, 2.0 ** (t + 1), 1e38, INF] * 500)  # clamped whatever the draw
        out = float_quantize(torch.cat([inside, -inside, past, -past]), exp, man)
        assert set(out[:2000].tolist()) == {below, largest}
        assert set(out[2000:4000].tolist()) == {-below, -largest}
        assert set(out[4000:6000].tolist()) == {largest}
        assert set(out[6000:].tolist()) == {-largest}
        assert 0.6 < (out[:2000] == largest).float().mean().item() < 0.9  # up with probability 3/4


def test_float_exp8_stochastic_overflows_like_float32():
    torch.manual_seed(0)
    largest = (2 - 2.0**-7) * 2.0**127
    x = f32([largest + 2.0**119] * 4000)  # halfway to 2^128
    out = float_quantize(torch.cat([x, -x]), 8, 7)
    assert set(out[:4000].tolist()) == {largest, INF}
    assert set(out[4000:].tolist()) == {-largest, -INF}
    assert 0.4 < out[:4000].isinf().float().mean().item() < 0.6


# ---- floating point: the subnormal end -----------------------------------------------------------


@pytest.mark.parametrize("exp", range(1, 8))
@pytest.mark.parametrize("man", [0, 1, 2, 5, 10])
def test_float_subnormals_are_qpytorchs(exp, man):
    """QPyTorch rounds below 2^emin on the fixed step 2^(emin-man) (it adds 2^emin, rounds, subtracts)."""
    emin = 2 - 2 ** (exp - 1)
    tiny = 2.0 ** (emin - man)  # the smallest subnormal (2^emin itself when man = 0)
    # tiny/2 and tiny*1.5 are ties (away from zero); 2^emin - tiny/2 is the tie between the
    # largest subnormal and 2^emin (for man = 0: between 0 and 2^emin)
    x = f32([tiny, tiny / 2, tiny * 0.375, tiny * 1.5, 2.0**emin - tiny / 2, 2.0**emin - tiny / 4])
    largest = (2 - 2.0**-man) * 2.0 ** (2 ** (exp - 1))
    expected = [tiny, tiny, 0.0, min(2 * tiny, largest), 2.0**emin, 2.0**emin]  # exp=1, man=0: {0, 2}
    assert float_quantize(x, exp, man, "nearest").tolist() == expected
    assert float_quantize(-x, exp, man, "nearest").tolist() == [-v for v in expected]


# ---- fixed point -----------------------------------------------------------------------------------


# (wl, fl, symmetric, clamp, x, QPyTorch's fixed_point_quantize(x, wl, fl, clamp, symmetric, "nearest"))
FIXED_TABLE = [
    # wl=8, fl=3: [-16, 15.875], step 1/8
    (8, 3, False, True, [15.875, 15.9, 15.9375, 16.0, 1e9, INF], [15.875, 15.875, 15.875, 15.875, 15.875, 15.875]),
    (8, 3, False, True, [-16.0, -16.05, -16.0625, -17.0, -1e9, -INF], [-16.0] * 6),
    (8, 3, True, True, [-15.875, -15.9, -16.0, -1e9, 1e9], [-15.875, -15.875, -15.875, -15.875, 15.875]),
    (8, 3, False, False, [1e9, -1e9, 16.0, -16.07, INF], [1e9, -1e9, 16.0, -16.125, INF]),
    # wl=1: [-2^-fl, 0]; symmetric: [0, 0]
    (1, 0, False, True, [0.4, 0.6, -0.6, -5.0, 5.0], [0.0, 0.0, -1.0, -1.0, 0.0]),
    (1, 2, False, True, [-0.25, -0.2, 3.0], [-0.25, -0.25, 0.0]),
    (1, 0, True, True, [-5.0, 5.0], [0.0, 0.0]),
    # wl=25 (the most float32 holds), fl=0: [-2^24, 2^24 - 1]
    (25, 0, False, True, [2**24, 2**30, -(2**24), -(2**30)], [2**24 - 1, 2**24 - 1, -(2**24), -(2**24)]),
    (25, 0, True, True, [-(2**30)], [-(2**24) + 1]),
    # negative fl (QPyTorch's formula allows it): wl=4, fl=-2: multiples of 4 in [-32, 28]
    (4, -2, False, True, [27.0, 30.0, 100.0, -33.0, -31.0], [28.0, 28.0, 28.0, -32.0, -32.0]),
    # large fl: wl=8, fl=20: [-2^-13, 2^-13 - 2^-20]
    (8, 20, False, True, [1.0, -1.0, 2.0**-13], [2.0**-13 - 2.0**-20, -(2.0**-13), 2.0**-13 - 2.0**-20]),
]


@pytest.mark.parametrize(("wl", "fl", "symmetric", "clamp", "x", "expected"), FIXED_TABLE)
def test_fixed_point_range_ends(wl, fl, symmetric, clamp, x, expected):
    out = fixed_point_quantize(f32(x), wl, fl, clamp=clamp, symmetric=symmetric, rounding="nearest")
    assert out.tolist() == expected
    fmt = FixedPoint(wl, fl, clamp, symmetric).to_lowp()
    if clamp:  # the range is QPyTorch's fixed_min_max
        assert fmt.max_value == 2.0 ** (wl - fl - 1) - 2.0**-fl
        assert fmt.min_value == -(2.0 ** (wl - fl - 1)) + (2.0**-fl if symmetric else 0.0)


def test_fixed_point_stochastic_stays_in_range():
    torch.manual_seed(1)
    x = f32([15.9, 1e9, INF, -16.05, -1e9, -INF] * 300)
    out = fixed_point_quantize(x, 8, 3).view(-1, 6)
    assert set(out[:, 0].tolist()) == {15.875}  # 15.875 or 16, clamped
    assert set(out[:, 1].tolist()) == set(out[:, 2].tolist()) == {15.875}
    assert set(out[:, 3:].flatten().tolist()) == {-16.0}
    sym = fixed_point_quantize(x, 8, 3, symmetric=True).view(-1, 6)
    assert set(sym[:, 3:].flatten().tolist()) == {-15.875}


def test_clamping_grad_zero_masks_exactly_what_was_clamped():
    # FixedPoint(8, 3) rounds to nearest first, then clamps; the mask is "rounded outside the range"
    x = f32([15.875, 15.93, 15.9375, 16.5, -16.0, -16.06, -16.0625, -20.0]).requires_grad_()
    y = quantizer(FixedPoint(8, 3), FixedPoint(8, 3), "nearest", "nearest", clamping_grad_zero=True)(x)
    assert y.tolist() == [15.875, 15.875, 15.875, 15.875, -16.0, -16.0, -16.0, -16.0]
    y.backward(torch.ones(8))
    # 15.9375 is a tie, rounded up to 16 and clamped: masked, as in QPyTorch. -16.0625 is a
    # negative tie: rounded away from zero here (-16.125: masked), toward +inf in QPyTorch's
    # floor(x*8 + 1/2) (-16: not masked) - the one documented difference
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    x.grad = None
    ys = quantizer(FixedPoint(8, 3, symmetric=True), FixedPoint(8, 3), "nearest", "nearest", clamping_grad_zero=True)
    ys(x).backward(torch.ones(8))
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # -16 is outside [-15.875, 15.875]


# ---- block floating point ------------------------------------------------------------------------


def test_block_shared_exponent_and_clip():
    # max |x| = 3.9 -> E = 1; wl=4: step 2^(E-wl+2) = 1/2, values up to +-(4 - 1/2)
    x = f32([3.9, -3.9, 3.0, 1.0, 0.1, -0.3])
    assert block_quantize(x, 4, rounding="nearest").tolist() == [3.5, -3.5, 3.0, 1.0, 0.0, -0.5]
    # a negative largest magnitude gives the same exponent
    assert block_quantize(f32([-3.9, 1.2]), 4, rounding="nearest").tolist() == [-3.5, 1.0]
    # wl=2: step 2^E, values {-2^E, 0, 2^E}
    assert block_quantize(f32([3.9, 1.0, -1.1, 0.9]), 2, rounding="nearest").tolist() == [2.0, 2.0, -2.0, 0.0]
    # a power of two as the maximum: E = its exponent, kept exactly (2^E < 2^(E+1) - step)
    assert block_quantize(f32([4.0, 4.7, 0.3]), 5, rounding="nearest").tolist()[0] == 4.0
    # dim=0: one exponent per row, from each row's largest magnitude
    x2 = f32([[3.9, 1.0, -1.1], [-8.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    assert block_quantize(x2, 2, dim=0, rounding="nearest").tolist() == [
        [2.0, 2.0, -2.0],
        [-8.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ]
    torch.manual_seed(0)
    out = block_quantize(f32([3.9, -3.9] * 500), 4)  # stochastic: 3.5 or 4, clipped to 3.5
    assert set(out.abs().tolist()) == {3.5}


def test_block_at_float32_extremes():
    # E = 127, wl=4: step 2^125 (QPyTorch's float32 6*2^E overflows there and gives NaN)
    x = f32([3e38, -1e38])
    assert block_quantize(x, 4, rounding="nearest").tolist() == [7 * 2.0**125, -2 * 2.0**125]
    # a subnormal maximum, E = -140, wl=3: step 2^-141 (QPyTorch's bit trick assumes a normal one)
    assert block_quantize(f32([2.0**-140, 2.0**-141 * 1.5]), 3, rounding="nearest").tolist() == [
        2.0**-140,
        2.0**-140,
    ]


# ---- Quantizer and OptimLP carry the corrected float range ----------------------------------------


def test_quantizer_uses_qpytorchs_float_range():
    x = f32([1e5, 1e6, -30.0]).requires_grad_()
    q = Quantizer(FloatingPoint(5, 10), FloatingPoint(2, 2), "nearest", "nearest")
    y = q(x)
    assert y.tolist() == [100032.0, 131008.0, -30.0]
    y.backward(f32([30.0, -6.5, 0.3]))
    assert x.grad.tolist() == [7.0, -7.0, 0.25]


def test_optimlp_rounds_to_qpytorchs_float_range():
    w = torch.nn.Parameter(f32([100.0, -100.0]))
    opt = OptimLP(
        torch.optim.SGD([w], lr=1.0),
        weight_quant=quantizer(FloatingPoint(3, 2), forward_rounding="nearest"),  # max 28
        grad_quant=quantizer(FloatingPoint(2, 1), forward_rounding="nearest"),  # max 6
    )
    w.grad = f32([-50.0, 5.0])  # -> -6 and 6 (5 is a tie: away from zero)
    opt.step()
    assert w.tolist() == [28.0, -28.0]
    assert_bits_equal(w.detach(), lp.quantize(w.detach(), FloatingPoint(3, 2).to_lowp()))
