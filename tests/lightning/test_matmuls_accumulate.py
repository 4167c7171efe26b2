"""QuantizeMatmuls with low-precision accumulation: each GEMM (fprop, dgrad, wgrad) of a linear
layer, a matmul and a convolution summed in its documented contraction order by lp.matmul's kernel."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.accumulation import accumulate_gemm

# Blocks of 4, so that the axis a block runs along changes the result.
MX4 = "mx(fp8_e4m3,4)"
BFP4 = "bfp(4,block_size=4)"
OPERANDS = {"input": MX4, "weight": BFP4, "grad_output": MX4}
BF16 = lp.Accumulation("bf16")
ALL_BF16 = {f"{gemm}_accumulate": BF16 for gemm in ("fprop", "dgrad", "wgrad")}
ALIGNED = lp.Accumulation("aligned(32,14)", chunk=64)  # the tensor-core model, promoted every 64


def q(t, spec, dim):
    """``t`` quantized by hand, its blocks along ``dim`` (spec: a format with blocks of 4)."""
    return lp.quantize(t, spec[:-1] + f",dim={dim})")


def run_linear(settings, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = lp.quantized_linear(x, w, b, settings)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def run_conv(settings, layer, x, dy=None):
    x = x.detach().clone().requires_grad_()
    w, b = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias))
    y = lp.quantized_conv(x, w, b, layer.stride, layer.padding, layer.dilation, 1, settings)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), x.grad, w.grad, b.grad


# ---- linear and matmul --------------------------------------------------------------------------


def test_linear_gemms_accumulate_over_k_n_and_m_in_order():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 20), torch.randn(6, 20), torch.randn(6)
    dy = torch.randn(2, 3, 6)
    y, dx, dw, db = run_linear(lp.MatmulSettings(**OPERANDS, **ALL_BF16), x, w, b, dy)
    x2, dy2 = x.reshape(-1, 20), dy.reshape(-1, 6)
    acc = {"accumulate": "bf16"}
    want_y = (lp.matmul(q(x2, MX4, -1), q(w, BFP4, -1).T, **acc) + b).reshape(2, 3, 6)  # over K, bias in fp32
    want_dx = lp.matmul(q(dy2, MX4, -1), q(w, BFP4, 0), **acc).reshape(x.shape)  # over N
    want_dw = lp.matmul(q(dy2, MX4, 0).T, q(x2, MX4, 0), **acc)  # over M, the tokens in order
    assert torch.equal(y, want_y)
    assert torch.equal(dx, want_dx)
    assert torch.equal(dw, want_dw)
    assert torch.equal(db, dy2.sum(0))
    # and not the float32 GEMMs of the same operands
    plain = run_linear(lp.MatmulSettings(**OPERANDS), x, w, b, dy)
    for got, other in zip((y, dx, dw), plain, strict=False):
        assert not torch.equal(got, other)
        assert (got - other).norm() < 0.01 * other.norm()  # bf16 accumulation: close


def test_only_the_wgrad_gemm_accumulated_changes_only_dw():
    torch.manual_seed(1)
    x, w, b, dy = torch.randn(16, 12), torch.randn(8, 12), torch.randn(8), torch.randn(16, 8)
    plain = run_linear(lp.MatmulSettings(**OPERANDS), x, w, b, dy)
    wgrad = run_linear(lp.MatmulSettings(**OPERANDS, wgrad_accumulate="bf16"), x, w, b, dy)
    assert torch.equal(wgrad[0], plain[0])
    assert torch.equal(wgrad[1], plain[1])
    assert not torch.equal(wgrad[2], plain[2])
    assert torch.equal(wgrad[2], lp.matmul(q(dy, MX4, 0).T, q(x, MX4, 0), accumulate="bf16"))


def test_chunk_of_at_least_k_is_no_chunk_and_a_small_chunk_is_not():
    torch.manual_seed(2)
    x, w = torch.rand(4, 512), torch.rand(3, 512)  # positive: a long fp16 sum loses bits
    b, dy = torch.zeros(3), torch.rand(4, 3)

    def run(**kwargs):
        acc = lp.Accumulation("fp16", **kwargs)
        return run_linear(
            lp.MatmulSettings(fprop_accumulate=acc, dgrad_accumulate=acc, wgrad_accumulate=acc), x, w, b, dy
        )

    whole, long_chunk, short_chunk = run(), run(chunk=512), run(chunk=16)
    for a, c in zip(whole, long_chunk, strict=True):
        assert torch.equal(a, c)  # the one promotion adds into a float32 zero: exact
    assert not torch.equal(short_chunk[0], whole[0])
    exact = x.double() @ w.double().T
    assert (short_chunk[0] - exact).abs().max() < (whole[0] - exact).abs().max()  # promotion helps


def test_stochastic_accumulation_is_reproducible_under_the_seed():
    x, w, b, dy = torch.randn(8, 32), torch.randn(4, 32), torch.randn(4), torch.randn(8, 4)
    s = lp.MatmulSettings(fprop_accumulate=lp.Accumulation("bf16", rounding="stochastic"))
    torch.manual_seed(3)
    first = run_linear(s, x, w, b, dy)
    torch.manual_seed(3)
    again = run_linear(s, x, w, b, dy)
    assert all(torch.equal(a, c) for a, c in zip(first, again, strict=True))
    nearest = run_linear(lp.MatmulSettings(fprop_accumulate=BF16), x, w, b, dy)
    assert not torch.equal(first[0], nearest[0])


def test_matmul_gemms_accumulate_per_batch_and_sum_broadcast_gradients_in_float32():
    torch.manual_seed(4)
    a, b = torch.randn(2, 5, 16, requires_grad=True), torch.randn(16, 6, requires_grad=True)
    s = lp.MatmulSettings(**OPERANDS, **ALL_BF16)
    y = lp.quantized_matmul(a, b, s)
    dy = torch.randn_like(y)
    y.backward(dy)
    ad, bd = a.detach(), b.detach()
    assert torch.equal(y, accumulate_gemm(q(ad, MX4, -1), q(bd, BFP4, -2), BF16))
    assert torch.equal(a.grad, accumulate_gemm(q(dy, MX4, -1), q(bd, BFP4, -1).T, BF16))
    per_batch = accumulate_gemm(q(ad, MX4, -2).mT, q(dy, MX4, -2), BF16)  # (2, 16, 6)
    assert torch.equal(b.grad, per_batch.sum(0))


# ---- convolutions -------------------------------------------------------------------------------


def im2col(x, kernel, stride, padding, dilation):
    """The (M, K) matrix of the documented layout, built offset by offset: M (H_out, W_out, batch), K (kh, kw, C_in)."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    h_out = (xp.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w_out = (xp.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            r, c = i * dilation[0], j * dilation[1]
            taps.append(
                xp[
                    :,
                    :,
                    r : r + stride[0] * (h_out - 1) + 1 : stride[0],
                    c : c + stride[1] * (w_out - 1) + 1 : stride[1],
                ]
            )
    cols = torch.stack(taps)  # (kh*kw, N, C, H_out, W_out)
    return cols.permute(3, 4, 1, 0, 2).reshape(h_out * w_out * x.shape[0], -1), (h_out, w_out)


