"""Training overhead: the seed's LeNet at batch 64, steps per second in float and with recipes.

    python benchmarks/bench_training.py                     # float, bfp8, fixed8_roles, fp8_e4m3
    python benchmarks/bench_training.py --steps 300 --recipes bfp8

Each configuration runs in its own process (so peak RSS is its own), on the same in-memory
batches (Fashion-MNIST-shaped random images), with Lightning's Trainer; a quantized run uses
the recipe's LowPrecision plugin, QuantizeActivations and QuantizationMetrics (sampling every
50 steps), as a user would. The configurations take turns for --rounds rounds (so a drift in
a shared machine's speed hits all alike) and each reports its median. Prints a Markdown
table: steps/s, the ratio of step time to float's, and peak RSS against float's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(recipe: str, steps: int, warmup: int) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_lowp as lp

    pl.seed_everything(0, verbose=False)
    n = (steps + warmup) * 64
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    plugins, callbacks = [], [clock]
    if recipe != "float":
        plugins.append(lp.LowPrecision.from_name(recipe))
        callbacks += [lp.QuantizeActivations.from_name(recipe), lp.QuantizationMetrics(every_n_steps=50)]
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator="cpu", plugins=plugins, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lp.LeNet(), DataLoader(data, batch_size=64))
    return {
        "recipe": recipe,
        "steps_per_second": steps / clock.seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["bfp8", "fixed8_roles", "fp8_e4m3"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration, taking turns")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return

    configs = ["float"] + args.recipes
    runs = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for recipe in configs:
            cmd = [sys.executable, __file__, "--worker", recipe, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[recipe].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_ + 1}/{args.rounds} {recipe}: {runs[recipe][-1]['steps_per_second']:.1f} steps/s",
                  file=sys.stderr, flush=True)
    rows = []
    for recipe in configs:
        row = dict(runs[recipe][0])
        row["steps_per_second"] = statistics.median(r["steps_per_second"] for r in runs[recipe])
        row["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in runs[recipe])
        rows.append(row)
    base = rows[0]
    print(f"\nLeNet, batch 64, {args.steps} timed steps, CPU with {base['threads']} threads, "
          f"median of {args.rounds} rounds\n")
    print("| configuration | steps/s | step time vs float | peak RSS (MiB) | RSS vs float |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['steps_per_second']:.1f} | {base['steps_per_second'] / r['steps_per_second']:.2f}x "
              f"| {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x |")


if __name__ == "__main__":
    main()
