"""The exact accumulation reference: hand-computed cases, and against per-step lp.quantize where
every float32 sum is exact (so that rounding the float32 sum is rounding the exact sum)."""

import math

import pytest
import torch

import lightning_lowp as lp
from lightning_lowp.accumulation_reference import reference_matmul
from lightning_lowp.accumulators import check_accumulator

MODES = list(lp.ROUNDING_MODES)


def row(values, fmt, mode="nearest", chunk=None, key=0):
    """Σ values (one row, multiplied by ones) accumulated in fmt: a float."""
    a = torch.tensor([values], dtype=torch.float32)
    return float(reference_matmul(a, torch.ones(len(values), 1), fmt, mode, chunk, key)[0, 0])


def test_swamping_and_promotion():
    # bf16 holds 8 significant bits: at 256 its step is 2, so adding 1 ties and stays (to even)
    assert row([256.0] + [1.0] * 8, "bf16") == 256.0
    # rounding up, every +1 climbs a step of 2
    assert row([256.0] + [1.0] * 8, "bf16", "up") == 256.0 + 16
    # promotion every product: float32 sums, exact here
    assert row([256.0] + [1.0] * 8, "bf16", chunk=1) == 264.0
    # every 3 products: [256, 1, 1] -> 256 (both ones lost), [1, 1, 1] -> 3, [1, 1, 1] -> 3
    assert row([256.0] + [1.0] * 8, "bf16", chunk=3) == 262.0
    # every 2: [256, 1] -> 256, then [1, 1] -> 2 three times, and the last 1 alone
    assert row([256.0] + [1.0] * 8, "bf16", chunk=2) == 263.0
    assert row([256.0, 1.0, 1.0], "bf16", chunk=2) == 257.0  # 256 (chunk 1) + 1 (the rest), in float32


def test_no_double_rounding_through_float32():
    # 1 + (2^-4 + 2^-27) in fp8_e4m3 (step 1/8 at 1): the exact sum lies above the midpoint
    # 1.0625 and rounds up to 1.125; rounded to float32 first (1.0625, a tie) it would go to 1.0
    p = 2.0**-4 + 2.0**-27
    assert float(torch.tensor(1.0 + p, dtype=torch.float32)) == 1.0625
    assert row([1.0, p], "fp8_e4m3") == 1.125
    # a sum that float64 cannot hold: 2^100 + 2^-100 rounded up is the next bf16 value
    assert row([2.0**100, 2.0**-100], "bf16", "up") == 2.0**100 * (1 + 2.0**-7)
    assert row([2.0**100, 2.0**-100], "bf16", "down") == 2.0**100
    assert row([2.0**100, -(2.0**-100)], "bf16", "down") == 2.0**100 * (1 - 2.0**-8)
    assert row([2.0**100, -(2.0**-100)], "bf16", "toward_zero") == 2.0**100 * (1 - 2.0**-8)


def test_overflow_underflow_and_specials():
    assert row([60000.0, 60000.0], "fp16") == math.inf  # beyond 65504: fp16 overflows to Inf
    assert row([60000.0, 60000.0], "fp16", "toward_zero") == 65504.0
    assert row([400.0, 400.0], "fp8_e4m3") == 448.0  # E4M3 (fn) saturates
    assert row([2.0**-26, 2.0**-26], "fp16") == 0.0  # a quarter of fp16's smallest subnormal, twice
    assert row([2.0**-26, 2.0**-26], "fp16", "up") == 2.0**-23
    assert math.isnan(row([1.0, float("nan"), 1.0], "bf16"))
    assert row([1.0, float("inf")], "fp8_e4m3") == 448.0  # no Inf in E4M3
    assert row([1.0, -1.0], "bf16", "down") == 0.0
    assert math.copysign(1.0, row([1.0, -1.0], "bf16", "down")) == 1.0  # an exact zero sum is +0
    assert math.copysign(1.0, row([-0.0, -0.0], "bf16")) == 1.0  # the accumulator starts at +0


def test_products_are_float32_and_batches_broadcast():
    a = torch.tensor([[[1.0 + 2.0**-12]], [[3.0]]])  # (2, 1, 1)
    b = torch.tensor([[1.0 + 2.0**-12]])  # (1, 1): broadcast over the batch
    out = reference_matmul(a, b, "fp32")
    assert out.shape == (2, 1, 1)
    assert out[0, 0, 0] == torch.tensor(1.0 + 2.0**-12, dtype=torch.float32) ** 2  # float32 product
    assert out[1, 0, 0] == 3.0 * (1.0 + 2.0**-12)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "stochastic"])
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "float(4,2,subnormals=False)"])
def test_equals_per_step_quantize_where_float32_sums_are_exact(fmt, mode):
    # small integers times 2^-6: every product and every float32 sum is exact, so rounding
    # the float32 sum (lp.quantize) is rounding the exact sum
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-40, 41, (3, 24), generator=g).float() / 8
    b = torch.randint(-8, 9, (24, 4), generator=g).float() / 8
    got = reference_matmul(a, b, fmt, mode)
    acc = torch.zeros(3, 4)
    for k in range(24):
        acc = lp.quantize(acc + a[:, k : k + 1] * b[k : k + 1, :], fmt, mode)
    assert torch.equal(got, acc)


def test_stochastic_is_keyed_and_unbiased():
    values = [1.0] + [2.0**-9] * 64  # each +2^-9 is 1/4 of bf16's step at 1 (2^-7)
    assert row(values, "bf16", "nearest") == 1.0  # to nearest, every addition is lost
    runs = [row(values, "bf16", "stochastic", key=k) for k in range(64)]
    assert row(values, "bf16", "stochastic", key=3) == runs[3]  # the key fixes the draws
    assert len(set(runs)) > 1
    mean = sum(runs) / len(runs)
    assert abs(mean - (1.0 + 64 * 2.0**-9)) < 0.02  # unbiased: about 1.125


def test_bad_input():
    with pytest.raises(ValueError, match=r"accumulate=fixed.*not a float format"):
        check_accumulator("fixed(8,4)")
    with pytest.raises(ValueError, match="not a float format"):
        check_accumulator("mxfp8_e4m3")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        reference_matmul(torch.ones(1, 2), torch.ones(2, 1), "bf16", chunk=0)
    with pytest.raises(ValueError, match="accumulate_rounding"):
        reference_matmul(torch.ones(1, 2), torch.ones(2, 1), "bf16", "round")