def col2im(cols, x_shape, kernel, stride, padding, dilation, hw_out):
    """dcols (M, K) back onto x: each offset's contribution added in float32, offsets in (kh, kw) order."""
    n, c, h, w = x_shape
    h_out, w_out = hw_out
    parts = cols.reshape(h_out, w_out, n, kernel[0] * kernel[1], c).permute(3, 2, 4, 0, 1)
    dxp = torch.zeros(n, c, h + 2 * padding[0], w + 2 * padding[1])
    for t, (i, j) in enumerate((i, j) for i in range(kernel[0]) for j in range(kernel[1])):
        r, s = i * dilation[0], j * dilation[1]
        dxp[:, :, r : r + stride[0] * (h_out - 1) + 1 : stride[0], s : s + stride[1] * (w_out - 1) + 1 : stride[1]] += (
            parts[t]
        )
    return dxp[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w]


def conv_by_hand(x, w, b, dy, stride, padding, dilation, acc):
    """The three implicit GEMMs, accumulated: fprop over (kh, kw, C_in), dgrad over C_out then col2im,
    wgrad over (H_out, W_out, batch); operands quantized along C_in, C_out and the batch."""
    if x.dim() == 3:  # conv1d as a conv2d of height 1
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
        x, w, dy = x.unsqueeze(2), w.unsqueeze(2), dy.unsqueeze(2)
        y, dx, dw = conv_by_hand(x, w, b, dy, stride, padding, dilation, acc)
        return y.squeeze(2), dx.squeeze(2), dw.squeeze(2)
    c_out, c_in, kh, kw = w.shape
    wm = q(w, BFP4, 1).permute(0, 2, 3, 1).reshape(c_out, -1)  # (C_out, K), K as (kh, kw, C_in)
    cols, (h_out, w_out) = im2col(q(x, MX4, 1), (kh, kw), stride, padding, dilation)
    y = accumulate_gemm(cols, wm.T, acc).reshape(h_out, w_out, x.shape[0], c_out).permute(2, 3, 0, 1)
    y = y + b.reshape(-1, 1, 1)
    dym = q(dy, MX4, 1).permute(2, 3, 0, 1).reshape(-1, c_out)  # (M, C_out)
    wd = q(w, BFP4, 0).permute(0, 2, 3, 1).reshape(c_out, -1)
    dx = col2im(accumulate_gemm(dym, wd, acc), x.shape, (kh, kw), stride, padding, dilation, (h_out, w_out))
    dyw = q(dy, MX4, 0).permute(1, 2, 3, 0).reshape(c_out, -1)  # (C_out, M), the batch innermost
    colsw, _ = im2col(q(x, MX4, 0), (kh, kw), stride, padding, dilation)
    dw = accumulate_gemm(dyw, colsw, acc).reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2)
    return y, dx, dw


