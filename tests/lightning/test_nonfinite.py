"""LowPrecision(nonfinite=...): a NaN or infinite gradient or weight skips the step, raises, or is ignored."""

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET, bits
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
import lightning_lowp.plugins as plugins
from lightning_lowp.plugins import NonFiniteError

BATCHES = 5


def loader(n=BATCHES, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4 * n, 8, generator=g), torch.randint(0, 4, (4 * n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


class Net(pl.LightningModule):
    """A tiny MLP whose gradient of ``net.2.weight`` gets a NaN after the backward of the steps ``nan_at``."""

    def __init__(self, nan_at=(), optimizer="adam", lr=1e-2):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.nan_at, self.optimizer_name, self.lr = set(nan_at), optimizer, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_after_backward(self):
        if self.global_step in self.nan_at:
            self.net[2].weight.grad[1, 3] = float("nan")

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def snapshot(module, optimizer, plugin):
    """Bit patterns of the weights, master weights and optimizer state (tensors and plain values), by name."""
    names = {p: n for n, p in module.named_parameters()}
    state = {
        names[p]: {k: bits(v).clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }
    return {
        "weights": {n: bits(p).clone() for n, p in module.named_parameters()},
        "masters": {names[p]: bits(m).clone() for p, m in plugin._master_weights.items()},
        "state": state,
    }


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


class Around(pl.Callback):
    """Snapshots just before the optimizer step of `step` (after backward) and just after it."""

    def __init__(self, plugin, step):
        self.plugin, self.step, self.before, self.after = plugin, step, None, None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == self.step:
            self.before = snapshot(module, optimizer, self.plugin)

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step == self.step + 1:  # Lightning counts a skipped step, as with AMP
            self.after = snapshot(module, trainer.optimizers[0], self.plugin)


def fit(module, plugin, data=None, callbacks=(), ckpt_path=None, max_epochs=1, **kwargs):
    trainer = pl.Trainer(**{**QUIET, **kwargs}, max_epochs=max_epochs, plugins=[plugin], callbacks=list(callbacks))
    trainer.fit(module, data or loader(), ckpt_path=ckpt_path)
    return trainer


def plugin_with_every_role(**kwargs):
    return lp.LowPrecision(weight="bfp(8)", grad="bfp(8)", optimizer_state="bf16", master_weight="bf16", **kwargs)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("step", [0, 2])  # the first step (no optimizer state, no master weights yet) and a later one
def test_skip_leaves_weights_master_weights_and_optimizer_state_bit_identical(step, optimizer, tmp_path):
    plugin = plugin_with_every_role()
    assert plugin.nonfinite == "skip"  # the default
    around = Around(plugin, step)
    model = Net(nan_at={step}, optimizer=optimizer)
    logger = CSVLogger(tmp_path, name="", version="")
    with pytest.warns(UserWarning, match=r"skipped a step: the grad of parameter 'net\.2\.weight' was not finite"):
        trainer = fit(model, plugin, callbacks=[around], logger=logger, log_every_n_steps=1)

    assert around.before is not None
    assert around.after is not None
    assert same(around.before, around.after)
    if step == 0:
        assert around.after["state"] == {}
        assert around.after["masters"] == {}
    # training went on: every step after the skipped one changed the weights, which stay finite
    assert trainer.global_step == BATCHES
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not same(around.after["weights"], snapshot(model, trainer.optimizers[0], plugin)["weights"])
    assert plugin.nonfinite_steps == 1
    assert plugin.state_dict()["nonfinite_steps"] == 1
    assert trainer.callback_metrics["lowp/nonfinite_steps"].item() == 1
    with open(tmp_path / "metrics.csv") as f:
        logged = [row["lowp/nonfinite_steps"] for row in csv.DictReader(f) if row.get("lowp/nonfinite_steps")]
    assert len(logged) == BATCHES - step  # from the skipped step on
    assert {float(v) for v in logged} == {1.0}


def test_a_skipped_step_is_as_if_its_batch_was_not_there():
    """With nearest rounding, a run whose step 1 is skipped ends bit for bit where a run without
    that batch ends: the step left nothing behind (Adam's step count included)."""
    data = list(loader())
    skipped = Net(nan_at={1})
    with pytest.warns(UserWarning, match="skipped a step"):
        fit(skipped, plugin_with_every_role(), data=DataLoader(data, batch_size=None))
    clean = Net()
    fit(clean, plugin_with_every_role(), data=DataLoader(data[:1] + data[2:], batch_size=None))
    for a, b in zip(skipped.parameters(), clean.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b))


def test_error_names_the_parameter_and_the_role():
    plugin = plugin_with_every_role(nonfinite="error")
    with pytest.raises(NonFiniteError, match=r"the grad of parameter 'net\.2\.weight' holds \d+ NaN") as info:
        fit(Net(nan_at={2}), plugin)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert (err.name, err.role, err.step) == ("net.2.weight", "grad", 2)
    assert "after quantizing to grad=" in str(err)
    assert "at step 2" in str(err)
    assert plugin.nonfinite_steps == 1


def test_ignore_lets_the_nan_into_the_weights_as_float_training_does():
    plugin = plugin_with_every_role(nonfinite="ignore")
    model = Net(nan_at={2})
    trainer = fit(model, plugin)
    assert torch.isnan(model.net[2].weight).any()
    assert plugin.nonfinite_steps == 0
    assert "lowp/nonfinite_steps" not in trainer.callback_metrics


def test_a_weight_that_overflows_its_format_is_found_as_a_weight():
    """Finite gradients, but a learning rate that takes the weights beyond fp16's 65504: inf."""
    with pytest.raises(NonFiniteError, match=r"the weight of parameter 'net\.\d\.(weight|bias)' .*weight=") as info:
        fit(Net(optimizer="sgd", lr=1e7), lp.LowPrecision(weight="fp16", nonfinite="error"))
    assert info.value.role == "weight"
    assert info.value.step == 0

    plugin = lp.LowPrecision(weight="fp16")
    around = Around(plugin, 0)
    model = Net(optimizer="sgd", lr=1e7)
    with pytest.warns(UserWarning, match="the weight of parameter"):
        fit(model, plugin, callbacks=[around])
    assert same(around.before, around.after)
    assert plugin.nonfinite_steps == BATCHES  # every step overflows: each is skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_master_weight_that_overflows_is_found_although_the_weight_saturates():
    """fp8_e4m3 saturates at 448, so the weight stays finite; the fp16 master copy overflows to inf."""
    plugin = lp.LowPrecision(weight="fp8_e4m3", master_weight="fp16", nonfinite="error")
    with pytest.raises(NonFiniteError, match=r"master_weight of parameter .* master_weight=") as info:
        fit(Net(optimizer="sgd", lr=1e7), plugin)
    assert info.value.role == "master_weight"


def test_the_count_is_saved_in_checkpoints_and_restored(tmp_path):
    plugin = lp.LowPrecision.from_name("bfp8")
    with pytest.warns(UserWarning, match="skipped a step"):
        trainer = fit(Net(nan_at={1}), plugin)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["LowPrecision"]["nonfinite_steps"] == 1

    fresh = lp.LowPrecision.from_name("bfp8")
    fresh.load_state_dict(plugin.state_dict())
    assert fresh.nonfinite_steps == 1
    fresh.load_state_dict({})  # a checkpoint from before the count
    assert fresh.nonfinite_steps == 0

    resumed = lp.LowPrecision.from_name("bfp8")
    with pytest.warns(UserWarning, match="skipped a step"):  # global step 7 is the third of epoch 2
        trainer = fit(Net(nan_at={BATCHES + 2}), resumed, ckpt_path=tmp_path / "epoch1.ckpt", max_epochs=2)
    assert resumed.nonfinite_steps == 2
    assert trainer.callback_metrics["lowp/nonfinite_steps"].item() == 2


def test_the_argument_is_validated_and_from_name_takes_it():
    assert lp.LowPrecision().nonfinite == "skip"
    for bad in ["warn", None, True]:
        with pytest.raises(ValueError, match=r"nonfinite must be one of 'skip', 'error', 'ignore'; got"):
            lp.LowPrecision(nonfinite=bad)
    assert lp.LowPrecision.from_name("bfp8", nonfinite="error").nonfinite == "error"
    assert lp.LowPrecision.from_name("bfp8").nonfinite == "skip"
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        lp.LowPrecision.from_name("bfp8", nonfinite="Skip")
    assert "nonfinite='ignore'" in repr(lp.LowPrecision(nonfinite="ignore"))


def test_the_check_is_one_call_over_every_gradient_weight_and_master_weight(monkeypatch):
    calls = []
    real = plugins._all_finite
    monkeypatch.setattr(
        plugins, "_all_finite", lambda tensors, sharded=False: calls.append(len(tensors)) or real(tensors, sharded)
    )
    fit(Net(), plugin_with_every_role())
    assert calls == [3 * 4] * BATCHES  # 4 parameters: their grads, weights and master weights

    calls.clear()
    fit(Net(), plugin_with_every_role(nonfinite="ignore"))
    assert calls == []


def test_all_finite_sees_nan_and_inf_and_no_overflow():
    big = torch.full((1000,), 3e38)  # its 2-norm overflows float32; its max-norm does not
    assert plugins._all_finite([big, torch.zeros(0), torch.ones(2, 3)])
    assert not plugins._all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not plugins._all_finite([torch.tensor(float("-inf"))])
    assert plugins._all_finite([])
