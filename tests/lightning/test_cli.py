"""LightningCLI: a YAML config picks the recipe of LowPrecision and QuantizeActivations by
name (or spells the formats out); fit runs on a tiny synthetic IDX data set."""

import sys

import pytest
import yaml
from helpers import MNIST_LIKE, QUIET, on_grid, write_dataset
from lightning.pytorch.cli import LightningCLI  # needs jsonargparse[signatures]

import lightning_lowp as lp
from lightning_lowp.data import LeNet, MNISTFamily
from lightning_lowp.plugins import LowPrecision


@pytest.fixture(autouse=True)
def no_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_lowp"])  # pytest's own arguments are not for the CLI


def config(tmp_path, plugin_args, callback_args=None, **trainer):
    data_dir = write_dataset(tmp_path / "idx", MNIST_LIKE, n_train=32, n_test=16)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            **QUIET,
            "max_steps": 2,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp_path / "run"),
            "plugins": [{"class_path": "lightning_lowp.plugins.LowPrecision", "init_args": plugin_args}],
            "callbacks": [
                {
                    "class_path": "lightning_lowp.callbacks.QuantizeActivations",
                    "init_args": callback_args or {"recipe": "bfp8"},
                }
            ],
            **trainer,
        },
        "model": {"lr": 0.01},
        "data": {"dataset": "mnist", "data_dir": str(data_dir), "batch_size": 8, "download": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def the(items, cls):
    (found,) = [x for x in items if isinstance(x, cls)]
    return found


def test_cli_config_picks_recipe_by_name_and_fits(tmp_path):
    path = config(tmp_path, {"recipe": "bfp8"})
    cli = LightningCLI(LeNet, MNISTFamily, args=["fit", "--config", str(path)])
    trainer = cli.trainer
    plugin = trainer.precision_plugin
    assert isinstance(plugin, LowPrecision)
    bfp8 = lp.get_recipe("bfp8")
    for role in ("weight", "grad", "optimizer_state", "master_weight"):
        assert getattr(plugin.recipe, role) == getattr(bfp8, role), role
    assert plugin.recipe.weight == lp.BlockFloatingPoint(8)
    assert str(plugin.recipe.optimizer_state) == "bf16"
    callback = the(trainer.callbacks, lp.QuantizeActivations)
    assert callback.settings == (lp.BlockFloatingPoint(8), lp.BlockFloatingPoint(8), "nearest", "nearest")
    assert cli.model.hparams.lr == 0.01
    assert cli.datamodule.batch_size == 8
    assert trainer.global_step == 2
    assert cli.datamodule.dataset_name == "mnist"
    assert set(callback.hooked) == {"conv1", "conv2", "fc1", "fc2"}
    assert not callback._handles
    for name, p in cli.model.named_parameters():  # the plugin ran: weights on the bfp(8) grid
        assert on_grid(p, "bfp(8)"), name
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # SaveConfigCallback's dump
    assert saved["trainer"]["plugins"][0]["init_args"]["recipe"] == "bfp8"
    assert saved["trainer"]["callbacks"][0]["init_args"]["recipe"] == "bfp8"


def test_cli_spelled_out_formats_without_running(tmp_path):
    args = {"weight": "fixed(8,7)", "grad": "fixed(8,7)", "grad_rounding": "stochastic", "grad_scale": 2.0}
    activations = {"forward": "fixed(8,7)", "backward": "bfp(8)", "backward_rounding": "stochastic"}
    cli = LightningCLI(LeNet, MNISTFamily, args=["--config", str(config(tmp_path, args, activations))], run=False)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, LowPrecision)
    assert plugin.grad_scale == 2.0
    assert plugin.recipe.weight == lp.FixedPoint(8, 7)
    assert plugin.recipe.grad_rounding == "stochastic"
    assert plugin.recipe.optimizer_state is None
    assert plugin.recipe.master_weight is None
    callback = the(cli.trainer.callbacks, lp.QuantizeActivations)
    assert callback.settings == (lp.FixedPoint(8, 7), lp.BlockFloatingPoint(8), "nearest", "stochastic")
    assert cli.trainer.global_step == 0


def test_cli_unknown_recipe_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'bfp9'; known recipes: bf16, bfp8"):
        LightningCLI(LeNet, MNISTFamily, args=["--config", str(config(tmp_path, {"recipe": "bfp9"}))], run=False)
