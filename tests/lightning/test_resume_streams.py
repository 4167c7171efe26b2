"""Exact resume of every random stream: a run stopped at an epoch boundary or in the middle of
an epoch and resumed from its checkpoint (in a process that seeds torch differently and draws
other random numbers first) ends with the same weights, bit for bit, as the uninterrupted run,
with stochastic rounding in every role: the plugin's grads, weights and optimizer state, the
activation callback's activations and errors, the GEMM callback's operands and accumulation.
Dropping any one saved state from the checkpoint breaks it (the mutation check)."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET
from test_plugin import Module, batches, param_bits
from torch import nn

import lightning_lowp as lp

SR = "stochastic"


def components():
    plugin = lp.LowPrecision.from_name(
        "bfp8", grad_rounding=SR, weight_rounding=SR, optimizer_state_rounding=SR, master_weight=lp.FloatingPoint(8, 10)
    )
    activations = lp.QuantizeActivations(
        forward="fp8_e4m3", backward="fp8_e5m2", forward_rounding=SR, backward_rounding=SR, modules=(nn.ReLU,)
    )
    matmuls = lp.QuantizeMatmuls(
        input="fp8_e4m3",
        weight="fp8_e4m3",
        grad_output="fp8_e5m2",
        input_rounding=SR,
        grad_output_rounding=SR,
        accumulate="fp16",
        accumulate_rounding=SR,
    )
    return [plugin], [activations, matmuls]


class ResumableLoader:
    """The batches in order, resumable mid-epoch (Lightning saves and restores its state_dict)."""

    def __init__(self, data):
        self.data, self.start, self.position = data, 0, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        start, self.start = self.start, 0
        for position in range(start, len(self.data)):
            self.position = position
            yield self.data[position]

    def state_dict(self):
        return {"next": (self.position + 1) % len(self.data)}  # 0 after the last batch

    def load_state_dict(self, state):
        self.start = state["next"]


def fit(module, *, plugins, callbacks, ckpt_path=None):
    trainer = pl.Trainer(max_epochs=3, plugins=plugins, callbacks=callbacks, **QUIET)
    trainer.fit(module, ResumableLoader(DATA), ckpt_path=ckpt_path)
    return trainer


class StopAt(pl.Callback):
    """Saves a checkpoint after global step `step` and stops the run there."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


DATA = batches(n=4, shape=(16,))  # 4 steps an epoch


def net():
    torch.manual_seed(0)  # the same initial weights in every run (the runs' seeds are set after)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def straight_run():
    module = Module(net())
    torch.manual_seed(5)  # the seed the components derive their streams from
    plugins, callbacks = components()
    fit(module, plugins=plugins, callbacks=callbacks)
    return param_bits(module)


def stopped_run(step, path):
    module = Module(net())
    torch.manual_seed(5)
    plugins, callbacks = components()
    fit(module, plugins=plugins, callbacks=[*callbacks, StopAt(step, path)])
    return param_bits(module)


def resumed_run(path):
    module = Module(net())
    torch.manual_seed(123)  # another seed, and other random numbers drawn first
    torch.rand(1000)
    plugins, callbacks = components()
    fit(module, plugins=plugins, callbacks=callbacks, ckpt_path=path)
    return param_bits(module)


@pytest.fixture(scope="module")
def straight():
    return straight_run()


@pytest.mark.parametrize("step", [4, 6], ids=["epoch_boundary", "mid_epoch"])
def test_resume_is_bit_exact(tmp_path, straight, step):
    path = tmp_path / "stop.ckpt"
    stopped = stopped_run(step, path)
    assert not all(torch.equal(a, b) for a, b in zip(stopped, straight, strict=True))  # it did stop early
    resumed = resumed_run(path)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


def _drop_plugin_generator(ckpt):
    del ckpt["LowPrecision"]["generator"]


def _drop_activation_seed(ckpt):
    key = next(k for k in ckpt["callbacks"] if k.startswith("QuantizeActivations"))
    del ckpt["callbacks"][key]


def _drop_matmul_seed(ckpt):
    key = next(k for k in ckpt["callbacks"] if k.startswith("QuantizeMatmuls"))
    del ckpt["callbacks"][key]


@pytest.mark.parametrize("drop", [_drop_plugin_generator, _drop_activation_seed, _drop_matmul_seed])
def test_every_saved_stream_is_needed(tmp_path, straight, drop):
    path = tmp_path / "stop.ckpt"
    stopped_run(4, path)
    ckpt = torch.load(path, weights_only=True)
    drop(ckpt)
    torch.save(ckpt, path)
    resumed = resumed_run(path)
    assert not all(torch.equal(a, b) for a, b in zip(resumed, straight, strict=True))


def test_streams_do_not_depend_on_the_users_draws():
    # the same seed, but the user's code draws random numbers between steps: same weights
    class Drawing(Module):
        def training_step(self, batch, batch_idx):
            torch.rand(17)  # e.g. dropout masks or data augmentation
            return super().training_step(batch, batch_idx)

    plain = Module(net())
    torch.manual_seed(5)
    plugins, callbacks = components()
    fit(plain, plugins=plugins, callbacks=callbacks)
    drawing = Drawing(copy.deepcopy(net()))
    torch.manual_seed(5)
    plugins, callbacks = components()
    fit(drawing, plugins=plugins, callbacks=callbacks)
    for a, b in zip(param_bits(plain), param_bits(drawing), strict=True):
        assert torch.equal(a, b)
