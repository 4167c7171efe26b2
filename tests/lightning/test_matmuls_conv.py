"""QuantizeMatmuls beyond linear layers: convolutions as implicit GEMMs, an operand's second use,
the random Hadamard transform of the weight-gradient operands, keep_last, torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

import lightning_lowp as lp

# Blocks of 4, so that the axis a block runs along changes the result.
MX4 = "mx(fp8_e4m3,4)"
BFP4 = "bfp(4,block_size=4)"
SETTINGS = lp.MatmulSettings(input=MX4, weight=BFP4, grad_output=MX4)


def q(t, spec, dim):
    """``t`` quantized by hand, its blocks along ``dim`` (spec: a format with blocks of 4)."""
    return lp.quantize(t, spec[:-1] + f",dim={dim})")


def conv_by_hand(x, w, b, dy, stride, padding, dilation):
    """The three implicit GEMMs of a conv, blocks along C_in (fprop), C_out (dgrad), batch (wgrad)."""
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    conv_input = nn_grad.conv1d_input if x.dim() == 3 else nn_grad.conv2d_input
    conv_weight = nn_grad.conv1d_weight if x.dim() == 3 else nn_grad.conv2d_weight
    y = conv(q(x, MX4, 1), q(w, BFP4, 1), b, stride, padding, dilation)
    dx = conv_input(x.shape, q(w, BFP4, 0), q(dy, MX4, 1), stride, padding, dilation)
    dw = conv_weight(q(x, MX4, 0), w.shape, q(dy, MX4, 0), stride, padding, dilation)
    return y, dx, dw, dy.sum([0, *range(2, dy.dim())])


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1), (8, 8, 9, 7)),
        (nn.Conv2d(8, 4, (2, 3), stride=1, padding=(1, 0), dilation=2), (6, 8, 7, 8)),
        (nn.Conv1d(8, 12, 3, stride=1, padding=2), (8, 8, 10)),
    ],
)
def test_conv_equals_the_implicit_gemm_formulas(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    y = lp.quantized_conv(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, 1, SETTINGS)
    dy = torch.randn_like(y)
    y.backward(dy)
    want = conv_by_hand(
        x.detach(), layer.weight.detach(), layer.bias.detach(), dy, layer.stride, layer.padding, layer.dilation
    )
    assert torch.equal(y, want[0])
    assert torch.equal(x.grad, want[1])
    assert torch.equal(layer.weight.grad, want[2])
    assert torch.equal(layer.bias.grad, want[3])
    # the axis matters: blocks along the spatial dims instead give another output
    wrong = F.conv2d if x.dim() == 4 else F.conv1d
    other = wrong(
        q(x.detach(), MX4, -1),
        q(layer.weight.detach(), BFP4, -1),
        layer.bias,
        layer.stride,
        layer.padding,
        layer.dilation,
    )
    assert not torch.equal(y, other)


def test_conv_blocks_are_the_im2col_blocks_with_channels_innermost():
    """q(x along C), unfolded, equals the unfolded x quantized along K = (kh, kw, C_in) in blocks
    that do not cross a kernel offset: the implicit GEMM's input operand, block for block."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6) * torch.logspace(-3, 3, 8).reshape(1, 8, 1, 1)  # channels of very different sizes
    cols_of_q = F.unfold(lp.quantize(x, "mx(fp8_e4m3,4,dim=1)"), 3)  # (N, C*kh*kw, L), K as (c, i, j)
    cols = F.unfold(x, 3).unflatten(1, (8, 9)).transpose(1, 2)  # (N, kh*kw, C, L): K as (i, j, c)
    q_of_cols = lp.quantize(cols, "mx(fp8_e4m3,4,dim=2)").transpose(1, 2).flatten(1, 2)
    assert torch.equal(cols_of_q, q_of_cols)
    # the (c, i, j) order that F.unfold uses would mix kernel offsets in a block: other values
    assert not torch.equal(cols_of_q, lp.quantize(F.unfold(x, 3), "mx(fp8_e4m3,4,dim=1)"))


def test_conv_weight_tiles_cover_c_out_by_c_in_at_each_kernel_offset():
    torch.manual_seed(2)
    w = torch.randn(8, 8, 3, 3)
    s = lp.MatmulSettings(weight="mx(fp8_e4m3,4x4,scale=fp32)")
    x = torch.randn(2, 8, 5, 5)
    y = lp.quantized_conv(x, w, settings=s)
    want_w = lp.quantize(w.permute(2, 3, 0, 1), "mx(fp8_e4m3,4x4,scale=fp32)").permute(2, 3, 0, 1)
    assert torch.equal(y, F.conv2d(x, want_w))


