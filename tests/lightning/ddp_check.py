"""Standalone DDP check (run by tests/lightning/test_ddp.py; Lightning's launcher re-runs this script
once per extra rank): two CPU ranks (gloo) train a tiny model on different batches with
stochastic rounding of weights and gradients, then compare their weights bit for bit.

    python tests/lightning/ddp_check.py RESULT.json [STEPS] [matmuls]

With "matmuls", the model computes with lp.QuantizeMatmuls' nvfp4 recipe (stochastic rounding
of output gradients, a random Hadamard transform in wgrad) and lp.QuantizationMetrics samples
its operands every 2 steps (a collective across ranks), instead of the LowPrecision plugin.

Rank 0 writes RESULT.json: {"identical": bool, "changed": bool, "different_data": bool,
"weights": [...rank 0's parameters, flat...], "world_size": int, "steps": int,
"quantized_gemms": int (matmuls), "operand_stats": [names] (matmuls)}.
"""

import json
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.plugins import LowPrecision


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.batch_sums = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sums.append(float(x.sum()))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Compare(pl.Callback):
    def __init__(self, path, matmuls=None, metrics=None):
        self.path = path
        self.matmuls, self.metrics = matmuls, metrics

    def on_train_start(self, trainer, pl_module):
        self.initial = flat(pl_module).clone()

    def on_train_end(self, trainer, pl_module):
        weights = flat(pl_module)
        gathered = pl_module.all_gather(weights)  # (world_size, n)
        sums = pl_module.all_gather(torch.tensor(pl_module.batch_sums, dtype=torch.float64))
        if trainer.is_global_zero:
            result = {
                "world_size": trainer.world_size,
                "steps": trainer.global_step,
                "identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                "max_abs_difference": float((gathered - gathered[0]).abs().max()),
                "changed": not torch.equal(weights, self.initial),
                "different_data": not torch.equal(sums[0], sums[1]),
                "weights": weights.tolist(),
            }
            if self.matmuls is not None:
                result["quantized_gemms"] = sum(self.matmuls.counts.values())
                result["operand_stats"] = sorted(self.metrics.last_layer_stats)
            with open(self.path, "w") as f:
                json.dump(result, f)


def main():
    path, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6
    matmuls = len(sys.argv) > 3 and sys.argv[3] == "matmuls"
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
    plugin = LowPrecision(
        weight="fixed(8,5)", grad="fixed(8,6)", optimizer_state="bf16", master_weight="bf16",
        weight_rounding="stochastic", grad_rounding="stochastic",
    )  # fmt: skip
    callbacks = [Compare(path)]
    if matmuls:
        qm, metrics = lp.QuantizeMatmuls.from_name("nvfp4"), lp.QuantizationMetrics(every_n_steps=2, accuracy=False)
        plugin, callbacks = None, [qm, metrics, Compare(path, qm, metrics)]
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, plugins=[plugin] if plugin else [], callbacks=callbacks,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    # shuffle=False: Lightning replaces the sampler by a DistributedSampler, so each rank gets
    # its own half of the data (gradients are all-reduced, weights must stay identical).
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=8))
    # Tear the process group down before the interpreter exits: left to the atexit order, gloo's
    # threads are sometimes still joinable at exit and the process aborts (seen under load).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
