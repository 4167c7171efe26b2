"""QuantizeMatmuls and the quantized GEMM functions: each operand quantized along each GEMM's axis."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp

# Blocks of 4, so that the axis a block runs along changes the result.
MX4 = "mx(fp8_e4m3,4)"
BFP4 = "bfp(4,block_size=4)"
SETTINGS = {"input": MX4, "weight": BFP4, "grad_output": MX4}


def q(t, spec, dim):
    """``t`` quantized by hand, its blocks along ``dim`` (spec: a format with blocks of 4)."""
    return lp.quantize(t, spec[:-1] + f",dim={dim})")


def linear_by_hand(x, w, b, dy):
    """The three GEMMs of y = x·Wᵀ + b with the operands quantized along K, N and M."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, w.shape[0])
    y = (q(x2, MX4, -1) @ q(w, BFP4, -1).T + b).reshape(*x.shape[:-1], w.shape[0])
    dx = (q(dy2, MX4, -1) @ q(w, BFP4, 0)).reshape(x.shape)
    dw = q(dy2, MX4, 0).T @ q(x2, MX4, 0)
    return y, dx, dw, dy2.sum(0)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Attention(nn.Module):
    """Products of two activations, as in attention (q·kᵀ), next to a linear layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, a, b):
        return self.proj(a @ b)


def loader(n=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)), 8)


def fit(model, cb, **kwargs):
    pl.Trainer(callbacks=[cb], **{**QUIET, "max_steps": 2, **kwargs}).fit(model, loader())


def test_linear_with_batch_dims_equals_the_formulas():
    torch.manual_seed(0)
    layer = nn.Linear(8, 12)
    x = torch.randn(2, 4, 8, requires_grad=True)
    dy = torch.randn(2, 4, 12)
    y = lp.quantized_linear(x, layer.weight, layer.bias, lp.MatmulSettings(**SETTINGS))
    y.backward(dy)
    want_y, want_dx, want_dw, want_db = linear_by_hand(x.detach(), layer.weight.detach(), layer.bias.detach(), dy)
    assert torch.equal(y, want_y)
    assert torch.equal(x.grad, want_dx)
    assert torch.equal(layer.weight.grad, want_dw)
    assert torch.equal(layer.bias.grad, want_db)  # the bias is not quantized


def test_the_callback_applies_the_same_formulas_to_an_unmodified_module():
    torch.manual_seed(0)
    model = Net()
    cb = lp.QuantizeMatmuls(**SETTINGS, names=["fc1"])
    cb.attach(model)
    try:
        x = torch.randn(3, 2, 8, requires_grad=True)
        h = model.fc1(x)
        dy = torch.randn_like(h)
        h.backward(dy)
    finally:
        cb.detach()
    want_y, want_dx, want_dw, _ = linear_by_hand(x.detach(), model.fc1.weight.detach(), model.fc1.bias.detach(), dy)
    assert torch.equal(h, want_y)
    assert torch.equal(x.grad, want_dx)
    assert torch.equal(model.fc1.weight.grad, want_dw)
    assert cb.counts == {("fc1", "linear"): 1}


def test_the_wrong_axis_gives_a_different_result():
    torch.manual_seed(0)
    w = torch.randn(12, 8, requires_grad=True)
    x, dy = torch.randn(8, 8), torch.randn(8, 12)
    lp.quantized_linear(x, w, None, lp.MatmulSettings(**SETTINGS)).backward(dy)
    assert torch.equal(w.grad, q(dy, MX4, 0).T @ q(x, MX4, 0))  # along M
    assert not torch.equal(w.grad, q(dy, MX4, -1).T @ q(x, MX4, -1))  # along the last dim instead
    dx = lp.quantized_linear(x.requires_grad_(), w, None, lp.MatmulSettings(**SETTINGS))
    (gx,) = torch.autograd.grad(dx, x, dy)
    assert not torch.equal(gx, q(dy, MX4, -1) @ q(w.detach(), BFP4, -1))  # W along K instead of N


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, a, b):
        return self.attn(a, b)


@pytest.mark.parametrize("attention", [False, True])
def test_attention_matmuls_are_quantized_only_when_switched_on(attention):
    torch.manual_seed(0)
    model = Outer()
    a = torch.randn(2, 4, 8, requires_grad=True)
    b = torch.randn(2, 8, 8, requires_grad=True)
    cb = lp.QuantizeMatmuls(input=MX4, weight=MX4, grad_output=MX4, modules=(Attention,), attention=attention)
    cb.attach(model)
    try:
        out = model(a, b)
        dy = torch.randn_like(out)
        out.backward(dy)
    finally:
        cb.detach()
    # Recompute by hand: the product (quantized or not), then proj's linear with its operands quantized.
    ad, bd = a.detach(), b.detach()
    prod = q(ad, MX4, -1) @ q(bd, MX4, -2) if attention else ad @ bd
    w, bias = model.attn.proj.weight.detach(), model.attn.proj.bias.detach()
    x2, dy2 = prod.reshape(-1, 8), dy.reshape(-1, 8)
    want = (q(x2, MX4, -1) @ q(w, MX4, -1).T + bias).reshape(out.shape)
    assert torch.equal(out, want)
    dprod = (q(dy2, MX4, -1) @ q(w, MX4, 0)).reshape(prod.shape)
    if attention:
        want_da = q(dprod, MX4, -1) @ q(bd, MX4, -1).mT
        want_db = q(ad, MX4, -2).mT @ q(dprod, MX4, -2)
    else:
        want_da, want_db = dprod @ bd.mT, ad.mT @ dprod
    assert torch.equal(a.grad, want_da)
    assert torch.equal(b.grad, want_db)
    expected = {("attn", "linear"): 1} | ({("attn", "matmul"): 1} if attention else {})
    assert cb.counts == expected  # the Linear inside attn is not selected: attn's settings apply to it


def test_quantized_matmul_broadcasts_and_handles_vectors_like_torch():
    torch.manual_seed(0)
    none = lp.MatmulSettings()
    for sa, sb in [((8,), (8,)), ((8,), (2, 8, 3)), ((2, 4, 8), (8,)), ((1, 4, 8), (3, 8, 2)), ((3, 4, 8), (8, 5))]:
        a, b = torch.randn(*sa, requires_grad=True), torch.randn(*sb, requires_grad=True)
        got, want = lp.quantized_matmul(a, b, none), torch.matmul(a, b)
        assert got.shape == want.shape
        g = torch.randn_like(want)
        for x, y in zip(torch.autograd.grad(got, (a, b), g), torch.autograd.grad(want, (a, b), g), strict=True):
            torch.testing.assert_close(x, y)


def test_fit_attaches_and_detaches_and_leaves_the_model_alone():
    model = Net()
    keys = list(model.state_dict())
    cb = lp.QuantizeMatmuls.from_name("mxfp8", overrides={"head": {"input": "bf16", "weight": "bf16"}})
    fit(model, cb)
    assert set(cb.hooked) == {"fc1", "head"}
    assert cb.hooked["head"].input == lp.parse_format("bf16")
    assert cb.hooked["head"].grad_output == lp.get_recipe("mxfp8").matmul_grad_output
    assert cb.counts[("fc1", "linear")] == 2
    assert cb.counts[("head", "linear")] == 2
    assert list(model.state_dict()) == keys
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left after fit"
    assert not torch._C._is_torch_function_mode_enabled()


def test_overrides_apply_per_module():
    torch.manual_seed(0)
    model = Net()
    cb = lp.QuantizeMatmuls(**SETTINGS, overrides={"head": {"input": "bf16", "weight": "bf16", "grad_output": None}})
    cb.attach(model)
    try:
        h = torch.randn(5, 12)
        y = model.head(h)
    finally:
        cb.detach()
    w, b = model.head.weight.detach(), model.head.bias.detach()
    assert torch.equal(y, lp.quantize(h, "bf16") @ lp.quantize(w, "bf16").T + b)


def test_quantize_eval_false_and_disabled_leave_float():
    model = Net().eval()
    x = torch.randn(4, 8)
    want = model(x)
    cb = lp.QuantizeMatmuls(**SETTINGS, quantize_eval=False)
    cb.attach(model)
    try:
        assert torch.equal(model(x), want)
        model.train()
        assert not torch.equal(model(x), want)
        with cb.disabled():
            assert torch.equal(model(x), want)
    finally:
        cb.detach()


def test_an_error_inside_forward_leaves_no_interception():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model = nn.Sequential(Broken())
    cb = lp.QuantizeMatmuls(**SETTINGS, modules=(Broken,))
    cb.attach(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 8))
    assert not cb._stack
    assert not torch._C._is_torch_function_mode_enabled()
    cb.detach()


def test_recipes():
    assert {"mxfp8", "mxfp4", "nvfp4", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise"} <= set(lp.list_recipes())
    mxfp8 = lp.QuantizeMatmuls.from_name("mxfp8").settings
    assert mxfp8.input == mxfp8.weight == mxfp8.grad_output == lp.ScaledFormat("fp8_e4m3", 32, scale_rounding="rceil")
    nvfp4 = lp.QuantizeMatmuls(recipe="nvfp4").settings
    assert nvfp4.input == lp.parse_format("nvfp4")
    assert nvfp4.weight.block == (16, 16)
    assert nvfp4.grad_output_rounding == "stochastic"
    tensorwise = lp.get_recipe("fp8_tensorwise")
    assert str(tensorwise.matmul_grad_output) == "mx(fp8_e5m2,tensor,scale=fp32)"
    blockwise = lp.get_recipe("fp8_blockwise")
    assert blockwise.matmul_input.block == 128
    assert blockwise.matmul_weight.block == (128, 128)
    assert lp.get_recipe("bfp8").matmul_input is None  # the earlier recipes leave GEMM operands alone
    assert lp.QuantizeMatmuls.from_name("mxfp8", weight="bf16").settings.weight == lp.parse_format("bf16")


def test_bad_input_is_an_error_at_setup():
    with pytest.raises(ValueError, match="fixes dim=0"):
        lp.QuantizeMatmuls(input="mx(fp8_e4m3,32,dim=0)")
    with pytest.raises(ValueError, match="fixes dim=1"):
        lp.MatmulSettings(weight="bfp(8,dim=1)")
    with pytest.raises(ValueError, match="unknown keys \\['forward'\\]"):
        lp.QuantizeMatmuls(**SETTINGS, overrides={"head": {"forward": "bf16"}})
    with pytest.raises(ValueError, match="unknown arguments"):
        lp.QuantizeMatmuls.from_name("mxfp8", activation="bf16")
    with pytest.raises(ValueError, match="sets no GEMM operand"):
        lp.QuantizeMatmuls.from_name("bfp8")
    with pytest.raises(ValueError, match="either recipe"):
        lp.QuantizeMatmuls(input="bf16", recipe="mxfp8")
    with pytest.raises(ValueError, match="is not a rounding mode"):
        lp.QuantizeMatmuls(input="bf16", input_rounding="sideways")
    with pytest.raises(TypeError, match="MatmulSettings"):
        lp.quantized_linear(torch.randn(2, 8), torch.randn(4, 8), None, {"input": "bf16"})
    for bad in ({"names": ["fc9"]}, {"overrides": {"fc9": {"input": "bf16"}}}):
        model = Net()
        before = model.fc1.weight.detach().clone()
        with pytest.raises(ValueError, match="fc9"):
            fit(model, lp.QuantizeMatmuls(**SETTINGS, **bad))
        assert torch.equal(model.fc1.weight, before)  # refused before the first step


def test_nested_selected_modules_use_the_innermost_settings():
    torch.manual_seed(0)
    model = Outer()
    cb = lp.QuantizeMatmuls(
        **SETTINGS, modules=(Attention, nn.Linear), attention=True, overrides={"attn.proj": {"input": "bf16"}}
    )
    cb.attach(model)
    try:
        a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 8)
        out = model(a, b)
        outside = a @ b  # not inside a selected module: float
    finally:
        cb.detach()
    assert torch.equal(outside, torch.matmul(a, b))
    prod = q(a, MX4, -1) @ q(b, BFP4, -2)
    w, bias = model.attn.proj.weight.detach(), model.attn.proj.bias.detach()
    want = (lp.quantize(prod.reshape(-1, 8), "bf16") @ q(w, BFP4, -1).T + bias).reshape(out.shape)
    assert torch.equal(out, want)
    assert cb.counts == {("attn", "matmul"): 1, ("attn.proj", "linear"): 1}


def test_a_yaml_config_picks_the_recipe(tmp_path):
    yaml = pytest.importorskip("yaml")
    from lightning.pytorch.cli import LightningCLI

    callbacks = [{"class_path": "lightning_lowp.QuantizeMatmuls", "init_args": {"recipe": "fp8_blockwise"}}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trainer": {**QUIET, "callbacks": callbacks}}))
    cli = LightningCLI(Net, args=["--config", str(path)], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, lp.QuantizeMatmuls)]
    assert cb.settings.weight == lp.parse_format("fp8_blockwise_128x128")


def test_from_recipe_builds_the_parts_a_recipe_sets():
    plugins, callbacks = lp.from_recipe("bfp8")
    assert [type(p) for p in plugins] == [lp.LowPrecision]
    assert [type(c) for c in callbacks] == [lp.QuantizeActivations]
    plugins, callbacks = lp.from_recipe("nvfp4", matmuls={"modules": (nn.Linear, nn.Conv2d)})
    assert plugins == []
    assert [type(c) for c in callbacks] == [lp.QuantizeMatmuls]
    assert callbacks[0].module_types == (nn.Linear, nn.Conv2d)
    lp.register_recipe("both_kinds", lp.Recipe(weight="bf16", matmul_input="mxfp8_e4m3"), overwrite=True)
    plugins, callbacks = lp.from_recipe("both_kinds")
    assert len(plugins) == 1
    assert [type(c) for c in callbacks] == [lp.QuantizeMatmuls]
    with pytest.raises(ValueError, match="sets no matmul_input"):
        lp.from_recipe("bfp8", matmuls={"modules": (nn.Linear,)})
    with pytest.raises(ValueError, match="unknown recipe"):
        lp.from_recipe("fp9")
