"""The compiled kernels on scaled formats with float scales (fp32, fp8_e4m3, NVFP4's two levels).

A float scale s is not a power of two, so the element is the exact quotient |x| / s rounded
on the element's grid (decided exactly, never via a rounded float32 x / s) and the result is
float32(q * s). The checks here decide the same things in float64, where every product of a
grid value (few bits) and a scale (24 bits) is exact.
"""

import math

import pytest
import torch

import lightning_lowp as lp

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4  # noqa: E402

F64 = torch.float64
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)
FP4_MIDPOINTS = (FP4_GRID[1:] + FP4_GRID[:-1]) / 2


def e4m3_grid() -> torch.Tensor:
    """The non-negative E4M3 (fn) values, float64, ascending."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7f is NaN
    return codes.view(torch.float8_e4m3fn).to(F64)


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def nearest_on_grid(x: torch.Tensor, s: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """sign(x) * the grid value nearest |x| / s (ties to the even code), decided exactly in float64."""
    a = x.to(F64).abs()
    mids = (grid[1:] + grid[:-1]) / 2
    above = a.unsqueeze(-1) > mids * s.to(F64).unsqueeze(-1)  # mid * s is exact: few bits times 24
    tie = a.unsqueeze(-1) == mids * s.to(F64).unsqueeze(-1)
    idx = above.sum(-1)
    idx = idx + (tie.any(-1) & (idx % 2 == 1)).to(idx.dtype)  # a tie goes to the even index (even code)
    q = torch.clamp(grid[idx], max=grid[-1])
    return torch.where(x < 0, -q, q)


# ---- NVFP4 against torchao --------------------------------------------------------------


def torchao_nvfp4(x: torch.Tensor):
    """torchao's two-level NVFP4 of x with its own per-tensor scale: (dequantized, scales, q, quotient).

    quotient: torchao's float32 x * (1 / t / e4m3), what it rounds to FP4 (before the clamp).
    """
    pts = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    t = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, block_size=16, per_tensor_scale=pts)
    deq = t.dequantize(torch.float32)
    rows, cols = x.shape
    scales = t.get_hp_scales().reshape(rows, cols // 16, 1).expand(rows, cols // 16, 16).reshape(rows, cols)
    q = f4_unpacked_to_f32(unpack_uint4(t.qdata.contiguous().view(torch.uint8))).reshape(rows, cols)
    e4m3 = t.scale.to(torch.float32).reshape(rows, cols // 16, 1)
    reciprocal = (1.0 / pts) / e4m3  # float32, as nvfp4_quantize computes it
    quotient = (x.reshape(rows, cols // 16, 16) * reciprocal).reshape(rows, cols)
    return deq, scales, q, quotient


def nvfp4_test_tensor(seed: int = 0) -> torch.Tensor:
    """Blocks of 16 over many magnitudes, element 0 the block's amax, the others on or a few
    ulps around torchao's rounding boundaries (midpoints of the FP4 grid times the scale)."""
    g = torch.Generator().manual_seed(seed)
    rows, blocks = 64, 32
    x = torch.randn(rows, blocks, 16, generator=g)
    x = x * torch.exp2(torch.randint(-6, 7, (rows, blocks, 1), generator=g).float())
    amax = x.abs().amax(-1, keepdim=True)
    x[..., 0] = torch.where(x[..., 0] < 0, -amax[..., 0], amax[..., 0])  # element 0 holds the amax
    x = x.reshape(rows, blocks * 16)
    _, s, _, _ = torchao_nvfp4(x)  # the scales depend on the amaxes only, which stay
    s = s.reshape(rows, blocks, 16).to(F64)
    mid = FP4_MIDPOINTS[torch.randint(0, 7, (rows, blocks, 16), generator=g)]
    near = f32(mid * s)  # the boundary, as a float32
    ulps = torch.randint(-3, 4, (rows, blocks, 16), generator=g)
    near_bits = near.view(torch.int32) + ulps.to(torch.int32)
    near = near_bits.view(torch.float32)
    sign = torch.where(torch.rand(rows, blocks, 16, generator=g) < 0.5, -1.0, 1.0)
    candidate = sign * near
    keep = (near < amax * 0.999) & (torch.arange(16) >= 1) & (torch.rand(rows, blocks, 16, generator=g) < 0.7)
    y = torch.where(keep, candidate, x.reshape(rows, blocks, 16))
    return y.reshape(rows, blocks * 16)


