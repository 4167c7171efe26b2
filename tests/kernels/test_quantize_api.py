"""The functional, in-place and autograd API: layout preservation, dtypes, errors, compile."""

import math

import pytest
import torch

import lightning_lowp as lp

INF = math.inf


def bits(t: torch.Tensor) -> list:
    return t.float().view(torch.int32).tolist()


# Known answers, worked out by hand from the definitions in DESIGN.md.
@pytest.mark.parametrize(
    ("fmt", "rounding", "x", "expected"),
    [
        (
            "fixed(8,7)",
            "nearest",
            [0.5, 2.0, -2.0, 1.0, -1.0, 0.00390625],
            [0.5, 127 / 128, -1.0, 127 / 128, -1.0, 0.0],
        ),
        ("fixed(8,7,symmetric=true)", "nearest", [-5.0], [-127 / 128]),
        ("fixed(8,7,clamp=false)", "nearest", [5.0078125, 300.0], [5.0078125, 300.0]),
        ("fixed(4,0)", "nearest", [0.5, 1.5, 2.5, -2.5, INF, -INF], [0.0, 2.0, 2.0, -2.0, 7.0, -8.0]),
        ("fixed(4,0)", "nearest_away", [0.5, 1.5, 2.5, -2.5], [1.0, 2.0, 3.0, -3.0]),
        ("fixed(4,0)", "toward_zero", [1.9, -1.9], [1.0, -1.0]),
        ("fixed(4,0)", "down", [1.9, -1.1], [1.0, -2.0]),
        ("fixed(4,0)", "up", [1.1, -1.9], [2.0, -1.0]),
        ("fixed(4,-2)", "nearest", [5.9, 6.0, 100.0], [4.0, 8.0, 28.0]),
        ("fp16", "nearest", [65504.0, 65519.0, 65520.0, 1e-8], [65504.0, 65504.0, INF, 0.0]),
        ("fp16", "toward_zero", [1e6, -1e6, INF], [65504.0, -65504.0, INF]),
        ("fp16", "down", [1e6, -1e6], [65504.0, -INF]),
        ("fp16", "up", [1e6, -1e6], [INF, -65504.0]),
        ("float(5,10,overflow=saturate)", "nearest", [1e6, -INF], [65504.0, -65504.0]),
        ("fp8_e4m3", "nearest", [448.0, 464.0, 1e9, -INF, 0.0009765625], [448.0, 448.0, 448.0, -448.0, 0.0]),
        ("fp8_e4m3", "nearest", [2.0**-9, 3 * 2.0**-10, 2.0**-10], [2.0**-9, 2.0**-8, 0.0]),
        ("fp4_e2m1", "nearest", [0.25, 0.75, 2.5, 5.0, 7.0], [0.0, 1.0, 2.0, 4.0, 6.0]),
        ("float(8,7,subnormals=false)", "nearest", [2.0**-127, 2.0**-126 * 0.75], [0.0, 2.0**-126]),
        ("bfp(4)", "nearest", [4.0, 1.3, 0.5, -7.9, INF], [4.0, 1.0, 0.0, -7.0, 7.0]),
        ("bfp(1)", "nearest", [4.0, 1.3, -3.0], [0.0, 0.0, -0.0]),
        ("bfp(3)", "nearest", [0.0, 0.0, -0.0], [0.0, 0.0, -0.0]),
    ],
)
def test_known_answers(fmt, rounding, x, expected):
    got = lp.quantize(torch.tensor(x), fmt, rounding)
    assert bits(got) == bits(torch.tensor(expected)), got.tolist()