def test_conv_padding_same_valid_and_the_module_path():
    torch.manual_seed(3)
    layer = nn.Conv2d(4, 8, (2, 3), padding="same")
    x = torch.randn(4, 4, 6, 5)
    y = lp.quantized_conv(x, layer.weight, layer.bias, 1, "same", 1, 1, SETTINGS)
    padded = F.pad(x, (1, 1, 0, 1))  # torch's 'same': the odd one out at the end
    assert torch.equal(y, F.conv2d(q(padded, MX4, 1), q(layer.weight.detach(), BFP4, 1), layer.bias))
    assert y.shape == layer(x).shape
    # the callback reaches the conv of an unmodified nn.Conv2d
    cb = lp.QuantizeMatmuls(
        **{k: getattr(SETTINGS, k) for k in ("input", "weight", "grad_output")}, modules=(nn.Conv2d,)
    )
    model = nn.Sequential(layer)
    cb.attach(model)
    try:
        assert torch.equal(model(x), y)
        assert cb.counts[("0", "conv")] == 1
    finally:
        cb.detach()


def test_conv_bad_input():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups=2"):
        lp.quantized_conv(x, w, groups=2, settings=SETTINGS)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        lp.quantized_conv(x, torch.randn(4, 4, 3, 3), stride=2, padding="same", settings=SETTINGS)
    with pytest.raises(ValueError, match="padding must be"):
        lp.quantized_conv(x, torch.randn(4, 4, 3, 3), padding="full", settings=SETTINGS)
    with pytest.raises(ValueError, match="needs input"):
        lp.quantized_conv(torch.randn(2, 4, 5, 5, 5), torch.randn(4, 4, 3, 3, 3), settings=SETTINGS)
    # selected convolutions that cannot be quantized are an error at setup, naming the module
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv3d(4, 4, 1))
    with pytest.raises(ValueError, match=r"'0' \(Conv2d, groups=2\)"):
        lp.QuantizeMatmuls(input=MX4, modules=(nn.Conv2d,)).attach(model)
    with pytest.raises(ValueError, match=r"'1' \(Conv3d"):
        lp.QuantizeMatmuls(input=MX4, modules=(nn.Conv3d,)).attach(model)


# ---- an operand's second use ----------------------------------------------------------------


def test_second_use_formats_apply_only_to_that_gemm():
    torch.manual_seed(4)
    x, w, dy = torch.randn(8, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True), torch.randn(8, 12)
    s = lp.MatmulSettings(
        input=MX4,
        weight=BFP4,
        grad_output=MX4,
        input_for_wgrad="fp32",
        weight_for_dgrad="mx(fp4_e2m1,4)",
        grad_output_for_wgrad="bf16",
    )
    y = lp.quantized_linear(x, w, None, s)
    y.backward(dy)
    assert torch.equal(y, q(x.detach(), MX4, -1) @ q(w.detach(), BFP4, -1).T)
    assert torch.equal(x.grad, q(dy, MX4, -1) @ q(w.detach(), "mx(fp4_e2m1,4)", 0))
    assert torch.equal(w.grad, lp.quantize(dy, "bf16").T @ x.detach())
    assert s.format_for("fprop", "weight") == lp.parse_format(BFP4)
    assert s.format_for("dgrad", "grad_output") == lp.parse_format(MX4)
    assert s.format_for("wgrad", "grad_output") == lp.parse_format("bf16")


# ---- the random Hadamard transform ----------------------------------------------------------


def test_random_hadamard_is_orthogonal_seeded_and_pads_to_16():
    torch.manual_seed(5)
    a, b = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    ha, hb = lp.random_hadamard(a, seed=7), lp.random_hadamard(b, seed=7)
    assert ha.shape == (48, 6)
    torch.testing.assert_close(ha.T @ hb, a.T @ b)
    # it mixes every 16 rows: one outlier spreads over its 16 rows, to +-1/4 of its size
    e = torch.zeros(16, 1)
    e[3] = 4.0
    assert torch.equal(lp.random_hadamard(e, seed=7).abs(), torch.ones(16, 1))
    assert not torch.equal(lp.random_hadamard(a, seed=8), ha)  # another seed, other signs
    assert torch.equal(lp.random_hadamard(a, seed=7), ha)
    # along another dim
    torch.testing.assert_close(lp.random_hadamard(a.T, seed=7, dim=-1), ha.T)


def test_wgrad_hadamard_transforms_both_wgrad_operands_only():
    torch.manual_seed(6)
    x, w, dy = torch.randn(20, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True), torch.randn(20, 12)
    s = lp.MatmulSettings(input=MX4, weight=BFP4, grad_output=MX4, wgrad_hadamard=True, hadamard_seed=3)
    y = lp.quantized_linear(x, w, None, s)
    y.backward(dy)
    assert torch.equal(y, q(x.detach(), MX4, -1) @ q(w.detach(), BFP4, -1).T)
    assert torch.equal(x.grad, q(dy, MX4, -1) @ q(w.detach(), BFP4, 0))
    hx, hdy = lp.random_hadamard(x.detach(), 3), lp.random_hadamard(dy, 3)
    assert torch.equal(w.grad, q(hdy, MX4, 0).T @ q(hx, MX4, 0))
    assert not torch.equal(w.grad, q(dy, MX4, 0).T @ q(x.detach(), MX4, 0))
    # unquantized, the transform leaves the gradient as it was (up to float32 rounding)
    w.grad = None
    plain = lp.MatmulSettings(input="fp32", wgrad_hadamard=True)
    lp.quantized_linear(x, w, None, plain).backward(dy)
    torch.testing.assert_close(w.grad, dy.T @ x.detach())


