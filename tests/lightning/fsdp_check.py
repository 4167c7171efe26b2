"""Standalone FSDP check (run by tests/lightning/test_sharding.py; Lightning's launcher re-runs this
script once per extra rank): two CPU ranks (gloo) train a tiny model under "ddp", under
ModelParallelStrategy with the model fully sharded ("fsdp": FSDP2, fully_shard in configure_model),
or under Lightning's FSDPStrategy ("fsdp1": FSDP1, each Linear its own FlatParameter, with
FSDPLowPrecision; Lightning allows it only on GPUs, so a subclass here wraps on the CPU), with
the LowPrecision plugin (block floating point weights and gradients, one exponent per tensor,
stochastic rounding), QuantizeActivations (stochastic errors), QuantizeMatmuls (MXFP8 operands)
and QuantizationMetrics. The first layer's rows differ in scale by 2^10 between the two shards,
so a per-shard exponent would show.

    python tests/lightning/fsdp_check.py RESULT.json {ddp,fsdp,fsdp1} [STEPS] [{cpu,cuda}]

On "cuda" the ranks are the GPUs (up to two) and "fsdp1" is Lightning's own strategy="fsdp".

Rank 0 writes RESULT.json: {"weights": {name: [...full values...]}, "steps": int,
"sharded": bool (whether the parameters were DTensors, or FSDP1 pieces), "operand_stats": [names],
"full_masters": bool (the plugin's state_dict holds full, unsharded master weights, named as
in the unwrapped model), "masters_round_trip": bool (loading that state gives each rank its own
shards back)}.
"""

import contextlib
import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.sharding import clean_name, is_dtensor


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy, wrapping on the CPU (which torch's FSDP1 accepts given device_id="cpu")."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            self.net[0].weight[:8] *= 2.0**10  # rank 0's shard of it (dim 0) is 2^10 larger

    def configure_model(self):
        if self.device_mesh is None:  # ddp
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Collect(pl.Callback):
    def __init__(self, path, metrics, plugin):
        self.path, self.metrics, self.plugin = path, metrics, plugin

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = isinstance(trainer.model, FullyShardedDataParallel)
        sharded = fsdp1 or any(is_dtensor(p) for p in pl_module.parameters())
        # the plugin's checkpoint state holds full master weights (a collective under FSDP)
        masters = self.plugin.state_dict()["master_weights"]
        with FullyShardedDataParallel.summon_full_params(trainer.model) if fsdp1 else contextlib.nullcontext():
            weights = {
                clean_name(n): (p.full_tensor() if is_dtensor(p) else p).detach().clone()
                for n, p in pl_module.named_parameters()
            }
        full_masters = sorted(masters) == sorted(weights) and all(
            not is_dtensor(masters[n]) and masters[n].shape == w.shape for n, w in weights.items()
        )
        # loading the checkpoint state gives each rank back its own shards (pieces) of the masters
        before = {p: m.clone() for p, m in self.plugin._master_weights.items()}
        self.plugin.load_state_dict(self.plugin.state_dict())
        after = self.plugin._master_weights
        round_trip = after.keys() == before.keys() and all(torch.equal(after[p], m) for p, m in before.items())
        if trainer.is_global_zero:
            result = {
                "weights": {n: w.reshape(-1).tolist() for n, w in weights.items()},
                "steps": trainer.global_step,
                "sharded": sharded,
                "operand_stats": sorted(self.metrics.last_layer_stats),
                "full_masters": full_masters,
                "masters_round_trip": round_trip,
            }
            with open(self.path, "w") as f:
                json.dump(result, f)


def main():
    path, mode = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    accelerator = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    devices = min(2, torch.cuda.device_count()) if accelerator == "cuda" else 2
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
    plugin = (lp.FSDPLowPrecision if mode == "fsdp1" else lp.LowPrecision)(
        weight="bfp(8)", grad="bfp(8)", optimizer_state="bf16", master_weight="bf16",
        weight_rounding="stochastic", grad_rounding="stochastic",
    )  # fmt: skip
    metrics = lp.QuantizationMetrics(every_n_steps=2, accuracy=False)
    callbacks = [
        lp.QuantizeActivations(forward="bf16", backward="fp8_e5m2", backward_rounding="stochastic", modules=(nn.ReLU,)),
        lp.QuantizeMatmuls(input="mxfp8_e4m3", weight="mxfp8_e4m3", grad_output="mxfp8_e5m2"),
        metrics,
        Collect(path, metrics, plugin),
    ]
    if mode == "ddp":
        strategy = "ddp"
    elif mode == "fsdp1":
        fsdp = FSDPStrategy if accelerator == "cuda" else CPUFSDPStrategy
        strategy = fsdp(auto_wrap_policy={nn.Linear})
    else:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        strategy=strategy, accelerator=accelerator, devices=devices, plugins=[plugin], callbacks=callbacks,
        max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=8))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
