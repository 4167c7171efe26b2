"""lp.quantized_linear against torchao's emulated MX training linear, bit for bit, on the CPU.

What torchao 0.18 does (``torchao/prototype/moe_training/mxfp8_linear.py``; MX training moved
there from ``mx_formats``, which keeps ``MXTensor``, ``to_mx`` and the emulated GEMM):

* ``mx_mm`` (line 84), the autograd function of MX training, saves the high-precision x and W
  (line 108) and quantizes every operand afresh for each GEMM with ``MXTensor.to_mx``, its
  32-element blocks along the GEMM's reduction axis, each operand with its own element dtype
  (``in_elem_dtype``, ``w_elem_dtype``, ``grad_elem_dtype``) and one scale calculation mode:

  - forward ``y = x_q(blocks along K) · W_q(along K)ᵀ`` (lines 119-139; x flattened to M×K);
  - grad_input ``dx = dy_q(along N) · W_q(along N)`` (lines 169-203; W along N is
    ``to_mx(Wᵀ.contiguous())``, line 183);
  - grad_weight ``dW = dy_q(along M)ᵀ · x_q(along M)`` (lines 208-255; both through
    ``mx_formats/utils.py::_to_mxfp8_dim1_kernel_wrapper``, which with ``KernelPreference.EMULATED``
    is ``to_mx(a.t().contiguous())``, utils.py lines 163-170), or in high precision with
    ``wgrad_with_hp=True`` (line 211).

  These are lightning_lowp's conventions exactly (:mod:`lightning_lowp.matmuls`).
* ``_to_mxfp8_then_scaled_mm`` (line 27), which ``MXFP8Linear.forward`` (line 296) and the
  ``MXFP8TrainingOpConfig`` weight wrapper call, fixes E4M3 for all three operands and blocks of
  32 (lines 61-64); the mode is ``RCEIL`` by default (``MXFP8Linear`` line 281,
  ``moe_training/config.py`` line 168) or ``FLOOR``. Other element dtypes (E5M2, FP6, FP4) and
  the CEIL and EVEN modes are reachable only by calling ``mx_mm.apply`` directly; they work there
  in emulation and are tested below too.
* ``KernelPreference.EMULATED`` takes the PyTorch cast ``mx_tensor.py::to_mx`` (line 214) for
  every operand, whatever cast kernels are named (``MXTensor.to_mx`` lines 661-667, utils.py
  line 163; ``mx_mm.apply`` called with the TORCH dim1 choice, as the tests do for other element
  dtypes, takes the same ``to_mx`` of the transposed operand, mxfp8_linear.py lines 224-254),
  and the GEMM dequantizes both ``MXTensor`` operands to their original dtype and calls
  ``aten.mm`` on them (``_addmm_mx_dispatch``, mx_tensor.py lines 830-843). All of it runs on
  the CPU. ``AUTO`` needs CUDA (Triton/CUDA casts, ``torch._scaled_mm``).
* float32 inputs: the dequantized operands are float32 and the GEMMs are float32 ``torch.mm``;
  lp multiplies the same operands (the six are compared one by one below), so y, dx and dW agree
  bit for bit (tests below, every element dtype and mode). The memory layouts of the backward
  operands differ (torchao's right operand of grad_input, and both of grad_weight, are transposed
  views of its transposed casts; lp's are not), and the CPU GEMM of this torch build gives the
  same bits either way for these shapes. bfloat16 inputs: torchao
  computes the scales and elements in float32 (mx_tensor.py line 257), dequantizes to bfloat16
  (exact: a power of two times an FP8/FP6/FP4 value) and multiplies in bfloat16; lp quantizes
  bfloat16 tensors to the same values, so with bfloat16 inputs the results agree too.
* The quantization itself agrees with lp.quantize as tests/formats/test_torchao_agreement.py
  shows, including its one exception: torchao's eager RCEIL takes ``ceil(float32 log2(d))``,
  one binade low for ``d`` a few float32 steps above a power of two. The data here has no such
  block (checked), so RCEIL agrees bit for bit as well.

Where torchao differs:

* the bias. ``MXFP8Linear`` adds it after the GEMM in the output dtype (line 305), as lp does,
  and its gradient is autograd's sum of dy, bit for bit lp's ``dy.sum(0)`` here. But
  ``quantize_(model, MXFP8TrainingOpConfig(...))`` wraps every parameter of the module (weight and
  bias) and its ``linear`` override (``moe_training/tensor.py`` lines 313-331) passes only
  ``args[0]`` and ``args[1]`` to ``_to_mxfp8_then_scaled_mm``: in torchao 0.18 the bias of an
  ``nn.Linear`` is dropped, and gets no gradient (the Float8 wrapper, lines 261-264, adds it).
  The test below pins that: torchao's output is lp's without the bias.
* the output dtype: the emulated GEMM returns the input's dtype; the real (AUTO) kernels return
  bfloat16 (mx_tensor.py lines 811, 827), which emulation on the CPU cannot check.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_lowp as lp

pytest.importorskip("torchao")
mxfp8_linear = pytest.importorskip("torchao.prototype.moe_training.mxfp8_linear")
from torchao.prototype.mx_formats.config import (  # noqa: E402
    MXFP8Dim0CastKernelChoice,
    MXFP8Dim1CastKernelChoice,
    ScaleCalculationMode,
)
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference  # noqa: E402

EMULATED = KernelPreference.EMULATED
ELEMENTS = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp6_e2m3": DTYPE_FP6_E2M3,
    "fp6_e3m2": DTYPE_FP6_E3M2,
    "fp4_e2m1": torch.float4_e2m1fn_x2,
}
MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp6_e2m3": 7.5, "fp6_e3m2": 28.0, "fp4_e2m1": 6.0}
MODES = list(ScaleCalculationMode)
# x is (2, 48, K): M = 96 tokens, flattened as both libraries do.
M, K, N = 96, 64, 160


def spec(element: str, mode: ScaleCalculationMode) -> str:
    return f"mx({element},32,scale_rounding={mode.value})"


def settings(element: str, mode: ScaleCalculationMode) -> lp.MatmulSettings:
    return lp.MatmulSettings(input=spec(element, mode), weight=spec(element, mode), grad_output=spec(element, mode))


def q(t: torch.Tensor, mode: ScaleCalculationMode, dim: int, element: str = "fp8_e4m3") -> torch.Tensor:
    """``t`` quantized by lp.quantize, its blocks of 32 along ``dim``."""
    return lp.quantize(t, f"mx({element},32,dim={dim},scale_rounding={mode.value})")


def rceil_log2_misses(t: torch.Tensor, max_element: float) -> int:
    """Blocks of 32 along either axis of the 2-D ``t`` where torchao's eager RCEIL exponent
    ``ceil(float32 log2(amax / max))`` is not the exact ``ceil(log2(amax / max))``."""
    misses = 0
    for blocks in (t.reshape(-1, 32), t.mT.contiguous().reshape(-1, 32)):
        d = blocks.abs().amax(dim=1) / max_element
        m, e = torch.frexp(d.double())
        exact = torch.where(d == 0, -127, e.to(torch.int64) - 1 + (m != 0.5).to(torch.int64)).clamp(-127, 127)
        misses += int((torch.ceil(torch.log2(d)).clamp(-127, 127).to(torch.int64) != exact).sum())
    return misses


def operands(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (2, 48, K), W (N, K), dy (2, 48, N): normal values, each row and column scaled by
    2^U(-6, 6), so that blocks along either axis see many different scales."""
    g = torch.Generator().manual_seed(seed)

    def make(rows: int, cols: int) -> torch.Tensor:
        t = torch.randn(rows, cols, generator=g)
        t = t * 2.0 ** (torch.rand(rows, 1, generator=g) * 12 - 6) * 2.0 ** (torch.rand(1, cols, generator=g) * 12 - 6)
        t = t.to(dtype)
        for element in MAX:
            assert rceil_log2_misses(t.float(), MAX[element]) == 0, "pick another seed"
        return t

    return make(M, K).reshape(2, M // 2, K), make(N, K), make(M, N).reshape(2, M // 2, N)


def run(fn, x, w, dy, bias=None):
    """(y, dx, dW[, db]) of ``fn(x, w[, bias])`` with output gradient dy."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    args = (x, w) if bias is None else (x, w, bias.clone().requires_grad_())
    y = fn(*args)
    y.backward(dy)
    return (y.detach(), *(a.grad for a in args))


def torchao_mxfp8(mode: ScaleCalculationMode):
    """The function MXFP8Linear and the MXFP8TrainingOpConfig weight wrapper call, emulated."""
    return lambda x, w: mxfp8_linear._to_mxfp8_then_scaled_mm(x, w, EMULATED, mode)


def torchao_mx_mm(in_elem, w_elem, grad_elem, mode: ScaleCalculationMode, wgrad_with_hp: bool = False):
    """mx_mm, torchao's MX training autograd function, with any element dtypes, emulated."""

    def fn(x, w):
        return mxfp8_linear.mx_mm.apply(
            x,
            w,
            ELEMENTS[in_elem],
            ELEMENTS[w_elem],
            ELEMENTS[grad_elem],
            32,
            EMULATED,
            MXFP8Dim0CastKernelChoice.TORCH,
            MXFP8Dim1CastKernelChoice.TORCH,
            mode,
            wgrad_with_hp,
        )

    return fn


def ours(s: lp.MatmulSettings):
    return lambda x, w, b=None: lp.quantized_linear(x, w, b, s)


def assert_equal(got, want, names=("y", "dx", "dW", "db")):
    for name, a, b in zip(names, got, want, strict=False):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item()}"


