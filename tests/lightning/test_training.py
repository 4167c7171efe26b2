"""End to end: LeNet learns Fashion-MNIST with the seed's block-floating-point recipe.

Needs the real data set: `apt-get install dataset-fashion-mnist` (CI installs it). Without it
this test fails, not skips, so that a CI machine missing the package is noticed.
"""

import time

import lightning.pytorch as pl
import pytest
from helpers import QUIET, on_grid

import lightning_lowp as lp
from lightning_lowp import data
from lightning_lowp.data import LeNet, MNISTFamily
from lightning_lowp.plugins import LowPrecision

STEPS = 200
BATCH = 64


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_lenet_learns_fashion_mnist_with_bfp8():
    if not data._complete(data.DEBIAN_FASHION_MNIST_DIR):
        pytest.fail(
            f"Fashion-MNIST not found in {data.DEBIAN_FASHION_MNIST_DIR}: "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    pl.seed_everything(0, verbose=False)
    dm = MNISTFamily("fashion-mnist", batch_size=BATCH, train_limit=STEPS * BATCH, val_limit=1000, download=False)
    model = LeNet()
    recorder = LossRecorder()
    activations = lp.QuantizeActivations.from_name("bfp8")
    trainer = pl.Trainer(
        plugins=[LowPrecision.from_name("bfp8")],
        callbacks=[activations, recorder],
        max_epochs=1,
        max_steps=STEPS,
        **QUIET,
    )
    (before,) = trainer.validate(model, datamodule=dm, verbose=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    elapsed = time.perf_counter() - start
    (after,) = trainer.validate(model, datamodule=dm, verbose=False)

    assert dm.dataset_name == "fashion-mnist"
    assert trainer.global_step == STEPS
    assert len(recorder.losses) == STEPS
    first, last = sum(recorder.losses[:20]) / 20, sum(recorder.losses[-20:]) / 20
    print(
        f"{STEPS} steps in {elapsed:.1f}s; loss {first:.3f} -> {last:.3f}; "
        f"val loss {before['val/loss']:.3f} -> {after['val/loss']:.3f}, "
        f"val acc {before['val/acc']:.3f} -> {after['val/acc']:.3f}"
    )
    assert first > 1.5  # starts near chance (ln 10 = 2.30)
    assert last < 0.5 * first
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert after["val/acc"] > 0.65  # chance is 0.10
    # The plugin was at work: every weight tensor lies on its bfp(8) grid.
    for name, p in model.named_parameters():
        assert on_grid(p, "bfp(8)"), name
    # ... and so did the callback: the hooks are gone after the run.
    assert not activations._handles
    assert set(activations.hooked) == {"conv1", "conv2", "fc1", "fc2"}
