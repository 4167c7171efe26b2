"""Standalone FSDP2 check (run by tests/lightning/test_sharding.py; Lightning's launcher re-runs this
script once per extra rank): two CPU ranks (gloo) train a tiny model under "ddp" or under
ModelParallelStrategy with the model fully sharded (FSDP2, fully_shard in configure_model), with
the LowPrecision plugin (block floating point weights and gradients, one exponent per tensor,
stochastic rounding), QuantizeActivations (stochastic errors), QuantizeMatmuls (MXFP8 operands)
and QuantizationMetrics. The first layer's rows differ in scale by 2^10 between the two shards,
so a per-shard exponent would show.

    python tests/lightning/fsdp_check.py RESULT.json {ddp,fsdp} [STEPS]

Rank 0 writes RESULT.json: {"weights": {name: [...full values...]}, "steps": int,
"sharded": bool (whether the parameters were DTensors), "operand_stats": [names],
"full_masters": bool (the plugin's state_dict holds full, unsharded master weights)}.
"""

import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.sharding import is_dtensor


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
        sharded = any(is_dtensor(p) for p in pl_module.parameters())
        # the plugin's checkpoint state holds full master weights (a collective under FSDP2)
        masters = self.plugin.state_dict()["master_weights"]
        full_masters = all(
            not is_dtensor(m) and m.shape == p.shape for (n, p) in pl_module.named_parameters() for m in [masters[n]]
        )
        weights = {n: (p.full_tensor() if is_dtensor(p) else p).detach() for n, p in pl_module.named_parameters()}
        if trainer.is_global_zero:
            result = {
                "weights": {n: w.reshape(-1).tolist() for n, w in weights.items()},
                "steps": trainer.global_step,
                "sharded": sharded,
                "operand_stats": sorted(self.metrics.last_layer_stats),
                "full_masters": full_masters,
            }
            with open(self.path, "w") as f:
                json.dump(result, f)


def main():
    path, mode = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
    plugin = lp.LowPrecision(
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
    strategy = "ddp" if mode == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, plugins=[plugin], callbacks=callbacks, max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=8))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
