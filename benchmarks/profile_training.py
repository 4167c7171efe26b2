"""Where a low-precision training step spends its time: torch.profiler over LeNet steps.

    python benchmarks/profile_training.py                  # bfp8, 50 profiled steps
    python benchmarks/profile_training.py --recipe float   # the float baseline

The setting of bench_training.py (LeNet, batch 64, Lightning Trainer with the recipe's plugin,
QuantizeActivations and QuantizationMetrics). Prints the operators with the most self CPU
time, then the share of the step spent in lightning_lowp's kernels (lowp::*) and in the
plugin's work around the optimizer step (LowPrecision.*), per step.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bfp8", help="a registered recipe, or float")
    parser.add_argument("--steps", type=int, default=50, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    n = (args.steps + args.warmup) * 64
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    prof = profile(activities=[ProfilerActivity.CPU])

    class Profile(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                prof.start()

        def on_train_end(self, trainer, pl_module):
            prof.stop()

    plugins, callbacks = [], [Profile()]
    if args.recipe != "float":
        plugins.append(lp.LowPrecision.from_name(args.recipe))
        callbacks += [lp.QuantizeActivations.from_name(args.recipe), lp.QuantizationMetrics(every_n_steps=50)]
    trainer = pl.Trainer(
        max_steps=args.steps + args.warmup,
        accelerator="cpu",
        plugins=plugins,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(lp.LeNet(), DataLoader(data, batch_size=64))

    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    step_us = sum(e.self_cpu_time_total for e in events) / args.steps
    print(f"{args.recipe}: {step_us / 1e3:.2f} ms of profiled CPU time per step ({torch.get_num_threads()} threads)")
    for prefix in ("lowp::", "LowPrecision."):
        mine = [e for e in events if e.key.startswith(prefix)]
        # kernels: their own time; the plugin's ranges: everything under them
        total = sum(e.self_cpu_time_total if prefix == "lowp::" else e.cpu_time_total for e in mine) / args.steps
        calls = sum(e.count for e in mine) / args.steps
        print(f"  {prefix}*: {total / 1e3:.3f} ms per step ({100 * total / step_us:.1f}%), {calls:.0f} calls per step")
        for e in sorted(mine, key=lambda e: -e.cpu_time_total):
            own = e.self_cpu_time_total if prefix == "lowp::" else e.cpu_time_total
            print(f"    {e.key}: {own / args.steps / 1e3:.3f} ms, {e.count / args.steps:.0f} calls")


if __name__ == "__main__":
    main()
