"""CUDA kernels: the same bits as the CPU kernels for every format and rounding mode.

The GPU tests (marker ``cuda``) are skipped without a GPU (or when the extension was built without
nvcc). Their inputs and CPU results are built by the ``*_case`` functions below, which
``test_the_gpu_tests_inputs_build_on_the_cpu`` runs everywhere: a broken harness fails on a
machine without a GPU too, not first on the one that has it.
"""

import pytest
import torch
from helpers import same_bits

import lightning_lowp as lp
from lightning_lowp import ops

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.BUILT_WITH_CUDA), reason="needs a CUDA GPU and the CUDA build"
)

FORMATS = [
    "fixed(8,7)",
    "fixed(4,-2,symmetric=true)",
    "fixed(12,6,clamp=false)",
    "bf16",
    "fp16",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp4_e2m1",
    "float(3,4,subnormals=false)",
    "float(5,2,overflow=saturate)",
    "bfp(8)",
    "bfp(1)",
    "bfp(6,dim=0)",
    "bfp(6,dim=1)",
    "bfp(5,block_size=32)",
    "bfp(5,dim=0,block_size=7)",
]
DTYPES = [torch.float16, torch.bfloat16, torch.float64]
DTYPE_FORMATS = ["fixed(8,4)", "fp8_e4m3", "bfp(6,dim=0)"]
ROW = 61  # adversarial() rows: 61 values, of which a strided view keeps 60


def adversarial(n: int) -> torch.Tensor:
    """Random float32 bit patterns, Gaussian values and the special values, mixed.

    About 2n values, trimmed to whole rows of ``ROW`` and returned as a strided (non-contiguous)
    view of the first ``ROW - 1`` columns: odd shapes, and not the memory layout of a fresh tensor.
    """
    bits = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    normal = torch.randn(n) * torch.logspace(-20, 20, n)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 65504.0, 2.0**-149])
    x = torch.cat([bits, normal, special.repeat(n // 64 + 1)])
    x = x[torch.randperm(x.numel())]
    return x[: x.numel() // ROW * ROW].reshape(-1, ROW)[:, : ROW - 1]


# ---- the GPU tests' inputs and CPU results (built on the CPU) ------------------------------


def bits_case(fmt: str, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adversarial input and its CPU result, drawn with seed 1 (the GPU draws with seed 1 too)."""
    torch.manual_seed(0)
    x = adversarial(20000)
    torch.manual_seed(1)
    return x, lp.quantize(x, fmt, rounding)


def dtype_case(fmt: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.randn(333, 77) * 4).to(dtype)
    return x, lp.quantize(x, fmt, "nearest")


def unaligned_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of a large tensor at element offsets 0, 1 and 3: vector loads only where aligned."""
    x = torch.randn(2**24 + 3)
    return [(x[offset:], lp.quantize(x[offset:], "bf16")) for offset in (0, 1, 3)]


def stream_case() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1 << 20)
    return x, lp.quantize(x, "fp8_e4m3")


def second_gpu_case() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4096, 64)
    return x, lp.quantize(x, "bfp(8,dim=0)")


@pytest.mark.parametrize("n", [1, 60, 61, 64, 1000, 20000])
def test_adversarial_has_whole_rows_for_any_size(n):
    x = adversarial(n)
    assert x.shape == (x.numel() // (ROW - 1), ROW - 1)
    assert x.numel() == 0 or not x.is_contiguous()
    assert x.shape[0] == (2 * n + 8 * (n // 64 + 1)) // ROW


def test_the_gpu_tests_inputs_build_on_the_cpu():
    """Everything the GPU tests do before their first ``.cuda()``, for all their parameters."""
    x, _ = bits_case(FORMATS[0], "nearest")
    assert x.shape == (696, 60)  # 42504 values: 696 rows of 61, and 48 left over
    assert torch.isnan(x).any()
    assert torch.isinf(x).any()
    for fmt in FORMATS:
        for rounding in lp.ROUNDING_MODES:
            x, on_cpu = bits_case(fmt, rounding)
            assert on_cpu.shape == x.shape, (fmt, rounding)
            assert same_bits(bits_case(fmt, rounding)[1], on_cpu), (fmt, rounding)  # the same seeds, the same bits
    for fmt in DTYPE_FORMATS:
        for dtype in DTYPES:
            x, expected = dtype_case(fmt, dtype)
            assert expected.dtype == x.dtype == dtype
    for view, expected in unaligned_cases():
        assert expected.shape == view.shape
    for x, expected in (stream_case(), second_gpu_case()):
        assert expected.shape == x.shape


# ---- on the GPU ----------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_and_gpu_give_the_same_bits(fmt, rounding):
    x, on_cpu = bits_case(fmt, rounding)
    torch.manual_seed(1)
    on_gpu = lp.quantize(x.cuda(), fmt, rounding)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.shape == x.shape
    assert same_bits(on_cpu, on_gpu.cpu())


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", DTYPE_FORMATS)
def test_other_dtypes_and_in_place(fmt, dtype):
    x, expected = dtype_case(fmt, dtype)
    y = x.cuda()
    assert same_bits(lp.quantize_(y, fmt), expected.cuda())
    assert y.dtype == dtype


@pytest.mark.cuda
@needs_gpu
def test_large_and_unaligned_tensors():
    for view, expected in unaligned_cases():  # vector loads only where aligned; the rest must still be right
        assert same_bits(expected, lp.quantize(view.cuda(), "bf16").cpu())


@pytest.mark.cuda
@needs_gpu
def test_runs_on_the_current_stream():
    x, expected = stream_case()
    x = x.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = lp.quantize(x, "fp8_e4m3")
    stream.synchronize()
    assert same_bits(y.cpu(), expected)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    x, expected = second_gpu_case()
    y = lp.quantize(x.to("cuda:1"), "bfp(8,dim=0)", "nearest")
    assert y.device == torch.device("cuda:1")
    assert same_bits(y.cpu(), expected)
