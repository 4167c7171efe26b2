"""Checkpoints of a low-precision run load with ``torch.load(path, weights_only=True)``.

Every piece of state the package puts in a checkpoint (the plugin's generator state and master
weights, the callbacks' state, the data module's hyperparameters) is made of tensors and plain
Python values, so a checkpoint from an untrusted source can be opened without running code.
"""

import pickle

import lightning.pytorch as pl
import pytest
import torch
from helpers import MNIST_LIKE, QUIET, write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_lowp as lp


def _trainer(ckpt_dir, max_epochs: int) -> tuple[pl.Trainer, lp.LowPrecision]:
    plugin = lp.LowPrecision.from_name("bfp8", grad_rounding="stochastic")
    callbacks = [
        lp.QuantizeActivations.from_name("bfp8", forward_rounding="stochastic", backward_rounding="stochastic"),
        lp.QuantizeMatmuls.from_name("mxfp8"),
        lp.QuantizationMetrics(),
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True),
    ]
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        plugins=[plugin],
        callbacks=callbacks,
        limit_val_batches=1,
        **{**QUIET, "enable_checkpointing": True},
    )
    return trainer, plugin


def test_checkpoints_load_with_weights_only_and_resume(tmp_path, monkeypatch):
    pl.seed_everything(0, verbose=False)
    data_dir = write_dataset(tmp_path / "d", MNIST_LIKE, n_train=32, n_test=16)  # a Path, as users pass it
    dm = lp.MNISTFamily("mnist", data_dir=data_dir, batch_size=16, download=False)  # 2 steps an epoch
    model = lp.LeNet()
    trainer, _ = _trainer(tmp_path / "ckpts", max_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    trainer.save_checkpoint(tmp_path / "manual.ckpt")

    names = {name for name, _ in model.named_parameters()}
    for path in (tmp_path / "manual.ckpt", tmp_path / "ckpts" / "last.ckpt"):
        ckpt = torch.load(path, weights_only=True)  # raises on any pickled object other than plain data
        state = ckpt["LowPrecision"]
        assert {"generator", "master_weights"} <= set(state)  # (other keys: also plain data)
        assert state["generator"].dtype == torch.uint8
        assert set(state["master_weights"]) == names
        assert all(t.dtype == torch.float32 for t in state["master_weights"].values())
        assert ckpt["datamodule_hyper_parameters"]["data_dir"] == str(data_dir)
        assert ckpt["optimizer_states"]
        assert ckpt["callbacks"]

    # Lightning itself resumes from it with weights_only=True, restoring the plugin's state
    resumed_trainer, plugin = _trainer(tmp_path / "resumed", max_epochs=2)
    loaded: list[dict] = []
    original = plugin.load_state_dict

    def spy(state_dict):
        loaded.append(state_dict)
        original(state_dict)

    monkeypatch.setattr(plugin, "load_state_dict", spy)
    dm = lp.MNISTFamily("mnist", data_dir=data_dir, batch_size=16, download=False)
    resumed_trainer.fit(lp.LeNet(), datamodule=dm, ckpt_path=tmp_path / "manual.ckpt", weights_only=True)
    assert resumed_trainer.global_step == 4
    assert resumed_trainer.current_epoch == 2
    assert len(loaded) == 1
    assert set(loaded[0]["master_weights"]) == names
    torch.testing.assert_close(loaded[0]["master_weights"]["fc2.weight"], state["master_weights"]["fc2.weight"])


def test_a_path_in_hyperparameters_would_not_load_with_weights_only(tmp_path):
    """Why ``MNISTFamily`` keeps ``data_dir`` as a str in its hyperparameters."""
    torch.save({"data_dir": tmp_path}, tmp_path / "x.ckpt")
    with pytest.raises(pickle.UnpicklingError, match=r"PosixPath|WindowsPath"):
        torch.load(tmp_path / "x.ckpt", weights_only=True)
