"""lp.matmul (the compiled low-precision accumulation kernel) against the exact sequential
reference, accumulation_reference.reference_matmul, bit for bit: every accumulator kind and
rounding mode, promotion every 1, 3 and 128 products or never, on inputs built to stress it
(swamping across binades, exact cancellations, overflow of the accumulator and of float32,
NaN and Inf, subnormal products, the double-rounding trap of rounding through float32);
stochastic rounding from a seeded generator; batched and broadcast shapes; the backward
pass; argument errors."""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import same_bits

import lightning_lowp as lp
from lightning_lowp.accumulation_reference import reference_matmul
from lightning_lowp.accumulators import check_accumulator

# the reference computes Inf * 0 (NaN) in numpy on the "specials" inputs
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

MODES = list(lp.ROUNDING_MODES)
# every fast path of the kernel's nearest (float32's range; round to odd; the bit trick), and the general one
ACCUMULATORS = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "float(4,2,subnormals=False)"]
ACCUMULATORS += ["float(8,21)", "float(8,22)", "float(6,21)"]
CHUNKS = [None, 1, 3, 128]
M, K, N = 3, 24, 4  # 288 products a case: the reference is slow


def _signs(shape, g):
    return torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)


def make_inputs(kind: str, fmt: str, seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), (M, K) and (K, n), float32, of one adversarial kind for accumulator fmt."""
    g = torch.Generator().manual_seed(seed)
    top = check_accumulator(fmt).max_value
    if kind == "swamping":  # magnitudes over ~60 binades: small products vanish next to big ones
        a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-30, 31, (M, K), generator=g).float())
        b = torch.randn(K, n, generator=g) * torch.exp2(torch.randint(-30, 31, (K, n), generator=g).float())
    elif kind == "cancellation":  # small integers: many exact zero sums, signed zeros among the products
        a = torch.randint(-2, 3, (M, K), generator=g).float()
        b = torch.randint(-2, 3, (K, n), generator=g).float()
        a[0, ::3] = -0.0
        b[::5, 0] = -0.0
    elif kind == "overflow":  # products near and past the accumulator's range, and past float32's
        a = _signs((M, K), g) * top * (0.25 + torch.rand(M, K, generator=g))
        b = torch.rand(K, n, generator=g) + 0.5
        a[2, :] = _signs((K,), g) * 3e38  # sums beyond float32 from finite operands
        b[:, 3] = 2.0  # and products beyond float32 (Inf)
    elif kind == "specials":  # NaN and +-Inf among ordinary values
        a = torch.randn(M, K, generator=g) * 4
        b = torch.randn(K, n, generator=g) * 4
        a[0, 5] = math.inf
        a[1, 7] = -math.inf
        a[1, 9] = math.inf
        b[11, 2] = math.nan
        a[2, 13] = math.inf
        b[13, 1] = 0.0  # Inf * 0 = NaN
    elif kind == "subnormal":  # products in float32's and the accumulator's subnormal ranges
        a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-80, -60, (M, K), generator=g).float())
        b = torch.randn(K, n, generator=g) * torch.exp2(torch.randint(-80, -60, (K, n), generator=g).float())
        a[1, :] = torch.randn(K, generator=g) * 2.0 ** check_accumulator(fmt).emin  # around its smallest normal
        b[:, 1] = torch.randint(1, 4, (K,), generator=g).float() * 0.25
    elif kind == "double_rounding":  # sums whose float32 rounding lands on a tie of the accumulator
        fp = check_accumulator(fmt)
        a = torch.zeros(M, K)
        b = torch.ones(K, n)
        for m in range(M):
            for k in range(K):
                # a power of two on the grid, then half its step plus a tail below float32's last place
                base = 2.0 ** int(torch.randint(-3, 4, (), generator=g))
                half_step = base * 2.0 ** (-fp.man - 1)
                tail = base * 2.0**-26 * float(_signs((), g))
                a[m, k] = base if k % 2 == 0 else half_step + tail
        b = b * _signs((K, n), g).abs()  # all ones: the row sums themselves
    else:
        raise ValueError(kind)
    return a.float(), b.float()


KINDS = ["swamping", "cancellation", "overflow", "specials", "subnormal", "double_rounding"]


def check(a, b, fmt, mode, chunk, seed=7):
    key = int(torch.ops.lowp.draw_key(torch.Generator().manual_seed(seed)))
    ours = lp.matmul(a, b, fmt, mode, chunk, generator=torch.Generator().manual_seed(seed))
    ref = reference_matmul(a, b, fmt, mode, chunk, key)
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    if not same_bits(ours, ref):
        bad = ((ours.view(torch.int32) != ref.view(torch.int32)) & ~(ours.isnan() & ref.isnan())).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{fmt} {mode} chunk={chunk}: {len(bad)} differ; at {i}: {ours[i]} vs {ref[i]}")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ACCUMULATORS)
@pytest.mark.parametrize("kind", KINDS)
def test_equals_reference(kind, fmt, mode, chunk):
    a, b = make_inputs(kind, fmt)
    check(a, b, fmt, mode, chunk)


# Rounding to nearest into fp16 and into the formats of float32's range runs 16 columns per
# instruction in the AVX-512 build (accumulate_nearest_avx512.h); rows of 37 columns take two
# full vectors and a masked tail of 5.
VECTOR_FORMATS = ["fp16", "bf16", "float(8,21)"]


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", VECTOR_FORMATS)
def test_nearest_across_vectors(fmt, kind, chunk):
    a, b = make_inputs(kind, fmt, seed=5, n=37)
    check(a, b, fmt, "nearest", chunk)


# (LOWP_CPU_ISA set below avx512 would compare the scalar code with itself)
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get("LOWP_CPU_ISA", "avx512") == "avx512"
# binary scales of a's rows and b's columns: fp16's subnormals to 2^12; float32's subnormals to 2^60
SCALES = {"fp16": ((-16, 6), (-8, 2)), "bf16": ((-100, 50), (-40, 10)), "float(8,21)": ((-100, 50), (-40, 10))}


@pytest.mark.skipif(not AVX512, reason="the vector forms are compiled for AVX-512 processors only")
@pytest.mark.parametrize("fmt", VECTOR_FORMATS)
def test_vector_forms_equal_the_scalar_code(fmt, tmp_path):
    # the same bits as add_rounded_nearest_odd(_wide) of the AVX2 build (LOWP_CPU_ISA caps the
    # instruction set), on 2^20 products over the format's range, and on the adversarial kinds
    g = torch.Generator().manual_seed(0)
    (a_lo, a_hi), (b_lo, b_hi) = SCALES[fmt]
    a = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(a_lo, a_hi, (64, 1), generator=g).float())
    b = torch.randn(256, 64, generator=g) * torch.exp2(torch.randint(b_lo, b_hi, (1, 64), generator=g).float())
    cases = [(a, b)] + [make_inputs(kind, fmt, seed=9, n=64) for kind in KINDS]
    torch.save(cases, tmp_path / "cases.pt")
    script = (
        "import sys, torch, lightning_lowp as lp\n"
        "cases = torch.load(sys.argv[1])\n"
        "torch.save([lp.matmul(a, b, sys.argv[3], chunk=c) for a, b in cases for c in (None, 16)], sys.argv[2])\n"
    )
    env = dict(os.environ, LOWP_CPU_ISA="avx2")
    args = [sys.executable, "-c", script, tmp_path / "cases.pt", tmp_path / "avx2.pt", fmt]
    subprocess.run(args, env=env, check=True)
    scalar = torch.load(tmp_path / "avx2.pt")
    ours = [lp.matmul(a, b, fmt, chunk=c) for a, b in cases for c in (None, 16)]
    assert all(same_bits(x, y) for x, y in zip(ours, scalar, strict=True))
    assert ours[0].isfinite().all()  # a meaningful comparison:
    assert (ours[0] != 0).float().mean() > 0.9


def test_the_traps_hand_made():
    ones = torch.ones(2, 1)
    # 1 + (2^-4 + 2^-27) in fp8_e4m3: a tie after rounding to float32, above it exactly
    a = torch.tensor([[1.0, 2.0**-4 + 2.0**-27]])
    assert lp.matmul(a, ones, "fp8_e4m3").item() == 1.125
    # 2^100 +- 2^-100: beyond float64, directed modes move a step
    a = torch.tensor([[2.0**100, 2.0**-100]])
    assert lp.matmul(a, ones, "bf16", "up").item() == 2.0**100 * (1 + 2.0**-7)
    a = torch.tensor([[2.0**100, -(2.0**-100)]])
    assert lp.matmul(a, ones, "bf16", "toward_zero").item() == 2.0**100 * (1 - 2.0**-8)
    # an exact zero sum is +0 in every mode; -0 + -0 is -0
    for mode in MODES:
        z = lp.matmul(torch.tensor([[1.0, -1.0]]), ones, "bf16", mode)
        assert z.item() == 0.0
        assert not torch.signbit(z).item()
    assert not torch.signbit(lp.matmul(torch.tensor([[-0.0, -0.0]]), ones, "bf16")).item()  # +0 start
    # a sum beyond float32 from finite operands overflows the accumulator
    big = torch.tensor([[3e38, 3e38]])
    assert lp.matmul(big, ones, "fp16").item() == math.inf
    assert lp.matmul(big, ones, "fp16", "toward_zero").item() == 65504.0
    assert lp.matmul(big, ones, "fp8_e4m3").item() == 448.0


@pytest.mark.parametrize("fmt", ["float(8,23)", "float(5,23)", "float(3,23)"])
@pytest.mark.parametrize("mode", MODES)
def test_accumulators_on_float32s_grid(fmt, mode):
    # 23 mantissa bits: the accumulator's grid is float32's own around most sums (the
    # neighbours are float32 neighbours), including just below powers of two
    a, b = make_inputs("swamping", "bf16", seed=3)
    check(a, b, fmt, mode, None)
    a = torch.tensor([[1.0, -(2.0**-30), 2.0**-30, 2.0**-25 + 2.0**-49, -(2.0**-26)]] * 2)
    check(a, torch.ones(5, 3), fmt, mode, None)


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_stochastic_and_wide_shapes(mode):
    # many seeds and several draws: stochastic bits follow the reference's counters
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 30, generator=g) * torch.exp2(torch.randint(-8, 9, (2, 5, 30), generator=g).float())
    b = torch.randn(30, 7, generator=g)
    for seed in range(3):
        check(a, b, "fp8_e5m2", mode, None, seed=seed)
        check(a, b, "bf16", mode, 4, seed=seed)


def test_stochastic_draws_from_the_generator():
    a, b = torch.randn(4, 50), torch.randn(50, 4)
    g = torch.Generator().manual_seed(3)
    first = lp.matmul(a, b, "fp16", "stochastic", generator=g)
    second = lp.matmul(a, b, "fp16", "stochastic", generator=g)
    again = lp.matmul(a, b, "fp16", "stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((2, 3, 4, 6), (6, 5)), ((4, 6), (3, 6, 5)), ((2, 1, 4, 6), (3, 6, 5)), ((1, 4, 6), (2, 6, 5)), ((4, 0), (0, 5))],
)
@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
def test_batched_and_broadcast(a_shape, b_shape, mode):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=g) * 30
    b = torch.randn(b_shape, generator=g)
    if a.numel() == 0:  # no products: +0 (the reference's loops need K >= 1)
        assert torch.equal(lp.matmul(a, b, "fp8_e4m3", mode), torch.zeros(4, 5))
    else:
        check(a, b, "fp8_e4m3", mode, 2)
    assert lp.matmul(a, b, "fp16").shape == torch.matmul(a, b).shape


def test_non_contiguous_and_other_dtypes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g).t()  # (4, 6), a transposed view
    b = torch.randn(5, 6, generator=g)[:, ::1].t()
    check(a, b, "bf16", "nearest", None)
    ours = lp.matmul(a.double(), b.to(torch.bfloat16), "bf16")
    ref = reference_matmul(a.double().float(), b.to(torch.bfloat16).float(), "bf16")
    assert same_bits(ours, ref)


def test_none_is_torch_matmul():
    a, b = torch.randn(2, 3, 4), torch.randn(4, 5)
    assert torch.equal(lp.matmul(a, b), torch.matmul(a, b))


@pytest.mark.parametrize("mode", ["nearest", "up", "stochastic"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_backward_is_accumulated_gemms(mode, chunk):
    # y = a @ b: da = matmul(dy, b^T), db = matmul(a^T, dy), with the same accumulator
    # settings; the broadcast batch dim of b summed (in float32). Keys: forward, da, db.
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(2, 3, 8, generator=g) * 10).requires_grad_()
    b = torch.randn(8, 5, generator=g).requires_grad_()
    dy = torch.randn(2, 3, 5, generator=g)
    gen = torch.Generator().manual_seed(11)
    keys_from = torch.Generator().manual_seed(11)
    keys = [int(torch.ops.lowp.draw_key(keys_from)) for _ in range(3)] if mode == "stochastic" else [0, 0, 0]
    y = lp.matmul(a, b, "fp8_e5m2", mode, chunk, generator=gen)
    assert same_bits(y, reference_matmul(a, b, "fp8_e5m2", mode, chunk, keys[0]))
    y.backward(dy)
    da = reference_matmul(dy, b.detach().t(), "fp8_e5m2", mode, chunk, keys[1])
    db = reference_matmul(a.detach().transpose(-2, -1), dy, "fp8_e5m2", mode, chunk, keys[2]).sum(0)
    assert same_bits(a.grad, da)
    assert same_bits(b.grad, db)


def test_gradcheck_shape_and_no_grad_path():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 2)
    y = lp.matmul(a, b, "fp16")
    assert y.requires_grad
    assert y.grad_fn is not None
    with torch.no_grad():
        assert not lp.matmul(a, b, "fp16").requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulate": "fixed(8,4)"}, "accumulate=.* not a float format"),
        ({"accumulate": "bfp(8)"}, "accumulate=.* not a float format"),
        ({"accumulate": "nonsense"}, "nonsense"),
        ({"accumulate": "fp16", "accumulate_rounding": "banker"}, "accumulate_rounding="),
        ({"accumulate": "fp16", "chunk": 0}, "chunk"),
        ({"accumulate": "fp16", "chunk": True}, "chunk"),
        ({"accumulate": "fp16", "chunk": 2.0}, "chunk"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.matmul(torch.randn(2, 3), torch.randn(3, 4), **kwargs)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.randn(2, 3), torch.randn(4, 5), "same K"),
        (torch.randn(2, 2, 3), torch.randn(3, 3, 5), "do not broadcast"),
        (torch.randn(3), torch.randn(3, 5), "a must have at least 2 dims"),
        (torch.randn(2, 3), torch.randn(3), "b must have at least 2 dims"),
        (torch.ones(2, 3, dtype=torch.int32), torch.randn(3, 5), "a must be a floating-point"),
        ([[1.0]], torch.randn(1, 5), "a must be a torch.Tensor"),
    ],
)
def test_bad_operands(a, b, match):
    with pytest.raises(ValueError, match=match):
        lp.matmul(a, b, "fp16")


def test_operator_checks_its_arguments():
    op = torch.ops.lowp.matmul_accumulate
    kind, params = lp.ops.kernel_args(check_accumulator("fp16"))
    a, b = torch.randn(1, 2, 3), torch.randn(1, 3, 4)
    assert op(a, b, kind, params, 0, 0).shape == (1, 2, 4)
    with pytest.raises(ValueError, match="do not match"):
        op(a, torch.randn(1, 4, 4), kind, params, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        op(a.double(), b, kind, params, 0, 0)
    with pytest.raises(ValueError, match="float format"):
        op(a, b, 0, [8, 4, 1, 0], 0, 0)
    with pytest.raises(ValueError, match="chunk"):
        op(a, b, kind, params, 0, -1)
    with pytest.raises(ValueError, match="rounding"):
        op(a, b, kind, params, 6, 0)


def test_fake_implementation():
    kind, params = lp.ops.kernel_args(check_accumulator("bf16"))
    args = (torch.randn(2, 3, 4), torch.randn(2, 4, 5), kind, params, 0, 3)
    torch.library.opcheck(torch.ops.lowp.matmul_accumulate.default, args, test_utils="test_faketensor")