# ---- whole layers: y, dx, dW --------------------------------------------------------------


@pytest.mark.parametrize("mode", [ScaleCalculationMode.FLOOR, ScaleCalculationMode.RCEIL], ids=lambda m: m.value)
def test_mxfp8_training_linear_matches_bit_for_bit(mode):
    """torchao's MXFP8 training GEMMs (E4M3, blocks of 32) = lp's "mx(fp8_e4m3,32,scale_rounding=...)"."""
    x, w, dy = operands()
    assert_equal(run(ours(settings("fp8_e4m3", mode)), x, w, dy), run(torchao_mxfp8(mode), x, w, dy))


def test_mxfp8_recipe_is_torchaos_default():
    """lp's "mxfp8" recipe = MXFP8Linear's defaults (RCEIL)."""
    x, w, dy = operands(1)
    cb = lp.QuantizeMatmuls.from_name("mxfp8")
    assert_equal(run(ours(cb.settings), x, w, dy), run(torchao_mxfp8(ScaleCalculationMode.RCEIL), x, w, dy))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("element", ["fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"])
def test_other_elements_through_mx_mm(element, mode):
    x, w, dy = operands(2)
    got = run(ours(settings(element, mode)), x, w, dy)
    assert_equal(got, run(torchao_mx_mm(element, element, element, mode), x, w, dy))


