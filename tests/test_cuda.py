"""CUDA kernels: the same bits as the CPU kernels for every format and rounding mode.

Skipped without a GPU (or when the extension was built without nvcc)."""

import pytest
import torch

import lightning_lowp as lp
from lightning_lowp import ops

pytestmark = pytest.mark.skipif(
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


def adversarial(n: int) -> torch.Tensor:
    """Random float32 bit patterns, Gaussian values and the special values, mixed."""
    bits = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    normal = torch.randn(n) * torch.logspace(-20, 20, n)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 65504.0, 2.0**-149])
    x = torch.cat([bits, normal, special.repeat(n // 64 + 1)])
    return x[torch.randperm(x.numel())].reshape(-1, 61)[:, :60]  # odd shapes, a strided view


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float().contiguous(), b.float().contiguous()
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_and_gpu_give_the_same_bits(fmt, rounding):
    torch.manual_seed(0)
    x = adversarial(20000)
    torch.manual_seed(1)
    on_cpu = lp.quantize(x, fmt, rounding)
    torch.manual_seed(1)
    on_gpu = lp.quantize(x.cuda(), fmt, rounding)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.shape == x.shape
    assert same_bits(on_cpu, on_gpu.cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fmt", ["fixed(8,4)", "fp8_e4m3", "bfp(6,dim=0)"])
def test_other_dtypes_and_in_place(fmt, dtype):
    x = (torch.randn(333, 77) * 4).to(dtype)
    expected = lp.quantize(x, fmt, "nearest")
    y = x.cuda()
    assert same_bits(lp.quantize_(y, fmt), expected.cuda())
    assert y.dtype == dtype


def test_large_and_unaligned_tensors():
    x = torch.randn(2**24 + 3)
    for offset in (0, 1, 3):  # vector loads only where aligned; the rest must still be right
        view = x[offset:]
        assert same_bits(lp.quantize(view, "bf16").cpu(), lp.quantize(view.cuda(), "bf16").cpu())


def test_runs_on_the_current_stream():
    x = torch.randn(1 << 20, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = lp.quantize(x, "fp8_e4m3")
    stream.synchronize()
    assert same_bits(y.cpu(), lp.quantize(x.cpu(), "fp8_e4m3"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    x = torch.randn(4096, 64)
    y = lp.quantize(x.to("cuda:1"), "bfp(8,dim=0)", "nearest")
    assert y.device == torch.device("cuda:1")
    assert same_bits(y.cpu(), lp.quantize(x, "bfp(8,dim=0)"))
