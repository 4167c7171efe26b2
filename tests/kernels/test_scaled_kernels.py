"""The compiled kernels on scaled formats with power-of-two (E8M0) scales: bit for bit with
torchao's MX implementation, and the block semantics of the contract."""

import pytest
import torch

import lightning_lowp as lp
from lightning_lowp.formats import SCALE_ROUNDINGS

torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2  # noqa: E402

TORCHAO_ELEMENTS = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp6_e2m3": DTYPE_FP6_E2M3,
    "fp6_e3m2": DTYPE_FP6_E3M2,
    "fp4_e2m1": torch.float4_e2m1fn_x2,
}


def blocks_of_many_magnitudes(rows: int, blocks: int, seed: int = 0) -> torch.Tensor:
    """Gaussian blocks of 32, each scaled by its own power of two in 2^-60..2^60."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks, 32, generator=g)
    x = x * torch.exp2(torch.randint(-60, 61, (rows, blocks, 1), generator=g).float())
    return x.reshape(rows, blocks * 32)


def edge_blocks() -> torch.Tensor:
    """Blocks whose amax is a power of two, just below one, 957 (microxcaling issue 4), ties."""
    rows = [
        torch.full((32,), 0.5).index_fill(0, torch.tensor([0]), 4.0),
        torch.linspace(-1, 1, 32) * (2.0 - 2.0**-23),
        torch.linspace(-1, 1, 32).index_fill(0, torch.tensor([5]), 957.0),
        torch.arange(32.0) * 0.0625 + 0.03125,
        torch.zeros(32),
    ]
    return torch.stack(rows)


def torchao_dequantized(x: torch.Tensor, element: str, mode: str) -> torch.Tensor:
    dtype = TORCHAO_ELEMENTS[element]
    scale, data = torchao_mx.to_mx(x, dtype, 32, ScaleCalculationMode(mode))
    return torchao_mx.to_dtype(data, scale, dtype, 32, torch.float32)


@pytest.mark.parametrize("mode", SCALE_ROUNDINGS)
@pytest.mark.parametrize("element", list(TORCHAO_ELEMENTS))
def test_mx_matches_torchao_bit_for_bit(element, mode):
    x = torch.cat([blocks_of_many_magnitudes(32, 8).reshape(-1, 32), edge_blocks()])
    ours = lp.quantize(x, lp.ScaledFormat(element, 32, scale_rounding=mode))
    theirs = torchao_dequantized(x, element, mode)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_floor_clips_957_and_the_other_modes_do_not():
    x = torch.zeros(32).index_fill(0, torch.tensor([0]), 957.0)
    got = {mode: lp.quantize(x, lp.ScaledFormat("fp8_e4m3", scale_rounding=mode))[0].item() for mode in SCALE_ROUNDINGS}
    # even rounds 957 = 1.869 * 2^9 to 1.875 * 2^9 first, which keeps floor's scale 2^(9 - 8)
    assert got == {"floor": 896.0, "ceil": 960.0, "even": 896.0, "rceil": 960.0}


@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
def test_blocks_along_dim_0_are_blocks_along_the_last_dim_of_the_transpose(rounding):
    x = blocks_of_many_magnitudes(4, 2, seed=1).t().contiguous()  # (64, 4): blocks of 32 along dim 0
    fmt0 = lp.ScaledFormat("fp6_e3m2", 32, dim=0)
    torch.manual_seed(3)
    along_0 = lp.quantize(x, fmt0, rounding)
    torch.manual_seed(3)
    along_last = lp.quantize(x.t().contiguous(), lp.ScaledFormat("fp6_e3m2", 32), rounding).t()
    assert torch.equal(along_0, along_last)  # counters included: they count as if dim 0 were moved last


def test_row_and_tensor_blocks():
    x = blocks_of_many_magnitudes(3, 4, seed=2)  # (3, 128)
    row = lp.quantize(x, lp.ScaledFormat("fp8_e4m3", "row"))
    assert torch.equal(row, lp.quantize(x, lp.ScaledFormat("fp8_e4m3", 128)))
    whole = lp.quantize(x, lp.ScaledFormat("fp8_e4m3", "tensor"))
    assert torch.equal(whole, lp.quantize(x.flatten(), lp.ScaledFormat("fp8_e4m3", x.numel())).reshape(x.shape))
    rows_of_dim_0 = lp.quantize(x, lp.ScaledFormat("fp8_e4m3", "row", dim=0))
    assert torch.equal(rows_of_dim_0, lp.quantize(x.t().contiguous(), lp.ScaledFormat("fp8_e4m3", 3)).t())


def test_partial_last_block_is_a_block_of_its_own():
    x = torch.cat([torch.full((32,), 1000.0), torch.full((5,), 0.01)])
    q = lp.quantize(x, "mxfp8_e4m3")
    assert torch.equal(q[32:], lp.quantize(x[32:], "mxfp8_e4m3"))
    assert q[32:].ne(0).all()  # not flushed by the first block's scale


def test_scale_comes_from_the_finite_maximum():
    finite = torch.linspace(-3, 3, 32)
    x = finite.clone()
    x[3], x[7], x[9] = float("nan"), float("inf"), -float("inf")
    q = lp.quantize(x, "mxfp4")
    rest = torch.ones(32, dtype=torch.bool)
    rest[[3, 7, 9]] = False
    assert torch.equal(q[rest], lp.quantize(torch.where(rest, x, 0.0), "mxfp4")[rest])
    assert q[3].isnan()
    # +-Inf saturate to +-(largest element) * scale: amax 3 gives scale 2^(1 - 2), 6 * 0.5 = 3
    assert (q[7].item(), q[9].item()) == (3.0, -3.0)


def test_all_zero_block_stays_zero_and_keeps_signs():
    x = torch.tensor([0.0, -0.0] * 16)
    q = lp.quantize(x, "mxint8")
    assert torch.equal(q.view(torch.int32), x.view(torch.int32))


def test_mxint8_elements_are_multiples_of_the_scale_over_64():
    x = blocks_of_many_magnitudes(2, 2, seed=4)
    q = lp.quantize(x, "mxint8").reshape(-1, 32)
    amax = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)))  # floor, element emax 0
    k = q / scale * 64
    assert torch.equal(k, k.round())
    assert k.abs().max() <= 127


@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
def test_elements_land_on_the_neighbours_of_the_exact_quotient(rounding):
    x = blocks_of_many_magnitudes(8, 4, seed=5)
    fmt = lp.ScaledFormat("fp8_e4m3", scale_rounding="ceil")  # no element beyond the largest: no clipping
    q = lp.quantize(x, fmt, rounding)
    down = lp.quantize(x, fmt, "down")
    up = lp.quantize(x, fmt, "up")
    assert torch.all((q == down) | (q == up))
    assert torch.all(down <= x)
    assert torch.all(x <= up)