def test_mixed_elements_per_operand():
    """One element dtype per operand role: E4M3 activations, FP6 weights, E5M2 gradients."""
    mode = ScaleCalculationMode.RCEIL
    x, w, dy = operands(3)
    s = lp.MatmulSettings(
        input=spec("fp8_e4m3", mode), weight=spec("fp6_e2m3", mode), grad_output=spec("fp8_e5m2", mode)
    )
    assert_equal(run(ours(s), x, w, dy), run(torchao_mx_mm("fp8_e4m3", "fp6_e2m3", "fp8_e5m2", mode), x, w, dy))


def test_wgrad_with_hp():
    """torchao's wgrad_with_hp: dW = dyᵀ·x unquantized (float32), y and dx as before. lp says it
    with input_for_wgrad="fp32" and grad_output_for_wgrad="fp32" where MatmulSettings has them;
    otherwise y and dx are checked, and dW against the plain product."""
    mode = ScaleCalculationMode.RCEIL
    x, w, dy = operands(4)
    want = run(torchao_mx_mm("fp8_e4m3", "fp8_e4m3", "fp8_e4m3", mode, wgrad_with_hp=True), x, w, dy)
    assert torch.equal(want[2], dy.reshape(M, N).T @ x.reshape(M, K))
    s = settings("fp8_e4m3", mode)
    if {"input_for_wgrad", "grad_output_for_wgrad"} <= set(getattr(lp.MatmulSettings, "__dataclass_fields__", {})):
        s = lp.MatmulSettings(
            input=s.input,
            weight=s.weight,
            grad_output=s.grad_output,
            input_for_wgrad="fp32",
            grad_output_for_wgrad="fp32",
        )
        assert_equal(run(ours(s), x, w, dy), want)
    else:
        assert_equal(run(ours(s), x, w, dy)[:2], want[:2])


def test_bfloat16_inputs():
    """bf16 x, W, dy: torchao dequantizes to bf16 and multiplies in bf16; so does lp on bf16 tensors."""
    mode = ScaleCalculationMode.RCEIL
    x, w, dy = operands(5, torch.bfloat16)
    got = run(ours(settings("fp8_e4m3", mode)), x, w, dy)
    want = run(torchao_mxfp8(mode), x, w, dy)
    assert want[0].dtype == torch.bfloat16
    assert_equal(got, want)


# ---- the modules: MXFP8Linear, quantize_, and lp's callback ------------------------------------


@pytest.mark.parametrize("mode", [ScaleCalculationMode.FLOOR, ScaleCalculationMode.RCEIL], ids=lambda m: m.value)
def test_mxfp8_linear_module_with_bias(mode):
    torch.manual_seed(0)
    x, w, dy = operands(6)
    layer = mxfp8_linear.MXFP8Linear(K, N, kernel_preference=EMULATED, scale_calculation_mode=mode)
    bias = torch.randn(N)

    def torchao(x, w, b):
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        layer.zero_grad()
        y = layer(x)
        x.grad = None
        y.backward(dy)
        return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()

    want = torchao(x.clone().requires_grad_(), w, bias)
    assert_equal(run(ours(settings("fp8_e4m3", mode)), x, w, dy, bias), want)


def quantize_config(model: nn.Module, mode: ScaleCalculationMode) -> nn.Module:
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, MXFP8TrainingOpConfig(kernel_preference=EMULATED, scale_calculation_mode=mode))
    return model


