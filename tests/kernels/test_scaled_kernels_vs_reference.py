"""The compiled kernels against the float64 reference (lightning_lowp.reference), bit for bit,
on adversarial blocks, for every scaled preset and every rounding mode; blocks along the last
dim, along dim 0 (the column-block path of the CPU kernels), tiles with partial edges."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scaled_inputs import adversarial_cases

import lightning_lowp as lp
from lightning_lowp.formats import PRESETS, ROUNDING_MODES, ScaledFormat
from lightning_lowp.reference import reference_quantize

SCALED_PRESETS = [name for name, fmt in PRESETS.items() if isinstance(fmt, ScaledFormat)]
OTHERS = [
    ScaledFormat("fp6_e3m2", (3, 5), scale="fp32"),
    ScaledFormat("fp8_e4m3", (4, 32), scale_rounding="rceil"),
    ScaledFormat("fixed(8,6,symmetric=true)", (2, 16), scale_rounding="ceil"),
    ScaledFormat("fp4_e2m1", (2, 16), scale="fp8_e4m3", tensor_scale=True),
    ScaledFormat("float(3,4,subnormals=false)", 32, scale_rounding="even"),
    ScaledFormat("fixed(5,2)", 32, scale_rounding="ceil"),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: the same float32 bits, or both NaN."""
    a, b = a.float(), b.float()
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


def check(x: torch.Tensor, fmt: ScaledFormat, rounding: str) -> None:
    seed = 1234
    key = int(torch.ops.lowp.draw_key(torch.Generator().manual_seed(seed)))
    ours = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(seed))
    ref = reference_quantize(x, fmt, rounding, key=key)
    ok = same_bits(ours, ref)
    assert ok.all(), f"{fmt} {rounding} {tuple(x.shape)}: {int((~ok).sum())} differ, first at {(~ok).nonzero()[0]}"


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", [PRESETS[n] for n in SCALED_PRESETS] + OTHERS, ids=str)
def test_kernels_match_the_reference_on_adversarial_blocks(fmt, rounding):
    rng = np.random.default_rng(ROUNDING_MODES.index(rounding))
    for x in adversarial_cases(fmt, rng)[:6]:
        check(x, fmt, rounding)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4", "mxint8", "nvfp4", "fp8_blockwise_1x128"])
def test_blocks_along_dim_0_match_the_reference(name, rounding):
    """The adversarial blocks of the last dim, transposed: the blocks now run along dim 0."""
    fmt = PRESETS[name]
    along_0 = dataclasses.replace(fmt, dim=0)
    rng = np.random.default_rng(7 + ROUNDING_MODES.index(rounding))
    for x in adversarial_cases(fmt, rng)[:3]:
        check(x.t().contiguous(), along_0, rounding)
        check(x.t(), along_0, rounding)  # a non-contiguous view: the same values, counters of its layout


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "toward_zero"])
@pytest.mark.parametrize(
    ("block", "dim", "shape"),
    [
        (32, 0, (100, 70)),  # a partial last block down the columns
        (5, 1, (3, 13, 40)),  # runs along a middle dim
        ("row", 0, (65, 33)),
        ("row", 1, (2, 300, 3)),
        ((3, 5), -1, (2, 7, 11)),  # a batch of matrices, tiles with partial edges
        ((128, 128), -1, (300, 260)),
    ],
    ids=str,
)
@pytest.mark.parametrize("scale", ["e8m0", "fp32"])
def test_block_layouts_match_the_reference(block, dim, shape, scale, rounding):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 21, shape, generator=g).float())
    x.view(-1)[::97] = float("inf")
    x.view(-1)[5::101] = float("nan")
    check(x, ScaledFormat("fp8_e5m2", block, dim=dim, scale=scale), rounding)
    check(x.double(), ScaledFormat("fp8_e5m2", block, dim=dim, scale=scale), rounding)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "down"])
