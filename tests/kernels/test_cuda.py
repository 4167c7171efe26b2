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
SCALED_FORMATS = [
    "mxfp8_e4m3",
    "mxfp4",
    "mxint8",
    "nvfp4",
    "fp8_tensorwise",
    "fp8_rowwise",
    "fp8_blockwise_1x128",
    "fp8_blockwise_128x128",
    "mx(fp6_e3m2,32,dim=0)",
    "mx(fp4_e2m1,16,dim=0,scale=fp8_e4m3,tensor_scale=true)",
    "mx(fp8_e5m2,3x5,scale_rounding=rceil)",
]
# LOWP_CUDA_BLOCKS: block and scaled formats whose blocks are runs along a dim take a fused
# kernel (block maxima and rounding in one pass) or the general path (maxima first); "auto"
# chooses by size. The bit-identity tests run both, whatever the size.
BLOCK_PATHS = ["general", "fused"]
# LOWP_CUDA_FOREACH: quantize_foreach_ of element-wise formats by a multi-tensor kernel, or a
# launch per tensor.
FOREACH_PATHS = ["loop", "multi"]
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


def scaled_case(fmt: str, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of many magnitudes with Inf and NaN among them, 300 x 260 (partial blocks and tiles)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 260, generator=g) * torch.exp2(torch.randint(-30, 31, (300, 260), generator=g).float())
    x.view(-1)[::997] = float("inf")
    x.view(-1)[3::1009] = float("nan")
    torch.manual_seed(1)
    return x, lp.quantize(x, fmt, rounding)


def unaligned_case() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A large tensor and the results of its views at element offsets 0, 1 and 3; the GPU test
    moves the whole tensor and slices it there, so that the views really are unaligned."""
    x = torch.randn(2**24 + 3)
    return x, [lp.quantize(x[offset:], "bf16") for offset in (0, 1, 3)]


def stream_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, what x becomes on the side stream before it is rounded, and that rounded."""
    x = torch.randn(1 << 20)
    later = torch.randn(1 << 20)
    return x, later, lp.quantize(later, "fp8_e4m3")


LAYOUTS = {  # views taken on the device the tensor is on: non-dense ones stay non-dense
    "transposed": lambda t: t.t(),
    "strided": lambda t: t[::2, 1::3],
    "0-d": lambda t: t[3, 5],
    "empty": lambda t: t[:0],
}