def test_nvfp4_matches_torchao_except_where_torchao_rounds_twice():
    x = nvfp4_test_tensor()
    ours = lp.quantize(x, "nvfp4")
    theirs, s, q_theirs, quotient = torchao_nvfp4(x)

    # Ours is the exact answer: the FP4 value nearest |x| / s (s: torchao's scale), times s.
    q_exact = nearest_on_grid(x, s, FP4_GRID)
    assert bits_equal(ours, f32(q_exact * s.to(F64)))

    differs = ours != theirs
    n, mismatches = x.numel(), int(differs.sum())
    assert 0 < mismatches < n // 20, (n, mismatches)  # the construction puts many at boundaries
    # Each mismatch: torchao's q and the exact q are neighbours, and torchao's float32 quotient
    # lies on or across the boundary between them, while the exact quotient does not.
    qt, qe = q_theirs[differs].to(F64), q_exact[differs]
    idx_t = torch.searchsorted(FP4_GRID, qt.abs())
    idx_e = torch.searchsorted(FP4_GRID, qe.abs())
    assert torch.all((idx_t - idx_e).abs() == 1)
    boundary = (qt.abs() + qe.abs()) / 2
    exact_side = torch.sign(x[differs].to(F64).abs() - boundary * s[differs].to(F64))  # exact
    torchao_side = torch.sign(quotient[differs].to(F64).abs() - boundary)
    assert torch.all(exact_side != 0)  # (an exact tie is decided alike by both: to even)
    assert torch.all((torchao_side == 0) | (torchao_side != exact_side))


def test_nvfp4_scales_are_torchaos_bit_for_bit():
    # +-Inf saturates to +-6 * s; Inf counts in no amax, so putting it in place of a non-max
    # element reads out each block's scale as float32(6 * s).
    x = nvfp4_test_tensor(seed=1)
    _, s, _, _ = torchao_nvfp4(x)
    probe = x.clone().reshape(64, 32, 16)
    probe[..., 1] = torch.where(torch.arange(32) % 2 == 0, math.inf, -math.inf)
    out = lp.quantize(probe.reshape(64, 512), "nvfp4").reshape(64, 32, 16)
    s_block = s.reshape(64, 32, 16)[..., 1]
    expected = f32(6.0 * s_block.to(F64)) * torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)
    assert bits_equal(out[..., 1], expected)
    # and the other elements are unchanged by the probe
    assert bits_equal(out[..., 2:], lp.quantize(x, "nvfp4").reshape(64, 32, 16)[..., 2:])


def test_nvfp4_plain_gaussian_agrees_almost_everywhere():
    torch.manual_seed(0)
    x = torch.randn(128, 1024)
    ours = lp.quantize(x, "nvfp4")
    theirs, s, _, _ = torchao_nvfp4(x)
    assert bits_equal(ours, f32(nearest_on_grid(x, s, FP4_GRID) * s.to(F64)))
    assert int((ours != theirs).sum()) <= x.numel() // 10000


# ---- every mode, ties, presets -----------------------------------------------------------

FLOAT_SCALED = [
    "nvfp4",
    "fp8_tensorwise",
    "fp8_blockwise_1x128",
    lp.ScaledFormat("fp4_e2m1", 16, scale="fp8_e4m3"),
    lp.ScaledFormat("fp6_e3m2", 32, scale="fp32"),
    lp.ScaledFormat(lp.FixedPoint(8, 6), 32, scale="fp32"),
    lp.ScaledFormat("fp8_e5m2", "row", dim=0, scale="fp8_e4m3"),
]


def many_magnitudes(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g)
    return x * torch.exp2(torch.randint(-30, 31, (64, 1), generator=g).float())


@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", FLOAT_SCALED, ids=str)
def test_every_mode_lands_on_a_neighbour(fmt, rounding):
    x = many_magnitudes(1)
    torch.manual_seed(0)
    q = lp.quantize(x, fmt, rounding)
    down = lp.quantize(x, fmt, "down")
    up = lp.quantize(x, fmt, "up")
    assert torch.all((q == down) | (q == up))
    # saturated: |x| past max * s (both directions give it); elsewhere down <= x <= up
    saturated = (down == up) & (x.abs() > up.abs())
    assert torch.all(down[~saturated] <= x[~saturated])
    assert torch.all(x[~saturated] <= up[~saturated])
    assert torch.all(q[saturated] == up[saturated])
    if fmt in ("fp8_tensorwise", "fp8_blockwise_1x128"):  # fp32 scales: s = amax / max, only amax can pass
        assert int(saturated.sum()) <= x.numel() // 128


