"""The tensor-core accumulator (lp.AlignedSum) against the exact reference, bit for bit:
groups that divide K and groups that leave a partial last one, 2 to 32 bits kept, both
stores (nearest, toward zero), promotion after whole groups; swamping, cancellation,
overflow, Inf/NaN and subnormal products (the adversarial inputs of test_accumulate.py);
hand-computed cases; the backward; argument errors."""

import math

import pytest
import torch
from helpers import same_bits
from test_accumulate import KINDS, make_inputs

import lightning_lowp as lp
from lightning_lowp.accumulation_reference import reference_matmul

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CASES = [  # (group, bits, chunk)
    (1, 2, None),
    (4, 24, None),  # V100-like: sums of up to 27 bits, so the store rounds
    (5, 14, 10),  # a partial last group (K = 24), promotion every two groups
    (8, 32, None),
    (32, 14, None),  # DeepSeek-V3's H800 model; one group covers K
    (3, 8, 3),
]


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize(("group", "bits", "chunk"), CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_equals_reference(kind, group, bits, chunk, rounding):
    a, b = make_inputs(kind, "float(8,23)")
    acc = lp.AlignedSum(group, bits)
    got = lp.matmul(a, b, acc, rounding, chunk)
    want = reference_matmul(a, b, acc, rounding, chunk)
    assert same_bits(got, want), (got, want)


def test_hand_computed():
    # 2^20 then 32 ones, groups of 32: the first group aligns the ones to 2^20; 14 bits keep
    # multiples of 2^7 only, so 31 ones vanish; the next group (acc 2^20, one 1) loses it too
    a = torch.ones(1, 33)
    b = torch.ones(33, 1)
    b[0, 0] = 2.0**20
    assert lp.matmul(a, b, lp.AlignedSum(32, 14)).item() == 2.0**20
    # 22 bits keep multiples of 2^-1: every one survives
    assert lp.matmul(a, b, lp.AlignedSum(32, 22)).item() == 2.0**20 + 32
    # promotion every 32 products: the second group starts from 0 and keeps its one
    assert lp.matmul(a, b, lp.AlignedSum(32, 14), chunk=32).item() == 2.0**20 + 1
    # a group of one with many bits is an exact fp32 sum here
    assert lp.matmul(a, b, "aligned(1,24)").item() == 2.0**20 + 32
    # truncation is toward zero on each term: -1.75 -> -1.5 with 2 bits kept at exponent 0
    assert lp.matmul(torch.tensor([[1.0, -1.75]]), torch.ones(2, 1), lp.AlignedSum(2, 2)).item() == -0.5
    # the store: 2^24 + 1 + 2^-6 needs 31 bits; nearest rounds it to 2^24 + 2, toward zero to 2^24
    x = torch.tensor([[2.0**24, 1.0, 2.0**-6]])
    assert lp.matmul(x, torch.ones(3, 1), lp.AlignedSum(4, 32)).item() == 2.0**24 + 2
    assert lp.matmul(x, torch.ones(3, 1), lp.AlignedSum(4, 32), "toward_zero").item() == 2.0**24


def test_zeros_and_specials():
    ones = torch.ones(2, 1)
    for out in (lp.matmul, reference_matmul):  # the accumulator starts at +0
        z = out(torch.tensor([[-0.0, -0.0]]), ones, "aligned(2,2)")
        assert z.item() == 0.0
        assert not torch.signbit(z).item()
    assert lp.matmul(torch.tensor([[math.inf, 1.0]]), ones, "aligned(2,14)").item() == math.inf
    assert math.isnan(lp.matmul(torch.tensor([[math.inf, -math.inf]]), ones, "aligned(1,14)").item())
    # a finite sum past float32: Inf to nearest, the largest float32 toward zero
    big = torch.tensor([[3e38, 3e38]])
    assert lp.matmul(big, ones, "aligned(2,24)").item() == math.inf
    assert lp.matmul(big, ones, "aligned(2,24)", "toward_zero").item() == torch.finfo(torch.float32).max


def test_error_grows_with_k_and_promotion_bounds_it():
    # positive products: each group's truncation drops up to a unit of the accumulator's
    # 14th bit, so the relative error grows with K; promotion every 128 resets the accumulator
    g = torch.Generator().manual_seed(0)
    a = torch.rand(8, 4096, generator=g)
    b = torch.rand(4096, 8, generator=g)
    exact = (a.double() @ b.double()).float()

    def rel(out):
        return ((out - exact).abs() / exact.abs()).mean().item()

    short = lp.matmul(a[:, :256], b[:256], "aligned(32,14)")
    exact_short = (a[:, :256].double() @ b[:256].double()).float()
    err_short = ((short - exact_short).abs() / exact_short).mean().item()
    err_long = rel(lp.matmul(a, b, "aligned(32,14)"))
    err_promoted = rel(lp.matmul(a, b, "aligned(32,14)", chunk=128))
    assert err_long > 2 * err_short
    assert err_promoted < err_long / 4


def test_backward_uses_the_same_accumulator():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 40, generator=g, requires_grad=True)
    b = torch.randn(40, 5, generator=g, requires_grad=True)
    y = lp.matmul(a, b, "aligned(8,6)")
    dy = torch.randn(3, 5, generator=g)
    y.backward(dy)
    assert same_bits(a.grad, reference_matmul(dy, b.detach().T, "aligned(8,6)"))
    assert same_bits(b.grad, reference_matmul(a.detach().T, dy, "aligned(8,6)"))
    assert not torch.equal(a.grad, dy @ b.detach().T)  # 6 bits are visible


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulate": "aligned(32,14)", "accumulate_rounding": "stochastic"}, "accumulate_rounding="),
        ({"accumulate": "aligned(32,14)", "chunk": 48}, "multiple of the group"),
        ({"accumulate": "aligned(0,14)"}, "group"),
        ({"accumulate": "aligned(32,1)"}, "bits"),
        ({"accumulate": "aligned(32,33)"}, "bits"),
        ({"accumulate": 3}, "accumulate must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.matmul(torch.randn(2, 3), torch.randn(3, 4), **kwargs)


def test_spec_and_settings_objects():
    acc = lp.AlignedSum(16, 13)
    assert str(acc) == "aligned(16,13)"
    assert lp.Accumulation("aligned(16,13)").accumulate == acc
    assert str(lp.Accumulation(acc, "toward_zero", 128)) == "aligned(16,13),toward_zero,chunk=128"
    assert hash(lp.Accumulation("bf16")) == hash(lp.Accumulation(lp.FloatingPoint(8, 7)))
    with pytest.raises(ValueError, match="group"):
        lp.AlignedSum(group=2.5)


def test_operator_checks_its_arguments():
    op = torch.ops.lowp.matmul_aligned
    a, b = torch.randn(1, 2, 8), torch.randn(1, 8, 4)
    assert op(a, b, 4, 14, 0, 8).shape == (1, 2, 4)
    with pytest.raises(ValueError, match="multiple of group"):
        op(a, b, 4, 14, 0, 6)
    with pytest.raises(ValueError, match="rounding"):
        op(a, b, 4, 14, 5, 0)
    with pytest.raises(ValueError, match="bits"):
        op(a, b, 4, 40, 0, 0)
    torch.library.opcheck(torch.ops.lowp.matmul_aligned.default, (a, b, 4, 14, 2, 0), test_utils="test_faketensor")