def non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill a block of memory without gaps or overlaps, in some order of
    its dims (then our results keep t's strides, as torch.empty_like does)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def layout_cases() -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """Non-dense, 0-d and empty inputs, element-wise and blocked: (format, layout, base, result)."""
    base = torch.randn(64, 48)
    return [
        (fmt, name, base, lp.quantize(view(base), fmt))
        for fmt in ("bf16", "bfp(6,dim=0)", "mxfp8_e4m3")
        for name, view in LAYOUTS.items()
    ]


def foreach_case() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    tensors = [torch.randn(33, 7), torch.randn(5), torch.randn(2, 3, 4)]
    torch.manual_seed(4)
    expected = [t.clone() for t in tensors]
    lp.quantize_foreach_(expected, "fp8_e5m2", "stochastic")
    return tensors, expected


def fused_cases() -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """Inputs large enough for the fused kernels under LOWP_CUDA_BLOCKS=auto: (format, rounding,
    input, CPU result). Whole runs along the last dim (no partial block), rows 2^40 apart in
    scale, and columns (blocks along dim 0) of a wide matrix."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(512, 4096, generator=g) * torch.exp2(torch.randint(-20, 21, (512, 1), generator=g).float())
    columns = torch.randn(64, 40000, generator=g)
    cases = [(fmt, rows) for fmt in ("mxfp8_e4m3", "nvfp4", "fp8_rowwise", "bfp(8,block_size=32)")]
    nvfp4_columns = "mx(fp4_e2m1,16,dim=0,scale=fp8_e4m3,tensor_scale=true)"
    cases += [(fmt, columns) for fmt in ("mx(fp8_e4m3,32,dim=0)", nvfp4_columns)]
    results = []
    for fmt, x in cases:
        for rounding in ("nearest", "stochastic"):
            torch.manual_seed(1)
            results.append((fmt, rounding, x, lp.quantize(x, fmt, rounding)))
    return results


FOREACH_VIEWS = {"transposed": lambda t: t.t(), "strided": lambda t: t[::2, 1::3]}  # dense; not dense


def foreach_many_case(fmt: str, rounding: str) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """quantize_foreach_ over more tensors and chunks than one multi-tensor launch holds: 100
    small tensors, one of 2^24 + 5 elements, an empty and a 0-d one, four dtypes, and two views
    of ``base`` (taken on the device: one dense, one not). Returns (tensors, base, CPU results
    of tensors + views, drawn with seed 5)."""
    g = torch.Generator().manual_seed(6)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    tensors = [(torch.randn(1 + 37 * i % 301, generator=g) * 8).to(dtypes[i % 4]) for i in range(100)]
    tensors += [torch.randn(2**24 + 5, generator=g), torch.randn(0), torch.randn((), generator=g)]
    base = torch.randn(64, 48, generator=g)
    everything = [t.clone() for t in tensors] + [view(base.clone()) for view in FOREACH_VIEWS.values()]
    torch.manual_seed(5)
    lp.quantize_foreach_(everything, fmt, rounding)
    return tensors, base, everything


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
    for fmt in SCALED_FORMATS:
        for rounding in lp.ROUNDING_MODES:
            x, expected = scaled_case(fmt, rounding)
            assert expected.shape == x.shape
    x, expected = unaligned_case()
    assert [e.numel() for e in expected] == [x.numel(), x.numel() - 1, x.numel() - 3]
    x, later, expected = stream_case()
    assert expected.shape == x.shape == later.shape
    for _, name, base, expected in layout_cases():
        assert expected.shape == LAYOUTS[name](base).shape
    dense = {name: non_overlapping_and_dense(view(torch.randn(64, 48))) for name, view in LAYOUTS.items()}
    assert dense == {"transposed": True, "strided": False, "0-d": True, "empty": True}
    assert not non_overlapping_and_dense(torch.randn(4, 1).expand(4, 3))
    x, expected = second_gpu_case()
    assert expected.shape == x.shape
    tensors, expected = foreach_case()
    assert [t.shape for t in tensors] == [e.shape for e in expected]
    for fmt, rounding, x, expected in fused_cases():
        assert expected.shape == x.shape, (fmt, rounding)
    tensors, base, expected = foreach_many_case("fp8_e5m2", "stochastic")
    assert len(expected) == len(tensors) + len(FOREACH_VIEWS) == 105
    assert not non_overlapping_and_dense(FOREACH_VIEWS["strided"](base))


# ---- on the GPU ----------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("block_path", BLOCK_PATHS)
@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_and_gpu_give_the_same_bits(fmt, rounding, block_path, monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_BLOCKS", block_path)
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
@pytest.mark.parametrize("block_path", BLOCK_PATHS)
@pytest.mark.parametrize("rounding", lp.ROUNDING_MODES)
@pytest.mark.parametrize("fmt", SCALED_FORMATS)
def test_scaled_formats_give_the_same_bits(fmt, rounding, block_path, monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_BLOCKS", block_path)
    x, on_cpu = scaled_case(fmt, rounding)
    torch.manual_seed(1)
    assert same_bits(on_cpu, lp.quantize(x.cuda(), fmt, rounding).cpu())


@pytest.mark.cuda
@needs_gpu
def test_large_block_tensors_take_the_fused_kernels_with_the_same_bits(monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_BLOCKS", "auto")
    for fmt, rounding, x, on_cpu in fused_cases():
        torch.manual_seed(1)
        assert same_bits(on_cpu, lp.quantize(x.cuda(), fmt, rounding).cpu()), (fmt, rounding)
        torch.manual_seed(1)
        in_place = x.cuda()
        lp.quantize_(in_place, fmt, rounding)
        assert same_bits(on_cpu, in_place.cpu()), (fmt, rounding, "in place")


@pytest.mark.cuda
@needs_gpu
def test_a_bad_lowp_cuda_blocks_is_refused(monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_BLOCKS", "fast")
    with pytest.raises(RuntimeError, match="LOWP_CUDA_BLOCKS must be auto, fused or general"):
        lp.quantize(torch.randn(64, 64, device="cuda"), "mxfp8_e4m3")


@pytest.mark.cuda
@needs_gpu
def test_large_and_unaligned_tensors():
    x, expected = unaligned_case()
    on_gpu = x.cuda()
    for offset, e in zip((0, 1, 3), expected, strict=True):
        view = on_gpu[offset:]  # sliced on the GPU: really unaligned
        assert view.data_ptr() % 16 == (offset * 4) % 16
        assert same_bits(e, lp.quantize(view, "bf16").cpu())


@pytest.mark.cuda
@needs_gpu
def test_runs_on_the_current_stream():
    """On a side stream, x is overwritten after a delay and then rounded: a kernel launched on
    any other stream would round the old x."""
    x, later, expected = stream_case()
    x, later = x.cuda(), later.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x and later are ready
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        x.copy_(later)
        y = lp.quantize(x, "fp8_e4m3")
    torch.cuda.current_stream().wait_stream(stream)
    assert same_bits(y.cpu(), expected)


@pytest.mark.cuda
@needs_gpu
def test_non_dense_zero_dim_and_empty_tensors():
    for fmt, name, base, expected in layout_cases():
        view = LAYOUTS[name](base.cuda())
        got = lp.quantize(view, fmt)
        assert got.shape == view.shape
        assert got.stride() == view.stride() or view.numel() <= 1 or not non_overlapping_and_dense(view)
        assert same_bits(got.cpu(), expected), (fmt, name)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("foreach_path", FOREACH_PATHS)
def test_quantize_foreach_on_the_gpu(foreach_path, monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_FOREACH", foreach_path)
    tensors, expected = foreach_case()
    on_gpu = [t.cuda() for t in tensors]
    torch.manual_seed(4)
    lp.quantize_foreach_(on_gpu, "fp8_e5m2", "stochastic")
    for g, e in zip(on_gpu, expected, strict=True):
        assert same_bits(g.cpu(), e)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("foreach_path", FOREACH_PATHS)
@pytest.mark.parametrize(("fmt", "rounding"), [("fp8_e5m2", "stochastic"), ("fixed(8,4)", "nearest")])
def test_quantize_foreach_of_many_tensors_on_the_gpu(fmt, rounding, foreach_path, monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_FOREACH", foreach_path)
    tensors, base, expected = foreach_many_case(fmt, rounding)
    on_gpu_base = base.cuda()
    on_gpu = [t.cuda() for t in tensors] + [view(on_gpu_base) for view in FOREACH_VIEWS.values()]
    torch.manual_seed(5)
    lp.quantize_foreach_(on_gpu, fmt, rounding)
    for i, (g, e) in enumerate(zip(on_gpu, expected, strict=True)):
        assert g.dtype == e.dtype, i
        assert same_bits(g.cpu(), e), i


@pytest.mark.cuda
@needs_gpu
def test_a_bad_lowp_cuda_foreach_is_refused(monkeypatch):
    monkeypatch.setenv("LOWP_CUDA_FOREACH", "fused")
    with pytest.raises(RuntimeError, match="LOWP_CUDA_FOREACH must be multi or loop"):
        lp.quantize_foreach_([torch.randn(8, device="cuda")], "bf16")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_of_half_types(dtype):
    x = (torch.randn(1000, 33) * 3).to(dtype)
    torch.manual_seed(6)
    on_cpu = lp.quantize(x, "fp8_e4m3", "stochastic")
    torch.manual_seed(6)
    assert same_bits(on_cpu, lp.quantize(x.cuda(), "fp8_e4m3", "stochastic").cpu())


@pytest.mark.cuda
@needs_gpu
def test_torch_compile_on_the_gpu():
    x = torch.randn(64, 32, device="cuda")
    compiled = torch.compile(lambda t: lp.quantize(t * 2, "mxfp8_e4m3") + 1, fullgraph=True)
    assert same_bits(compiled(x).cpu(), (lp.quantize(x.cpu() * 2, "mxfp8_e4m3") + 1))


@pytest.mark.cuda
@needs_gpu
def test_stochastic_rounding_is_refused_under_cuda_graph_capture():
    x = torch.randn(1024, device="cuda")
    lp.quantize(x, "bf16", "nearest")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="graph capture"), torch.cuda.graph(graph):
        lp.quantize(x, "bf16", "stochastic")
    graph = torch.cuda.CUDAGraph()  # (an instance captures once, even a capture that failed)
    with torch.cuda.graph(graph):  # a deterministic mode captures and replays
        y = lp.quantize(x, "bf16", "nearest")
    graph.replay()
    assert same_bits(y.cpu(), lp.quantize(x.cpu(), "bf16"))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    x, expected = second_gpu_case()
    y = lp.quantize(x.to("cuda:1"), "bfp(8,dim=0)", "nearest")
    assert y.device == torch.device("cuda:1")
    assert same_bits(y.cpu(), expected)
