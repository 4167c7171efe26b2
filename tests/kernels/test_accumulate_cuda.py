"""The CUDA accumulation kernels give the CPU kernels' bits (which are the reference's): every
float accumulator path and rounding mode with and without promotion, the tensor-core model,
batched shapes, the backward, and the QuantizeMatmuls GEMMs. Skipped without a GPU; the CPU
half (building the inputs) runs everywhere."""

import pytest
import torch
from helpers import same_bits
from test_accumulate import ACCUMULATORS, KINDS, make_inputs

import lightning_lowp as lp
from lightning_lowp import ops

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.BUILT_WITH_CUDA), reason="needs a CUDA GPU and the CUDA build"
)


def test_inputs_build_on_the_cpu():
    for kind in KINDS:
        for fmt in ACCUMULATORS:
            a, b = make_inputs(kind, fmt)
            assert a.device.type == b.device.type == "cpu"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("mode", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", ACCUMULATORS)
def test_float_accumulators_cpu_and_gpu_agree(fmt, mode, chunk):
    for kind in KINDS:
        a, b = make_inputs(kind, fmt)
        on_cpu = lp.matmul(a, b, fmt, mode, chunk, generator=torch.Generator().manual_seed(5))
        on_gpu = lp.matmul(a.cuda(), b.cuda(), fmt, mode, chunk, generator=torch.Generator().manual_seed(5))
        assert on_gpu.device.type == "cuda"
        assert same_bits(on_cpu, on_gpu.cpu()), kind


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize(("group", "bits", "chunk"), [(1, 2, None), (4, 24, None), (5, 14, 10), (32, 14, None)])
def test_aligned_cpu_and_gpu_agree(group, bits, chunk, rounding):
    for kind in KINDS:
        a, b = make_inputs(kind, "float(8,23)")
        acc = lp.AlignedSum(group, bits)
        assert same_bits(
            lp.matmul(a, b, acc, rounding, chunk), lp.matmul(a.cuda(), b.cuda(), acc, rounding, chunk).cpu()
        )


@pytest.mark.cuda
@needs_gpu
def test_large_batched_backward_and_callback_gemms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 70, 300, generator=g)
    b = torch.randn(300, 90, generator=g)
    for acc in ("bf16", "fp16", "aligned(32,14)"):
        assert same_bits(lp.matmul(a, b, acc), lp.matmul(a.cuda(), b.cuda(), acc).cpu())
    x = a.clone().requires_grad_(True)
    xg = a.cuda().requires_grad_(True)
    lp.matmul(x, b, "bf16", chunk=32).sum().backward()
    lp.matmul(xg, b.cuda(), "bf16", chunk=32).sum().backward()
    assert same_bits(x.grad, xg.grad.cpu())
    settings = lp.MatmulSettings(input="fp8_e4m3", weight="fp8_e4m3", fprop_accumulate="bf16")
    w = torch.randn(20, 300, generator=g)
    y = lp.quantized_linear(a, w, None, settings)
    assert same_bits(y, lp.quantized_linear(a.cuda(), w.cuda(), None, settings).cpu())