CONVS = [
    (nn.Conv2d(8, 12, 3, stride=2, padding=1), (4, 8, 9, 7)),
    (nn.Conv2d(8, 4, (2, 3), stride=(1, 2), padding=(1, 2), dilation=(2, 1)), (3, 8, 7, 8)),
    (nn.Conv1d(8, 12, 3, stride=2, padding=2, dilation=2), (4, 8, 11)),
]


@pytest.mark.parametrize("acc", [BF16, ALIGNED], ids=str)
@pytest.mark.parametrize(("layer", "shape"), CONVS)
def test_conv_gemms_accumulate_in_the_documented_order(layer, shape, acc):
    torch.manual_seed(5)
    x = torch.randn(shape)
    y0 = lp.quantized_conv(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, 1)
    dy = torch.randn_like(y0)
    gemms = {f"{gemm}_accumulate": acc for gemm in ("fprop", "dgrad", "wgrad")}
    y, dx, dw, db = run_conv(lp.MatmulSettings(**OPERANDS, **gemms), layer, x, dy)
    args = (layer.stride, layer.padding, layer.dilation, acc)
    want_y, want_dx, want_dw = conv_by_hand(x, layer.weight.detach(), layer.bias.detach(), dy, *args)
    assert torch.equal(y, want_y)
    assert torch.equal(dx, want_dx)
    assert torch.equal(dw, want_dw)
    assert torch.equal(db, dy.sum([0, *range(2, dy.dim())]))
    plain = run_conv(lp.MatmulSettings(**OPERANDS), layer, x, dy)
    for got, other in zip((y, dx, dw), plain, strict=False):
        assert not torch.equal(got, other)
        assert (got - other).norm() < 0.01 * other.norm()