def test_ties_go_to_even_and_away():
    # fp32 scales, whole tensor: amax = 448 * s0 with s0 of few bits, so s = s0 exactly and
    # every midpoint of the E4M3 grid times s is a float32.
    s0 = 1.0 + 2.0**-7 + 2.0**-12  # not a power of two
    grid = e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    x64 = torch.cat([torch.tensor([448 * s0], dtype=F64), mids * s0, -mids * s0])
    x = f32(x64)
    assert torch.equal(x.to(F64), x64)  # exact ties
    fmt = lp.ScaledFormat("fp8_e4m3", "tensor", scale="fp32")
    q = lp.quantize(x, fmt).to(F64) / s0  # q * s0 is exact in float32 here
    lo, hi = grid[:-1], grid[1:]
    codes_lo = torch.arange(len(lo))
    even = torch.where(codes_lo % 2 == 0, lo, hi)
    n = len(mids)
    assert torch.equal(q[1 : 1 + n], even)
    assert torch.equal(q[1 + n :], -even)
    away = lp.quantize(x, fmt, "nearest_away").to(F64) / s0
    assert torch.equal(away[1 : 1 + n], hi)
    assert torch.equal(away[1 + n :], -hi)


def test_nvfp4_ties_go_to_even():
    x = nvfp4_test_tensor(seed=2)
    _, s, _, _ = torchao_nvfp4(x)
    s = s.to(F64)
    ties = (FP4_MIDPOINTS[torch.arange(x.numel()) % 7].reshape(x.shape)) * s
    exact = f32(ties).to(F64) == ties  # the ties that float32 holds
    y = x.clone()
    cols = torch.arange(x.shape[1]) % 16 != 0  # keep each block's amax (element 0)
    use = exact & cols
    y[use] = f32(ties)[use]
    assert int(use.sum()) > 100
    q = lp.quantize(y, "nvfp4")
    assert bits_equal(q, f32(nearest_on_grid(y, s, FP4_GRID) * s))


@pytest.mark.parametrize("preset", ["fp8_tensorwise", "fp8_blockwise_1x128"])
def test_fp8_presets_give_e4m3_multiples_of_the_fp32_scale(preset):
    x = many_magnitudes(3)
    q = lp.quantize(x, preset)
    if preset == "fp8_tensorwise":
        amax = x.abs().amax().expand(x.shape)
    else:
        amax = x.reshape(64, 2, 128).abs().amax(-1, keepdim=True).expand(64, 2, 128).reshape(x.shape)
    s = amax / 448.0  # float32 division, as torchao's float8 recipes compute the scale
    expected = nearest_on_grid(x, s, e4m3_grid())
    assert bits_equal(q, f32(expected * s.to(F64)))


def test_e4m3_block_scales_are_torchs_cast_of_amax_over_max():
    # Every E4M3 value, the midpoints between them and a float32 ulp either side, E4M3's
    # subnormals, values that round to zero and past 448: blocks [amax * 6, +Inf] of FP4 with
    # an E4M3 scale, where +Inf saturates to 6 * s (exact), which reads the scale out.
    grid = e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    v = f32(torch.cat([grid, mids, torch.tensor([470.0, 1e4, 2.0**-11, 2.0**-10])]))
    bits = v.view(torch.int32)
    v = torch.cat([v, (bits + 1).view(torch.float32), (bits - 1).view(torch.float32)])
    v = v[v > 0]
    amax = f32(v.to(F64) * 6)
    blocks = torch.stack([amax, torch.full_like(amax, math.inf)], dim=1)
    out = lp.quantize(blocks, lp.ScaledFormat("fp4_e2m1", 2, scale="fp8_e4m3"))
    s = torch.clamp(amax / 6.0, max=448.0).to(torch.float8_e4m3fn).to(torch.float32)  # torch's cast
    tiny = 2.0**-9  # a scale that rounds to zero saturates Inf at 6 times E4M3's smallest value
    expected = torch.where(s > 0, 6.0 * s, torch.full_like(s, 6.0 * tiny))
    assert int((s == 0).sum()) > 0  # scales that round to zero
    assert int(((s > 0) & (s < 2.0**-6)).sum()) > 0  # E4M3's subnormals
    assert bits_equal(out[:, 1], expected)


