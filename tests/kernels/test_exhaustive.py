"""The float path is exact: every one of the 2^32 float32 bit patterns, rounded to nearest,
equals torch's own cast for the presets that torch has a dtype for.

The sweeps take 35-55 s per format on 2 cores: marker ``slow`` (``pytest -m "not slow"`` leaves them out)."""

import pytest
import torch

import lightning_lowp as lp

CASTS = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
CHUNK = 2**26


def mismatches(bits: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    x = bits.view(torch.float32)
    ours = lp.quantize(x, fmt).view(torch.int32)
    theirs = x.to(dtype).float().view(torch.int32)
    # NaN payloads may differ; everything else must agree bit for bit (signed zeros included).
    nan = torch.isnan(x)
    return (ours != theirs) & ~nan


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(CASTS))
def test_every_float32_matches_torch_cast(fmt):
    dtype = CASTS[fmt]
    for start in range(-(2**31), 2**31, CHUNK):
        bits = torch.arange(start, start + CHUNK, dtype=torch.int32)
        bad = mismatches(bits, fmt, dtype)
        if bad.any():
            first = bits[bad][:5].tolist()
            x = bits[bad][:5].view(torch.float32)
            raise AssertionError(
                f"{fmt}: {int(bad.sum())} of the bit patterns {start:#x}..+{CHUNK:#x} differ from torch's cast, "
                f"e.g. bits {[hex(b & 0xFFFFFFFF) for b in first]} = {x.tolist()}: ours "
                f"{lp.quantize(x, fmt).tolist()}, torch {x.to(dtype).float().tolist()}"
            )


def test_nan_stays_nan_for_every_payload():
    nans = torch.tensor([0x7F800001, 0x7FC00000, 0x7FFFFFFF, -1, -(2**22)], dtype=torch.int32).view(torch.float32)
    for fmt in CASTS:
        assert torch.isnan(lp.quantize(nans, fmt)).all(), fmt
