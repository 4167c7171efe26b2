"""Training overhead: the seed's LeNet at batch 64, steps per second in float and with recipes.

    python benchmarks/bench_training.py                     # float, bfp8, fixed8_roles, fp8_e4m3
    python benchmarks/bench_training.py --rounds 10 --recipes bfp8

A quantized run uses the recipe's LowPrecision plugin, QuantizeActivations and
QuantizationMetrics (sampling every 50 steps), with Lightning's Trainer, as a user would; all
runs train on the same in-memory batches (Fashion-MNIST-shaped random images).

Speed: one process trains every configuration in turn, --steps steps at a time (a fresh
Trainer each time, the first --warmup steps untimed), for --rounds rounds, each round
starting with the next configuration. Runs of one round
are a second or two apart, so a drift in a shared machine's speed, which can be +-15% from
minute to minute, largely cancels in the ratio of each configuration's step time to float's
in the same round; the table gives the median of those ratios and the median steps/s.
Memory: each configuration's peak RSS in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def train(recipes: list[str], steps: int, warmup: int, rounds: int, nonfinite=None) -> dict:
    """Seconds per timed step of every recipe, per round."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_lowp as lp

    pl.seed_everything(0, verbose=False)
    n = (steps + warmup) * 64
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=64)
    models = {recipe: lp.LeNet() for recipe in recipes}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    times = {recipe: [] for recipe in recipes}
    for round_ in range(rounds):
        # each round starts with the next configuration, so none always runs first or last
        for recipe in recipes[round_ % len(recipes) :] + recipes[: round_ % len(recipes)]:
            clock = Clock()
            plugins, callbacks = [], [clock]
            if recipe != "float":
                plugins.append(lp.LowPrecision.from_name(recipe, **({"nonfinite": nonfinite} if nonfinite else {})))
                callbacks += [lp.QuantizeActivations.from_name(recipe), lp.QuantizationMetrics(every_n_steps=50)]
            trainer = pl.Trainer(
                max_steps=steps + warmup,
                accelerator="cpu",
                plugins=plugins,
                callbacks=callbacks,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(models[recipe], loader)
            times[recipe].append(clock.seconds / steps)
    return {"times": times, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["bfp8", "fixed8_roles", "fp8_e4m3"])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument(
        "--nonfinite", choices=["skip", "error", "ignore"], default=None, help="the plugin's nonfinite (default: its)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = train(args.worker, args.steps, args.warmup, args.rounds, args.nonfinite)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    def run(recipes, steps, warmup, rounds):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            *recipes,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--rounds",
            str(rounds),
            *(["--nonfinite", args.nonfinite] if args.nonfinite else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    configs = ["float", *args.recipes]
    print(
        f"timing {', '.join(configs)}: {args.rounds} rounds of {args.steps} steps each...", file=sys.stderr, flush=True
    )
    speed = run(configs, args.steps, args.warmup, args.rounds)
    rss = {}
    for recipe in configs:  # peak RSS: each configuration alone in a process
        rss[recipe] = run([recipe], args.steps, args.warmup, 1)["peak_rss_mib"]
        print(f"peak RSS {recipe}: {rss[recipe]:.0f} MiB", file=sys.stderr, flush=True)

    float_times = speed["times"]["float"]
    print(
        f"\nLeNet, batch 64, CPU with {speed['threads']} threads; {args.rounds} rounds of {args.steps} timed steps "
        f"per configuration; medians over rounds\n"
    )
    print("| configuration | steps/s | step time vs float | peak RSS (MiB) | RSS vs float |")
    print("|---|---:|---:|---:|---:|")
    for recipe in configs:
        times = speed["times"][recipe]
        ratio = statistics.median(t / f for t, f in zip(times, float_times, strict=False))
        print(
            f"| {recipe} | {1 / statistics.median(times):.1f} | {ratio:.2f}x | {rss[recipe]:.0f} "
            f"| {rss[recipe] / rss['float']:.2f}x |"
        )


if __name__ == "__main__":
    main()