def test_block_dims_and_block_sizes():
    x = torch.tensor([[8.0, 1.3], [0.5, 0.3]])
    # wl=3: step 2^(E-1); whole tensor E=3 -> step 4
    assert lp.quantize(x, "bfp(3)").tolist() == [[8.0, 0.0], [0.0, 0.0]]
    # one exponent per row (dim 0): E=3 then E=-1 -> steps 4 and 0.25
    assert lp.quantize(x, "bfp(3,dim=0)").tolist() == [[8.0, 0.0], [0.5, 0.25]]
    # one exponent per column (dim 1): E=3, E=0 -> steps 4 and 0.5
    assert lp.quantize(x, "bfp(3,dim=1)").tolist() == [[8.0, 1.5], [0.0, 0.5]]
    # runs of 1 along the last dim: every element its own block, 3 bits keep 1.x with 1 fraction bit
    assert lp.quantize(x, "bfp(3,block_size=1)").tolist() == [[8.0, 1.5], [0.5, 0.25]]
    # runs of 2 down dim 0 (moved last internally)
    assert lp.quantize(x, "bfp(3,dim=0,block_size=2)").tolist() == lp.quantize(x, "bfp(3,dim=1)").tolist()
    # a run that does not divide the dim: blocks [0:2], [2:3]
    y = torch.tensor([4.0, 0.3, 0.3])
    assert lp.quantize(y, "bfp(3,block_size=2)").tolist() == [4.0, 0.0, 0.25]


@pytest.mark.parametrize("fmt", ["fixed(8,4)", "bf16", "fp8_e4m3", "bfp(6)", "bfp(6,dim=1)", "bfp(6,block_size=3)"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_layout_is_preserved_and_values_match_contiguous(fmt, layout):
    make = {
        "transposed": lambda t: t.transpose(1, 3),
        "sliced": lambda t: t[:, :, ::2],
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    }[layout]
    base = torch.randn(2, 3, 5, 7)
    x = make(base)
    out = lp.quantize(x, fmt)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    if layout != "sliced":  # dense layouts are kept as they are
        assert out.stride() == x.stride()
    assert torch.equal(out, lp.quantize(x.contiguous(), fmt))
    storage = base.clone()
    inplace = make(storage)
    assert lp.quantize_(inplace, fmt) is inplace
    assert inplace.stride() == x.stride()
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_quantized_via_float32(dtype):
    x = (torch.randn(1000) * 10).to(dtype)
    out = lp.quantize(x, "fixed(8,3)", "nearest")
    assert out.dtype == dtype
    assert torch.equal(out, lp.quantize(x.float(), "fixed(8,3)").to(dtype))


def test_empty_and_zero_dim_tensors():
    assert lp.quantize(torch.empty(0, 3), "bfp(8,dim=1)").shape == (0, 3)
    assert lp.quantize(torch.tensor(3.3), "fixed(8,2)").item() == 3.25
    assert lp.quantize(torch.tensor(3.3), "bfp(3)").item() == 3.0


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="floating-point"):
        lp.quantize(torch.arange(4), "bf16")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        lp.quantize([1.0], "bf16")
    with pytest.raises(ValueError, match=r"rounding.*nearest, nearest_away, toward_zero, down, up, stochastic"):
        lp.quantize(torch.ones(2), "bf16", rounding="banker")
    with pytest.raises(ValueError, match="dim=2"):
        lp.quantize(torch.ones(2, 2), "bfp(8,dim=2)")
    with pytest.raises(ValueError, match="does not parse"):
        lp.quantize(torch.ones(2), "fp7")
    with pytest.raises(TypeError, match="generator"):
        lp.quantize(torch.ones(2), "bf16", "stochastic", generator=3)
    with pytest.raises(ValueError, match="forward_rounding"):
        lp.quantizer("bf16", forward_rounding="round")


def test_more_than_2_to_the_31_elements():
    n = 2**31 + 3
    x = torch.full((n,), 0.3, dtype=torch.float16)
    lp.quantize_(x, "fixed(4,2)")
    assert x[:4].tolist() == [0.25] * 4
    assert x[-4:].tolist() == [0.25] * 4
    x[-1] = 600.0
    lp.quantize_(x, "bfp(3)")  # the block max sits past index 2^31: E=9, step 256
    assert x[0].item() == 0.0
    assert x[-1].item() == 512.0


def test_quantizer_quantizes_value_forward_and_gradient_backward():
    x = torch.randn(100, requires_grad=True)
    grad = torch.randn(100)
    q = lp.quantizer(forward="fixed(8,2)", backward="fixed(8,1)")
    y = q(x)
    assert torch.equal(y, lp.quantize(x.detach(), "fixed(8,2)"))
    y.backward(grad)
    assert torch.equal(x.grad, lp.quantize(grad, "fixed(8,1)"))


def test_quantizer_none_is_identity_in_that_direction():
    x = torch.randn(50, requires_grad=True)
    grad = torch.randn(50)
    module = lp.Quantizer(forward=None, backward="bf16")
    y = module(x)
    assert torch.equal(y, x.detach())
    y.backward(grad)
    assert torch.equal(x.grad, grad.to(torch.bfloat16).float())
    assert "bf16" in repr(module)


def test_torch_compile_traces_without_graph_breaks():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), lp.Quantizer("fixed(8,4)", "bf16"), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )

    def step(x):
        y = model(x)
        return lp.quantize(y, "fp8_e4m3", "stochastic")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8)
    torch.manual_seed(7)
    expected = step(x)
    torch.manual_seed(7)
    got = compiled(x)
    assert torch.equal(got, expected)
    got.sum().backward()  # gradients flow through the compiled graph

    def inplace(x):
        x = x * 2
        lp.quantize_(x, "bfp(4,dim=0)")
        return x + 1

    y = torch.randn(4, 6)
    assert torch.equal(torch.compile(inplace, fullgraph=True, backend="aot_eager")(y), inplace(y))