def test_conv_with_float32_accumulation_is_torchs_conv_up_to_rounding():
    """An "fp32" accumulator sums in the documented order, rounding each addition: close to torch's conv."""
    torch.manual_seed(6)
    layer, x = nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(3, 4, 8, 8)
    acc = lp.Accumulation("fp32")
    got = run_conv(lp.MatmulSettings(fprop_accumulate=acc, dgrad_accumulate=acc, wgrad_accumulate=acc), layer, x)
    want = run_conv(lp.MatmulSettings(), layer, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conv_only_wgrad_accumulated_and_hadamard_padding():
    torch.manual_seed(7)
    layer, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(5, 4, 6, 6)
    plain = run_conv(lp.MatmulSettings(**OPERANDS), layer, x)
    wgrad = run_conv(lp.MatmulSettings(**OPERANDS, wgrad_accumulate="bf16"), layer, x)
    assert torch.equal(wgrad[0], plain[0])
    assert torch.equal(wgrad[1], plain[1])
    assert not torch.equal(wgrad[2], plain[2])
    # with the Hadamard transform the batch is padded to 16 with zero rows: it still runs, close to float32
    s = lp.MatmulSettings(wgrad_hadamard=True, wgrad_accumulate="fp32")
    torch.testing.assert_close(run_conv(s, layer, x)[2], run_conv(lp.MatmulSettings(), layer, x)[2])


def test_aligned_sum_accumulation_of_a_linear_layer():
    torch.manual_seed(8)
    x, w, b, dy = torch.randn(6, 96), torch.randn(5, 96), torch.randn(5), torch.randn(6, 5)
    y, dx, dw, _ = run_linear(lp.MatmulSettings(fprop_accumulate=ALIGNED, wgrad_accumulate=ALIGNED), x, w, b, dy)
    assert torch.equal(y, lp.matmul(x, w.T, accumulate="aligned(32,14)", chunk=64) + b)
    assert torch.equal(dx, dy @ w)  # dgrad left to torch
    assert torch.equal(dw, accumulate_gemm(dy.T, x, ALIGNED))
    assert not torch.equal(y, x @ w.T + b)


# ---- the callback, recipes, bad input -----------------------------------------------------------


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(cb):
    pl.seed_everything(0, verbose=False)
    model = Net()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    pl.Trainer(callbacks=[cb] if cb else [], **{**QUIET, "max_steps": 3}).fit(model, DataLoader(data, 16))
    return [p.detach().clone() for p in model.parameters()]


def test_a_trainer_fit_with_bf16_accumulation():
    plain = fit(None)
    cb = lp.QuantizeMatmuls(accumulate="bf16")
    acc = fit(cb)
    assert cb.counts[("fc1", "linear")] == 3
    assert "accumulate=bf16" in cb._describe()
    assert any(not torch.equal(a, b) for a, b in zip(acc, plain, strict=True))
    for a, b in zip(acc, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
    stochastic = [fit(lp.QuantizeMatmuls(accumulate="bf16", accumulate_rounding="stochastic")) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*stochastic, strict=True))  # seed_everything fixes the bits


def test_callback_arguments_map_to_the_three_gemms():
    cb = lp.QuantizeMatmuls(input="fp8_e4m3", accumulate="fp16", chunk=32, wgrad_accumulate="bf16")
    s = cb.settings
    assert s.accumulation_for("fprop") == s.accumulation_for("dgrad") == lp.Accumulation("fp16", chunk=32)
    assert s.accumulation_for("wgrad") == lp.Accumulation("bf16")
    assert "fprop_accumulate=fp16,chunk=32, dgrad_accumulate=fp16,chunk=32, wgrad_accumulate=bf16" in str(s)
    both = lp.QuantizeMatmuls(accumulate=lp.Accumulation("bf16", rounding="toward_zero"))
    assert str(both.settings).endswith("accumulate=bf16,toward_zero)")
    # overrides: the per-GEMM keys, or "accumulate" for all three; keep_last layers have float32 GEMMs
    cb = lp.QuantizeMatmuls(
        accumulate="bf16", overrides={"head": {"accumulate": None}, "fc1": {"dgrad_accumulate": None}}
    )
    sel = cb.select(Net())
    assert sel["head"].fprop_accumulate is None
    assert sel["head"].wgrad_accumulate is None
    assert sel["fc1"].dgrad_accumulate is None
    assert sel["fc1"].fprop_accumulate == BF16
    assert lp.QuantizeMatmuls(accumulate="bf16", keep_last=1).select(Net())["head"].wgrad_accumulate is None


def test_the_deepseek_recipe_and_recipe_fields():
    r = lp.get_recipe("fp8_deepseek_v3")
    aligned = lp.Accumulation("aligned(32,14)", chunk=128)
    assert r.matmul_fprop_accumulate == r.matmul_dgrad_accumulate == r.matmul_wgrad_accumulate == aligned
    assert r.matmul_input == lp.get_recipe("fp8_blockwise").matmul_input
    cb = lp.QuantizeMatmuls.from_name("fp8_deepseek_v3")
    assert cb.settings.wgrad_accumulate == aligned
    assert str(cb.settings).endswith("accumulate=aligned(32,14),chunk=128)")
    cb = lp.QuantizeMatmuls.from_name("fp8_deepseek_v3", accumulate="bf16")  # replaces the recipe's
    assert cb.settings.fprop_accumulate == cb.settings.wgrad_accumulate == BF16
    cb = lp.QuantizeMatmuls.from_name("fp8_deepseek_v3", wgrad_accumulate=None)
    assert cb.settings.wgrad_accumulate is None
    assert cb.settings.fprop_accumulate == aligned
    assert lp.get_recipe("fp8_blockwise").matmul_fprop_accumulate is None
    only_acc = lp.Recipe(matmul_wgrad_accumulate="bf16")
    assert only_acc.matmul_wgrad_accumulate == BF16
    lp.register_recipe("test_accumulate_only", only_acc, overwrite=True)  # conftest restores the registry
    _, callbacks = lp.from_recipe("test_accumulate_only")
    assert [type(c) for c in callbacks] == [lp.QuantizeMatmuls]
    assert callbacks[0].settings.input is None
    assert callbacks[0].settings.wgrad_accumulate == BF16
    with pytest.raises(ValueError, match="matmul_fprop_accumulate=fixed"):
        lp.Recipe(matmul_fprop_accumulate="fixed(8,4)")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accumulate": "fixed(8,4)"}, "accumulate=fixed.* is not a float format"),
        ({"accumulate": "mxfp8_e4m3"}, "accumulate=.* is not a float format"),
        ({"accumulate": 16}, "accumulate must be"),
        ({"wgrad_accumulate": "bfp(8)"}, "wgrad_accumulate=.* is not a float format"),
        ({"accumulate": "bf16", "chunk": 0}, "chunk must be a positive int"),
        ({"accumulate": "bf16", "accumulate_rounding": "bogus"}, "accumulate_rounding"),
        ({"accumulate": "aligned(32,14)", "chunk": 48}, "chunk=48 must be a multiple"),
        ({"chunk": 128}, "need accumulate"),
        ({"accumulate": BF16, "chunk": 128}, "has its own rounding and chunk"),
        ({"overrides": {"head": {"accumulate": "fixed(8,4)"}}}, r"overrides\['head'\]\['accumulate'\]"),
    ],
)
def test_bad_accumulation_is_an_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.QuantizeMatmuls(**kwargs)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="fprop_accumulate=fixed"):
        lp.MatmulSettings(fprop_accumulate="fixed(8,4)")
    with pytest.raises(ValueError, match="gemm must be one of"):
        lp.MatmulSettings().accumulation_for("bprop")