def test_wgrad_hadamard_on_conv_runs_along_the_batch():
    torch.manual_seed(7)
    layer = nn.Conv2d(4, 8, 3)
    x = torch.randn(5, 4, 6, 6)
    s = lp.MatmulSettings(input="fp32", grad_output="fp32", wgrad_hadamard=True)
    y = lp.quantized_conv(x, layer.weight, layer.bias, settings=s)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(layer.weight.grad, nn_grad.conv2d_weight(x, layer.weight.shape, dy))


# ---- keep_last, recipes -----------------------------------------------------------------------


def test_keep_last_puts_the_last_selected_modules_in_bf16():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)])
    cb = lp.QuantizeMatmuls(input=MX4, keep_last=2)
    sel = cb.select(model)
    assert [n for n, s in sel.items() if s.input == lp.parse_format("bf16")] == ["5", "6"]
    assert all(sel[n].input == lp.parse_format(MX4) for n in "01234")
    frac = lp.QuantizeMatmuls(input=MX4, keep_last=0.15).select(model)  # ceil(1.05) = 2
    assert [n for n, s in frac.items() if s.weight == lp.parse_format("bf16")] == ["5", "6"]
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="keep_last must be"):
            lp.QuantizeMatmuls(input=MX4, keep_last=bad)


def test_the_nvfp4_recipe_sets_its_tricks():
    cb = lp.QuantizeMatmuls.from_name("nvfp4")
    assert cb.settings.wgrad_hadamard
    assert cb.settings.grad_output_rounding == "stochastic"
    assert cb.keep_last == 0.15
    assert cb.settings.weight.block == (16, 16)
    cb2 = lp.QuantizeMatmuls.from_name("nvfp4", wgrad_hadamard=False, keep_last=0)
    assert not cb2.settings.wgrad_hadamard
    assert cb2.keep_last == 0
    with pytest.raises(ValueError, match="matmul_wgrad_hadamard must be"):
        lp.Recipe(matmul_wgrad_hadamard="yes")


# ---- torch.compile ----------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(h) @ self.fc.weight


def test_a_model_using_it_compiles_with_fullgraph_and_computes_the_same():
    torch.manual_seed(8)
    model = nn.Sequential(Block())
    cb = lp.QuantizeMatmuls.from_name("mxfp8", modules=(nn.Linear, nn.Conv2d, Block), attention=True)
    x = torch.randn(4, 4, 6, 6)
    cb.attach(model)
    try:
        want = model(x)
        want.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        eager_counts = dict(cb.counts)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        got.square().sum().backward()
    finally:
        cb.detach()
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert eager_counts == {("0.conv", "conv"): 1, ("0.fc", "linear"): 1, ("0", "matmul"): 1}
    assert {k: v for k, v in cb.counts.items() if v} == {k: 2 * v for k, v in eager_counts.items() if v}


# ---- QuantizationMetrics per GEMM operand -----------------------------------------------------


def test_quantization_metrics_report_every_gemm_operand():
    import lightning.pytorch as pl
    from helpers import QUIET
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lowp.metrics import quantization_error_stats

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).flatten(1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 6, 6, generator=g)
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (16,), generator=g)), batch_size=16)
    qm = lp.QuantizeMatmuls(
        input="mxfp4", weight="mx(fp8_e4m3,32)", grad_output="fp8_e5m2", modules=(nn.Linear, nn.Conv2d)
    )
    metrics = lp.QuantizationMetrics(every_n_steps=1, accuracy=False)
    pl.Trainer(callbacks=[qm, metrics], **{**QUIET, "max_steps": 1}).fit(Net(), data)
    stats = metrics.last_layer_stats
    operands = ("fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight", "wgrad.grad_output", "wgrad.input")
    # the first layer's input needs no gradient: no dgrad GEMM for conv
    assert set(stats) == {f"fc/{o}" for o in operands} | {f"conv/{o}" for o in operands if not o.startswith("dgrad")}
    assert qm.observer is None  # only while a sampled step runs
    for st in stats.values():
        assert 0 <= st["saturated"] <= 1
        assert 0 <= st["flushed"] <= 1
    # 4-bit elements lose more than 8-bit ones
    assert stats["fc/fprop.input"]["sqnr_db"] < stats["fc/fprop.weight"]["sqnr_db"]
    # the figures of an operand, against it quantized by hand (x: blocks along the channels)
    fmt = "mx(fp4_e2m1,32,dim=1)"
    hand = quantization_error_stats(x, lp.quantize(x, fmt), fmt)
    assert stats["conv/fprop.input"] == pytest.approx(hand)
