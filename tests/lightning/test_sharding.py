"""Sharded training (FSDP2 / DTensor) on two CPU ranks over gloo. The work is in dtensor_check.py and
fsdp_check.py (beside this file), run as scripts: the ranks are processes of their own.

- lp.quantize, lp.quantize_ and lp.quantize_foreach_ accept DTensors and are shard-invariant:
  full_tensor() of the result is the full tensor quantized, bit for bit, in element-wise, block,
  scaled and tiled formats, to nearest and stochastically, sharded along either dim or
  replicated, with shards 2^20 apart in scale (a per-shard exponent or scale would show).
- A model fully sharded under ModelParallelStrategy (fully_shard in configure_model) trains with
  LowPrecision, QuantizeActivations, QuantizeMatmuls and QuantizationMetrics to the same weights,
  bit for bit, as under DDP on the same data; so does one under Lightning's FSDPStrategy (FSDP1)
  with FSDPLowPrecision.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

HERE = Path(__file__).parent


def run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_quantizing_a_dtensor_is_shard_invariant(tmp_path):
    run("dtensor_check.py", tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cases"] == 12 * 2 * 3 * 3  # formats x roundings x placements x functions
    assert result["mismatches"] == []
    assert result["placements_kept"]


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    """The DDP run that the FSDP runs must match (run once for both)."""
    path = tmp_path_factory.mktemp("ddp") / "ddp.json"
    run("fsdp_check.py", path, "ddp", 4)
    result = json.loads(path.read_text())
    assert not result["sharded"]
    assert result["steps"] == 4
    return result


def assert_same_training(sharded, ddp):
    assert sharded["sharded"]  # the parameters really were sharded
    assert sharded["steps"] == 4
    assert sharded["weights"].keys() == ddp["weights"].keys()
    for name in ddp["weights"]:
        assert sharded["weights"][name] == ddp["weights"][name], name
    assert sharded["operand_stats"] == ddp["operand_stats"]  # layers named as in the unwrapped model
    assert "net.0/wgrad.grad_output" in sharded["operand_stats"]
    assert sharded["full_masters"]  # a checkpoint holds whole master weights, not rank 0's shards
    assert sharded["masters_round_trip"]  # and loading it gives each rank its shards back


def test_fsdp2_trains_to_the_weights_of_ddp_bit_for_bit(tmp_path, ddp_result):
    run("fsdp_check.py", tmp_path / "fsdp.json", "fsdp", 4)
    assert_same_training(json.loads((tmp_path / "fsdp.json").read_text()), ddp_result)


def test_fsdp1_trains_to_the_weights_of_ddp_bit_for_bit(tmp_path, ddp_result):
    # Lightning's FSDPStrategy (FSDP1, flat parameters cut across rows of net.0.weight) with
    # FSDPLowPrecision: the same bits as DDP, block exponents and stochastic keys included
    run("fsdp_check.py", tmp_path / "fsdp1.json", "fsdp1", 4)
    assert_same_training(json.loads((tmp_path / "fsdp1.json").read_text()), ddp_result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: Lightning runs strategy='fsdp' on GPUs only")
def test_fsdp1_on_gpus_trains_to_the_weights_of_ddp_bit_for_bit(tmp_path):
    # Lightning's own strategy="fsdp" on (up to two) GPUs, NCCL collectives, against DDP there
    run("fsdp_check.py", tmp_path / "ddp.json", "ddp", 4, "cuda")
    run("fsdp_check.py", tmp_path / "fsdp1.json", "fsdp1", 4, "cuda")
    assert_same_training(
        json.loads((tmp_path / "fsdp1.json").read_text()), json.loads((tmp_path / "ddp.json").read_text())
    )


def test_fsdp_strategy_takes_fsdp_low_precision_and_refuses_low_precision():
    # Lightning's FSDPStrategy takes only an FSDPPrecision: FSDPLowPrecision is one, with the
    # arguments, recipes and repr of LowPrecision
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    import lightning_lowp as lp

    plugin = lp.FSDPLowPrecision.from_name("bfp8", grad_rounding="stochastic")
    assert isinstance(plugin, FSDPPrecision)
    assert isinstance(plugin, lp.LowPrecision)
    assert plugin.precision == "32-true"
    assert plugin.scaler is None
    assert plugin.recipe.grad_rounding == "stochastic"
    assert plugin.recipe.weight == lp.LowPrecision.from_name("bfp8").recipe.weight
    assert repr(plugin).startswith("FSDPLowPrecision(")
    FSDPStrategy(precision_plugin=plugin)  # accepted
    with pytest.raises(TypeError, match="FSDPPrecision"):
        FSDPStrategy(precision_plugin=lp.LowPrecision.from_name("bfp8"))
    with pytest.raises(ValueError, match="grad_scale"):
        lp.FSDPLowPrecision(weight="bf16", grad_scale=0)  # LowPrecision's validation


def test_layer_and_parameter_names_leave_out_fsdp1_wrappers():
    from torch import nn

    from lightning_lowp.selection import named_layers
    from lightning_lowp.sharding import clean_name

    assert clean_name("net.0._fsdp_wrapped_module.weight") == "net.0.weight"
    assert clean_name("net.0._fsdp_wrapped_module") == "net.0"
    assert clean_name("_fsdp_wrapped_module.block._checkpoint_wrapped_module.fc") == "block.fc"
    assert clean_name("net.fsdp_like_module.weight") == "net.fsdp_like_module.weight"  # whole parts only

    class Wrapper(nn.Module):  # as FSDP1 wraps a layer: the layer is its child "_fsdp_wrapped_module"
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    linear = nn.Linear(2, 2)
    model = nn.Sequential(Wrapper(linear), nn.ReLU())
    layers = named_layers(model)
    assert list(layers) == ["0", "1"]
    assert layers["0"] is linear  # the layer, not its wrapper


def test_a_checkpoint_moves_between_low_precision_and_fsdp_low_precision(tmp_path):
    # Lightning keeps a precision plugin's state under its class name: each plugin takes the
    # other's, so a run can resume under FSDP1 from a DDP or single-device checkpoint
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_lowp as lp

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=4)

    def fit(plugin, epochs, ckpt_path=None):
        trainer = pl.Trainer(
            max_epochs=epochs, plugins=[plugin], accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
        return trainer

    first = lp.LowPrecision(weight="fixed(8,4)", master_weight="bf16", weight_rounding="stochastic")
    trainer = fit(first, 1)
    path = tmp_path / "first.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert "LowPrecision" in saved
    assert "FSDPLowPrecision" not in saved

    second = lp.FSDPLowPrecision(weight="fixed(8,4)", master_weight="bf16", weight_rounding="stochastic")
    second.on_load_checkpoint(saved)  # what Lightning calls first when it restores
    state, theirs = second.state_dict(), saved["LowPrecision"]  # (pending until a model is bound)
    assert state["master_weights"].keys() == theirs["master_weights"].keys() == {"net.weight", "net.bias"}
    for name, master in theirs["master_weights"].items():
        assert torch.equal(state["master_weights"][name], master)
    assert torch.equal(state["generator"], theirs["generator"])
    resumed = fit(second, 2, ckpt_path=path)  # and Lightning resumes with it
    assert resumed.global_step == 8

    third = lp.LowPrecision(weight="fixed(8,4)", master_weight="bf16", weight_rounding="stochastic")
    third.on_load_checkpoint({"FSDPLowPrecision": {"nonfinite_steps": 3}})
    assert third.nonfinite_steps == 3
    own = lp.LowPrecision()
    own.on_load_checkpoint({"LowPrecision": {"nonfinite_steps": 2}, "FSDPLowPrecision": {"nonfinite_steps": 5}})
    assert own.nonfinite_steps == 0  # its own entry: Lightning loads that one, after the hook


def test_collectives_under_nccl_take_cuda_tensors(monkeypatch):
    # the plugin's all-reduces and gathers send CPU tensors (FSDP1 with CPU offload, counts,
    # flags) through the GPU when the process group is NCCL's, which takes CUDA tensors only
    from lightning_lowp.sharding import collective_device

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device(None, torch.device("cpu")) == torch.device("cuda", 0)
    assert collective_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert collective_device(None, torch.device("cpu")) == torch.device("cpu")