def test_large_blocks_take_the_two_pass_path_and_match_the_reference():
    from lightning_lowp.reference import reference_quantize

    # runs of 40000 > one CPU task's 32768 elements: maxima first, then rounding
    x = torch.randn(3, 100_000) * torch.logspace(-3, 3, 100_000)
    for rounding in ("nearest", "up"):
        got = lp.quantize(x, "bfp(6,block_size=40000)", rounding)
        assert torch.equal(got, reference_quantize(x, "bfp(6,block_size=40000)", rounding))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "up"])
@pytest.mark.parametrize("fmt", ["fixed(8,4)", "fp8_e4m3", "bfp(6)", "bfp(5,dim=0,block_size=3)"])
def test_quantize_foreach_matches_quantize_on_each_tensor_in_turn(fmt, rounding):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(7, 9, generator=g) * 3, torch.randn(33, 4, generator=g), torch.randn(3, 1, generator=g)]
    tensors.append(torch.randn(8, 6, generator=g).t())  # non-contiguous
    expected = [t.clone() for t in tensors]
    loop = torch.Generator().manual_seed(11)
    for t in expected:
        lp.quantize_(t, fmt, rounding, loop)
    in_place = [t.clone() for t in tensors]
    lp.quantize_foreach_(in_place, fmt, rounding, torch.Generator().manual_seed(11))
    out = [torch.full_like(t, math.nan) for t in tensors]
    lp.quantize_foreach_(out, fmt, rounding, torch.Generator().manual_seed(11), sources=tensors)
    for e, a, o in zip(expected, in_place, out, strict=False):
        assert torch.equal(a, e)
        assert torch.equal(o, e)
    assert not torch.equal(in_place[0], tensors[0])  # something was rounded


def test_quantize_foreach_errors_name_the_argument():
    a, b = torch.randn(3), torch.randn(4)
    lp.quantize_foreach_([], "bf16")  # nothing to do
    with pytest.raises(ValueError, match="sources must have one tensor per tensor"):
        lp.quantize_foreach_([a], "bf16", sources=[a, b])
    with pytest.raises(ValueError, match=r"sources\[1\] must match tensors\[1\] in shape"):
        lp.quantize_foreach_([a, b], "bf16", sources=[a, a])
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a floating-point tensor"):
        lp.quantize_foreach_([a, torch.arange(3)], "bf16")
    with pytest.raises(ValueError, match="dim=1 of bfp"):
        lp.quantize_foreach_([torch.randn(2, 2), a], "bfp(8,dim=1)")
    with pytest.raises(ValueError, match="rounding"):
        lp.quantize_foreach_([a], "bf16", "sideways")


# ---- in-place ops under autograd, as torch's own ------------------------------------------


