"""QuantizeActivations on a small LightningModule, and the recipe registry."""

import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET, on_grid
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp


class TinyNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 3)
        self.seen = {}  # module name -> last output, recorded after every hook ran

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(*callbacks, **kwargs):
    defaults = {**QUIET, "max_steps": 2, "limit_val_batches": 1}
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class Recorder(pl.Callback):
    """Registers forward hooks *after* QuantizeActivations, so it sees the quantized outputs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not getattr(self, "handles", None):
            self.handles = [
                m.register_forward_hook(lambda mod, a, out, n=n: pl_module.seen.__setitem__(n, out.detach()))
                for n, m in pl_module.named_modules()
                if n
            ]

    def teardown(self, trainer, pl_module, stage):
        for h in getattr(self, "handles", []):
            h.remove()
        self.handles = []


def test_activations_are_quantized_in_training_and_hooks_removed_after():
    model = TinyNet()
    cb = lp.QuantizeActivations(forward="fixed(8,4)", backward="bf16")
    trainer(cb, Recorder()).fit(model, loader(), loader())
    assert set(cb.hooked) == {"conv1", "pool", "fc1", "fc2"}
    for name in ("conv1", "pool", "fc1", "fc2"):
        assert on_grid(model.seen[name], "fixed(8,4)"), name
    assert not any(m._forward_hooks for m in model.modules()), "hooks left after fit"
    assert not on_grid(model.conv1(torch.randn(2, 1, 8, 8)), "fixed(8,4)")  # float again


def test_errors_are_quantized_backward():
    model = TinyNet()
    cb = lp.QuantizeActivations(forward=None, backward="fixed(8,2)", modules=(nn.Linear,))
    grads = {}
    cb.attach(model)

    def watch_raw_output(module, args, out):  # runs before the quantizer's hook (prepend)
        out.register_hook(lambda g: grads.__setitem__("fc1_out", g))

    handle = model.fc1.register_forward_hook(watch_raw_output, prepend=True)
    out = model(torch.randn(4, 1, 8, 8))
    out.backward(torch.randn_like(out) * 0.37)
    handle.remove()
    cb.detach()
    # the gradient reaching fc1's own output went through the quantizer hooked on fc1
    assert on_grid(grads["fc1_out"], "fixed(8,2)")
    assert grads["fc1_out"].abs().sum() > 0
    assert cb.hooked == {
        "fc1": (None, lp.parse_format("fixed(8,2)"), "nearest", "nearest"),
        "fc2": (None, lp.parse_format("fixed(8,2)"), "nearest", "nearest"),
    }


def test_selection_by_names_predicate_and_overrides():
    model = TinyNet()
    cb = lp.QuantizeActivations(forward="bf16", names=["fc*"], overrides={"fc2": {"forward": None, "backward": "fp16"}})
    hooked = cb.select(model)
    assert set(hooked) == {"fc1", "fc2"}
    assert hooked["fc2"][:2] == (None, lp.parse_format("fp16"))
    only_conv = lp.QuantizeActivations(forward="bf16", modules=None, predicate=lambda n, m: n.startswith("conv"))
    assert set(only_conv.select(model)) == {"conv1"}


def test_eval_quantization_can_be_switched_off():
    model = TinyNet()
    x = torch.randn(3, 1, 8, 8)
    cb = lp.QuantizeActivations(forward="fixed(6,2)", quantize_eval=False)
    cb.attach(model)
    model.eval()
    assert not on_grid(model(x), "fixed(6,2)")
    model.train()
    assert on_grid(model(x), "fixed(6,2)")
    with cb.disabled():
        assert not on_grid(model(x), "fixed(6,2)")
    cb.detach()


def test_from_name_takes_the_recipe():
    cb = lp.QuantizeActivations.from_name("bfp8")
    assert cb.settings == (lp.BlockFloatingPoint(8), lp.BlockFloatingPoint(8), "nearest", "nearest")
    with pytest.raises(ValueError, match="known recipes: bf16, bfp8, fixed8"):
        lp.QuantizeActivations.from_name("bfp9")


def test_bad_input_fails_at_setup_not_in_training():
    with pytest.raises(ValueError, match="does not parse"):
        lp.QuantizeActivations(forward="fixed(8")
    with pytest.raises(ValueError, match="backward_rounding"):
        lp.QuantizeActivations(forward="bf16", backward_rounding="random")
    with pytest.raises(ValueError, match="unknown keys"):
        lp.QuantizeActivations(forward="bf16", overrides={"fc1": {"format": "bf16"}})
    model = TinyNet()
    steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    cb = lp.QuantizeActivations(forward="bf16", names=["encoder.*"])
    with pytest.raises(ValueError, match=re.escape("'encoder.*' matches no module")):
        trainer(cb, CountSteps()).fit(model, loader())
    assert steps == []
    assert not any(m._forward_hooks for m in model.modules())


def test_recipe_registry():
    assert {"fixed8", "bfp8", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"} <= set(lp.list_recipes())
    seed = lp.get_recipe("fixed8")
    assert seed.weight == seed.grad == seed.activation == seed.error == lp.FixedPoint(8, 7)
    assert seed.optimizer_state == seed.master_weight == lp.parse_format("bf16")
    custom = lp.Recipe(weight="fp8_e4m3", grad="fp8_e5m2", grad_rounding="stochastic")
    lp.register_recipe("test_custom", custom, overwrite=True)
    assert lp.get_recipe("test_custom").grad == lp.parse_format("fp8_e5m2")
    with pytest.raises(ValueError, match="exists already"):
        lp.register_recipe("test_custom", custom)
    with pytest.raises(ValueError, match="grad_rounding"):
        lp.Recipe(grad="bf16", grad_rounding="sideways")


def test_recipe_argument_equals_from_name():
    assert lp.QuantizeActivations(recipe="fixed8").settings == lp.QuantizeActivations.from_name("fixed8").settings
    with pytest.raises(ValueError, match="either recipe"):
        lp.QuantizeActivations(forward="bf16", recipe="bfp8")


def test_error_only_quantization_is_followed_by_an_in_place_relu():
    """forward=None gives a tensor the next layer may modify in place (VGG's ReLU(inplace=True))."""
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    cb = lp.QuantizeActivations(forward=None, backward="fixed(8,2)")
    cb.attach(net)
    x = torch.randn(4, 6)
    out = net(x)
    out.sum().backward()
    cb.detach()
    assert net[0].weight.grad is not None
    assert net[0].weight.grad.abs().sum() > 0
    # the ways to ask for error-only quantization all give a tensor that can be written in place
    from lightning_lowp.compat import qtorch

    for q in (lp.quantizer(forward=None, backward="bf16"), qtorch.quantizer(forward_number=None)):
        z = q(torch.randn(3, requires_grad=True) * 1.0)
        z.relu_()
        z.sum().backward()


def test_modules_returning_tuples_have_every_float_output_quantized():
    lstm = nn.LSTM(4, 6, batch_first=True)
    attention = nn.MultiheadAttention(6, 2, batch_first=True)
    model = nn.ModuleDict({"lstm": lstm, "attention": attention})
    cb = lp.QuantizeActivations(forward="fixed(8,4)", modules=(nn.LSTM, nn.MultiheadAttention))
    cb.attach(model)
    x = torch.randn(2, 5, 4) * 3
    out, (h, c) = lstm(x)
    attended, weights = attention(out, out, out)
    cb.detach()
    assert set(cb.hooked) == {"lstm", "attention"}
    for name, t in {"output": out, "h_n": h, "c_n": c, "attention": attended, "weights": weights}.items():
        assert on_grid(t.detach(), "fixed(8,4)"), name
    assert not on_grid(lstm(x)[0].detach(), "fixed(8,4)")  # the hooks are gone


def test_from_name_takes_overrides_of_the_callbacks_own_arguments():
    """As LowPrecision.from_name: a recipe with one setting changed."""
    cb = lp.QuantizeActivations.from_name("bfp8", backward_rounding="stochastic")
    assert cb.settings == (lp.BlockFloatingPoint(8), lp.BlockFloatingPoint(8), "nearest", "stochastic")
    cb = lp.QuantizeActivations.from_name("fixed8_roles", forward=None, names=["fc*"], quantize_eval=False)
    assert cb.settings == (None, lp.FixedPoint(8, 12), "nearest", "stochastic")  # the recipe's error settings
    assert (cb.names, cb.quantize_eval) == (["fc*"], False)
    assert set(cb.select(TinyNet())) == {"fc1", "fc2"}
    for bad in ({"activation": "bf16"}, {"recipe": "bf16"}, {"forward_round": "up"}):
        with pytest.raises(ValueError, match=r"unknown arguments .*; accepted: forward, backward, forward_rounding"):
            lp.QuantizeActivations.from_name("bfp8", **bad)
    with pytest.raises(ValueError, match="backward_rounding"):
        lp.QuantizeActivations.from_name("bfp8", backward_rounding="sideways")


def test_a_selection_of_no_module_warns_once_per_run():
    model = TinyNet()
    cb = lp.QuantizeActivations(forward="bf16", modules=(nn.LSTM,))
    with pytest.warns(UserWarning, match="QuantizeActivations selected no module of TinyNet") as record:
        trainer(cb, val_check_interval=1).fit(model, loader(), loader())  # attach() at fit and each validation
    messages = [str(w.message) for w in record if "selected no module" in str(w.message)]
    assert len(messages) == 1
    assert "modules: LSTM" in messages[0]
    assert "conv1 (Conv2d)" in messages[0]  # what there is to select
    assert cb.hooked == {}