@pytest.mark.parametrize(
    ("element", "block", "shape", "huge_rows"),
    [
        ("fp8_e4m3", 32, (8, 320), [7]),  # 80 blocks: a batch of 64 normalised, then one that is not
        ("fp8_e4m3", 32, (8, 320), [0]),  # the other way round
        ("fixed(8,6,symmetric=true)", 16, (4, 640), [1, 3]),
        ("fp6_e2m3", 7, (40, 50), [30]),  # blocks of 7 and a short one per row; 2 batches
    ],
    ids=str,
)
def test_batches_of_short_blocks_match_the_reference(element, block, shape, huge_rows, rounding):
    """The CPU kernels round blocks along the last dim with E8M0 scales a batch of blocks at a
    time, normalised (x / 2^E rounded in the element's grid, times 2^E), where every block's
    2^E keeps that exact. In the fp8_e4m3 cases a block near float32's top under rceil scales
    (E + the element's largest exponent passes 127) sends its batch the long way, next to a
    normalised one; the others take blocks of 16 and of 7 (with a short one per row)."""
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 31, (shape[0], 1), generator=g).float())
    x[huge_rows, :3] = 3e38
    check(x, ScaledFormat(element, block, scale_rounding="rceil"), rounding)
    check(x[:, : shape[1] // 2], ScaledFormat(element, block, scale_rounding="floor"), rounding)


def test_a_tile_needs_two_dims():
    with pytest.raises(ValueError, match=r"block=\(128, 128\).*2 or more dims"):
        lp.quantize(torch.ones(5), "fp8_blockwise_128x128")
    with pytest.raises(ValueError, match="tile"):  # the operator checks it too
        torch.ops.lowp.quantize(torch.ones(5), *lp.ops.kernel_args(lp.parse_format("fp8_blockwise_128x128")), 0)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("element", ["fp4_e2m1", "fp8_e4m3", "fp6_e3m2", "fixed(8,6,symmetric=true)"])
def test_float_scales_near_every_grid_point_and_midpoint(element, rounding):
    """Blocks with float32 scales of random mantissas, holding s * g for every element value
    and midpoint g, and their float32 neighbours up to 2 ulps away: where float32(|x| / s)
    lands on a boundary of the element grid while the exact quotient does not."""
    fmt = ScaledFormat(element, 64, scale="fp32")
    grid = lp.quantize(torch.linspace(0, fmt.element_max, 4096), fmt.element).unique()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]).double()
    g = torch.Generator().manual_seed(3)
    blocks = []
    for _ in range(64):
        amax = float(torch.rand((), generator=g) + 0.5) * 2.0 ** int(torch.randint(-40, 40, (), generator=g))
        scale = np.float32(amax) / np.float32(fmt.element_max)
        values = (points * float(scale)).float()
        values = values[values <= amax]
        near = torch.stack([torch.nextafter(values, values * s) for s in (0.0, 2.0)] + [values])
        near = torch.cat([near.flatten(), torch.nextafter(near[0], torch.zeros(()))])
        near = near * torch.where(torch.rand(near.shape, generator=g) < 0.5, -1.0, 1.0)
        rows = torch.nn.functional.pad(near, (0, -near.numel() % 63)).reshape(-1, 63)
        blocks.append(torch.cat([torch.full((rows.shape[0], 1), amax), rows], dim=1).flatten())  # amax first
    check(torch.cat(blocks), fmt, rounding)


@pytest.mark.parametrize("rounding", ROUNDING_MODES)
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4", "mxint8"])
def test_tiny_elements_under_large_and_small_scales_match_the_reference(name, rounding):
    """Elements so small that x / 2^E underflows float32 where the block's scale is large (the
    kernels then stand in a tiny normal for the zero quotient, which directed modes round up),
    and the same elements under scales of at most 1 (where no quotient can underflow and the
    kernels skip that step); blocks along the last dim and along dim 0."""
    fmt = PRESETS[name]
    g = torch.Generator().manual_seed(ROUNDING_MODES.index(rounding))
    tiny = torch.randn(64, 32, generator=g) * torch.exp2(torch.randint(-149, -100, (64, 32), generator=g).float())
    for amax in (2.0**30, 2.0**-3):  # scale exponents above 0, then at most 0
        x = tiny.clone()
        x[:, 0] = torch.where(torch.arange(64) % 2 == 0, amax, -amax)
        check(x, fmt, rounding)
        check(x.t().contiguous(), dataclasses.replace(fmt, dim=0), rounding)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "up"])
@pytest.mark.parametrize(
    "fmt",
    [
        PRESETS["nvfp4"],
        PRESETS["mxfp8_e4m3"],
        PRESETS["mxint8"],
        ScaledFormat("fp4_e2m1", 16, scale="fp8_e4m3"),
        ScaledFormat("fp6_e2m3", 16, scale_rounding="rceil"),
        ScaledFormat("fp8_e5m2", 32, scale="fp32"),
    ],
    ids=str,
)
def test_maxima_of_many_short_blocks_skip_inf_and_nan(fmt, rounding):
    """On AVX-512, blocks of 16 along the last dim take their maxima sixteen blocks at a time
    (one vector of sixteen maxima), and a block holding Inf or NaN has its maximum taken again
    without them; blocks of 32 (MX) take the scalar code's loop. Blocks of many magnitudes,
    some with Inf, -Inf or NaN at their largest element, some only Inf/NaN, in groups of
    sixteen and in the remainder."""
    g = torch.Generator().manual_seed(fmt.block)
    rows, blocks_per_row = 6, 37  # 222 blocks: whole groups of 16 and a remainder in every batch
    x = torch.randn(rows * blocks_per_row, fmt.block, generator=g)
    spread = 6 if fmt.tensor_scale else 40  # (NVFP4's scales span 2^17 below the tensor's)
    x *= torch.exp2(torch.randint(-spread, spread + 1, (rows * blocks_per_row, 1), generator=g).float())
    picked = torch.randperm(rows * blocks_per_row, generator=g)[:40]
    largest = x.abs().argmax(dim=1)
    for n, b in enumerate(picked.tolist()):
        special = (math.inf, -math.inf, math.nan)[n % 3]
        if n % 5 == 4:  # nothing finite in the block
            x[b] = special
        else:  # in place of the block's largest magnitude, and somewhere else
            x[b, largest[b]] = special
            x[b, (largest[b] + 3) % fmt.block] = special
    x = x.reshape(rows, blocks_per_row * fmt.block)
    check(x, fmt, rounding)
    # a meaningful check: most values are finite and nonzero, and the scales follow the finite maxima
    q = lp.quantize(x, fmt, rounding)
    assert (q.isfinite() & (q != 0)).float().mean() > 0.5