def test_in_place_quantization_of_a_saved_tensor_makes_backward_refuse():
    """The issue's repro: y is saved by y ** 2, then rounded in place; torch's y.mul_ here
    makes backward raise, and so must we (the version counter is bumped)."""
    w = torch.tensor([0.3, 0.6], requires_grad=True)
    y = w * 1.0
    z = (y**2).sum()
    lp.quantize_(y, "fixed(4,1)")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    # without grad mode (how the plugin rounds parameters), the same through the operators
    for write in (
        lambda t: torch.ops.lowp.quantize_(t, *lp.ops.kernel_args(lp.FixedPoint(4, 1)), 0),
        lambda t: lp.quantize_foreach_([t], "fixed(4,1)"),
    ):
        y = w * 1.0
        z = (y**2).sum()
        with torch.no_grad():
            write(y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.backward()


def test_the_operators_refuse_tensors_that_require_grad_under_grad_mode():
    y = torch.tensor([0.3, 0.6], requires_grad=True) * 1.0
    with pytest.raises(RuntimeError, match=r"no derivative.*lightning_lowp\.quantize_"):
        torch.ops.lowp.quantize_(y, *lp.ops.kernel_args(lp.FixedPoint(4, 1)), 0)
    with pytest.raises(RuntimeError, match="no derivative"):
        lp.quantize_foreach_([y], "fixed(4,1)")
    assert y._version == 0


def test_in_place_quantization_is_straight_through_and_refuses_leaves():
    w = torch.tensor([0.3, 0.6], requires_grad=True)
    y = w * 2.0
    lp.quantize_(y, "fixed(4,1)")
    assert y.tolist() == [0.5, 1.0]
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert w.grad.tolist() == [6.0, 10.0]  # d(3 q(2w) + 5 q(2w))/dw with dq/dx = 1
    leaf = torch.tensor([0.3], requires_grad=True)
    for call in (lambda: lp.quantize_(leaf, "bf16"), lambda: lp.quantize_foreach_([leaf], "bf16")):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            call()
    with torch.no_grad():  # as torch's own: allowed without grad mode
        lp.quantize_(leaf, "fixed(4,1)")
    assert leaf.item() == 0.5


def test_in_place_quantization_of_an_inference_tensor_needs_inference_mode():
    with torch.inference_mode():
        t = torch.tensor([0.3, 0.6])
    for call in (lambda: lp.quantize_(t, "fixed(4,1)"), lambda: lp.quantize_foreach_([t], "fixed(4,1)")):
        with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
            call()
    with torch.inference_mode():
        lp.quantize_(t, "fixed(4,1)")
    assert t.tolist() == [0.5, 0.5]


# ---- quantize_foreach_: devices and overlapping memory ---------------------------------------


def test_quantize_foreach_refuses_tensors_on_several_devices():
    cpu, meta = torch.full((3,), 0.3), torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        lp.quantize_foreach_([cpu, meta], "fixed(4,1)")
    with pytest.raises(ValueError, match="one device"):  # the operator checks it too
        torch.ops.lowp.quantize_foreach_([cpu, meta], [cpu, meta], *lp.ops.kernel_args(lp.FixedPoint(4, 1)), 0)
    assert cpu.tolist() == [0.30000001192092896] * 3  # left as it was


def test_quantize_foreach_refuses_overlapping_memory():
    base = torch.arange(8.0) / 7
    kept = base.clone()
    overlapping = [
        ([base[1:5]], [base[0:4]]),  # a tensor and its source overlap, shifted
        ([base[0:4], base[2:6]], [base[0:4].clone(), base[2:6].clone()]),  # two outputs overlap
        ([base[0:4], torch.zeros(4)], [base[0:4], base[2:6]]),  # one output is another's source
        ([base.view(2, 4).t()], [base.view(4, 2)]),  # the same memory in another order
    ]
    for tensors, sources in overlapping:
        with pytest.raises(ValueError, match="share memory"):
            lp.quantize_foreach_(tensors, "fixed(4,1)", sources=sources)
    assert torch.equal(base, kept)  # refused before anything was written
    # allowed: in place (the same view), sources that overlap only each other, disjoint halves
    lp.quantize_foreach_([base[0:4], base[4:8]], "fixed(4,1)", sources=[base[0:4], base[4:8]])
    out = torch.empty(2, 4)
    lp.quantize_foreach_([out[0], out[1]], "fixed(4,1)", sources=[base[0:4], base[1:5]])
    assert torch.equal(out[0], lp.quantize(kept[0:4], "fixed(4,1)"))
    assert torch.equal(base[0:4], lp.quantize(kept[0:4], "fixed(4,1)"))