# ---- zero blocks, NaN, Inf ---------------------------------------------------------------


def test_zero_blocks_nan_and_inf():
    inf, nan = math.inf, math.nan
    zero_block = [0.0, -0.0, inf, -inf, nan] + [0.0] * 11
    live_block = [3.0, -inf, inf, nan] + [1.0] * 12

    fp32 = lp.ScaledFormat("fp4_e2m1", 16, scale="fp32")
    q = lp.quantize(torch.tensor(zero_block + live_block), fp32)
    assert bits_equal(q[:2], torch.tensor([0.0, -0.0]))
    assert (q[2].item(), q[3].item()) == (6 * 2.0**-149, -(6 * 2.0**-149))
    assert q[4].isnan()
    assert q[16 + 3].isnan()
    s = 3.0 / 6.0
    assert (q[16 + 1].item(), q[16 + 2].item()) == (-6 * s, 6 * s)
    assert (q[16].item(), q[20].item()) == (3.0, 1.0)

    e4m3 = lp.ScaledFormat("fp4_e2m1", 16, scale="fp8_e4m3")
    q = lp.quantize(torch.tensor(zero_block), e4m3)
    assert (q[2].item(), q[3].item()) == (6 * 2.0**-9, -6 * 2.0**-9)
    # a scale that rounds to 0 in E4M3 (amax / 6 below 2^-10): every finite element is +-0
    tiny = torch.tensor([1e-4, -1e-4, 5e-5, inf] + [0.0] * 12)
    q = lp.quantize(tiny, e4m3)
    assert bits_equal(q[:3], torch.tensor([0.0, -0.0, 0.0]))
    assert q[3].item() == 6 * 2.0**-9

    # NVFP4: a zero block in a live tensor; Inf there saturates to 6 * (t * 2^-9)
    x = torch.tensor([zero_block, live_block])
    q = lp.quantize(x, "nvfp4")
    t = torch.tensor(3.0) / 2688.0
    assert q[0, 2].item() == (6.0 * (t * 2.0**-9)).item()
    assert bits_equal(q[0, :2], torch.tensor([0.0, -0.0]))
    assert q[0, 4].isnan()
    # an all-zero tensor stays zero, signs kept
    z = torch.tensor([0.0, -0.0] * 8)
    assert bits_equal(lp.quantize(z, "nvfp4"), z)


# ---- stochastic rounding -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_tensorwise"])
def test_stochastic_is_reproducible_and_unbiased(fmt):
    n = 1 << 16
    amax = 5.123
    x = torch.full((n,), 1.2345678)
    value = x[1].item()
    x[::16] = amax  # every block of 16 has the same amax: the same scale everywhere
    torch.manual_seed(7)
    a = lp.quantize(x, fmt, "stochastic")
    torch.manual_seed(7)
    b = lp.quantize(x, fmt, "stochastic")
    assert bits_equal(a, b)
    rest = torch.ones(n, dtype=torch.bool)
    rest[::16] = False
    down = lp.quantize(x, fmt, "down")[rest][0].item()
    up = lp.quantize(x, fmt, "up")[rest][0].item()
    assert down < value < up
    samples = a[rest].to(F64)
    assert set(samples.unique().tolist()) == {down, up}
    # mean over positions, and over seeds, within 5 standard errors of x
    sigma = (up - down) / 2
    assert abs(samples.mean().item() - value) < 5 * sigma / math.sqrt(samples.numel())
    means = []
    for seed in range(64):
        torch.manual_seed(seed)
        means.append(lp.quantize(x[:32], fmt, "stochastic")[rest[:32]].to(F64).mean().item())
    assert abs(sum(means) / len(means) - value) < 5 * sigma / math.sqrt(64 * 30)
    # and the exact probability: frac = (x - down) / (up - down) in reals
    frac = (value - down) / (up - down)
    p_up = (samples == up).to(F64).mean().item()
    assert abs(p_up - frac) < 5 * math.sqrt(frac * (1 - frac) / samples.numel())


def test_the_kernels_agree_with_the_reference():
    from lightning_lowp.reference import reference_quantize

    x = many_magnitudes(4)
    for fmt in FLOAT_SCALED:
        for rounding in lp.ROUNDING_MODES:
            torch.manual_seed(5)
            ours = lp.quantize(x, fmt, rounding)
            torch.manual_seed(5)
            ref = reference_quantize(x, fmt, rounding)
            assert bits_equal(ours, ref), (fmt, rounding)