def test_quantize_config_on_a_model_matches_the_callback():
    """quantize_(model, MXFP8TrainingOpConfig(EMULATED)) (RCEIL by default) and lp.QuantizeMatmuls
    with RCEIL MXFP8 operands attached to a copy of the same two-layer MLP (Linear without bias):
    same logits, same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, 128, bias=False), nn.GELU(), nn.Linear(128, N, bias=False))
    ref = copy.deepcopy(model)
    quantize_config(model, ScaleCalculationMode.RCEIL)
    x, _, dy = operands(7)
    y_ao = model(x)
    y_ao.backward(dy)
    mx = spec("fp8_e4m3", ScaleCalculationMode.RCEIL)
    cb = lp.QuantizeMatmuls(input=mx, weight=mx, grad_output=mx)
    cb.attach(ref)
    try:
        y = ref(x)
        y.backward(dy)
    finally:
        cb.detach()
    assert sum(cb.counts.values()) == 2
    assert torch.equal(y, y_ao)
    for (name, p), p_ao in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, p_ao.grad), name


def test_quantize_config_drops_the_bias():
    """torchao 0.18's MXFP8 weight wrapper ignores F.linear's bias (moe_training/tensor.py 313-331):
    the output is lp's without the bias, and the bias gets no gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(K, N)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    quantize_config(layer, ScaleCalculationMode.RCEIL)
    x, _, dy = operands(8)
    y = layer(x)
    y.backward(dy)
    s = settings("fp8_e4m3", ScaleCalculationMode.RCEIL)
    if torch.equal(y, lp.quantized_linear(x, w, b, s)):
        pytest.skip("this torchao adds the bias: the quantize_ flow matches lp with its bias")
    assert torch.equal(y, lp.quantized_linear(x, w, None, s))
    assert layer.bias.grad is None


# ---- the six operands, as torchao's GEMMs see them ---------------------------------------------


class RecordMM(TorchDispatchMode):
    """The dequantized operands of every aten.mm whose operands are MXTensors (the emulated GEMMs)."""

    def __init__(self):
        super().__init__()
        self.mms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and all(isinstance(a, MXTensor) for a in args):
            self.mms.append(tuple(a.dequantize(torch.float32) for a in args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [ScaleCalculationMode.FLOOR, ScaleCalculationMode.RCEIL], ids=lambda m: m.value)
def test_the_six_operands_match_lp_quantize_along_the_reduction_axis(mode):
    x, w, dy = operands(9)
    with RecordMM() as rec:
        run(torchao_mxfp8(mode), x, w, dy)
    (x_k, wt_k), (dy_n, w_n), (dyt_m, x_m) = rec.mms
    x2, dy2 = x.reshape(M, K), dy.reshape(M, N)
    assert torch.equal(x_k, q(x2, mode, -1))  # forward: x along K
    assert torch.equal(wt_k, q(w, mode, -1).T)  # forward: W along K, as Wᵀ
    assert torch.equal(dy_n, q(dy2, mode, -1))  # grad_input: dy along N
    assert torch.equal(w_n, q(w, mode, -2))  # grad_input: W along N
    assert torch.equal(dyt_m, q(dy2, mode, -2).T)  # grad_weight: dy along M, as dyᵀ
    assert torch.equal(x_m, q(x2, mode, -2))  # grad_weight: x along M
    # each operand's two quantizations differ: the axis matters for these inputs
    assert not torch.equal(x_k, x_m)
    assert not torch.equal(wt_k.T, w_n)
    assert not torch.equal(dy_n, dyt_m.T)


def test_a_wrong_axis_does_not_match():
    """The comparison can fail: quantizing once along the forward's axis and reusing it in the
    backward GEMMs (W along K in grad_input; x along K and dy along N in grad_weight) gives other
    dx and dW than torchao, while the formulas with the right axes give its results."""
    mode = ScaleCalculationMode.RCEIL
    x, w, dy = operands(10)
    _, dx_ao, dw_ao = run(torchao_mxfp8(mode), x, w, dy)
    x2, dy2 = x.reshape(M, K), dy.reshape(M, N)

    def grads(w_axis, dy_axis, x_axis):
        dx = q(dy2, mode, -1) @ q(w, mode, w_axis)
        dw = q(dy2, mode, dy_axis).mT @ q(x2, mode, x_axis)
        return dx.reshape(x.shape), dw

    dx, dw = grads(-2, -2, -2)
    assert torch.equal(dx, dx_ao)
    assert torch.equal(dw, dw_ao)
    dx, dw = grads(-1, -1, -1)
    assert not torch.equal(dx, dx_ao)
    assert not torch.equal(dw, dw_ao)
    assert (dx != dx_ao).float().mean() > 0.5, "most elements differ"
    assert (dw != dw_ao).float().mean() > 0.5
