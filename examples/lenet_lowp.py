"""The seed notebook's workflow with lightning_lowp: LeNet on MNIST or Fashion-MNIST trained in
float, in 8-bit fixed point and block floating point (and with today's GEMM recipes mxfp8 and
nvfp4), and across block-floating-point word lengths 1..8, with a plot of accuracy against
word length.

    python examples/lenet_lowp.py                        # quick defaults (see --help)
    python examples/lenet_lowp.py --epochs 10 --train-limit 0    # the seed's full setting
    python examples/lenet_lowp.py --sections sweep --wl 2 4 8

Writes results.json, results.csv and sweep.png to --output-dir and prints a summary table.
The model is an unmodified LightningModule (lightning_lowp.LeNet): the quantization comes
from the precision plugin and the callbacks, picked by recipe name.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_lowp as lp

SECTIONS = ("float", "recipes", "sweep")
RECIPES = ("fixed8", "bfp8", "fixed8_roles", "mxfp8", "nvfp4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (the seed used 10); default 1")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="float: the baseline; recipes: fixed8, bfp8, fixed8_roles, mxfp8, nvfp4; sweep: bfp wl 1..8",
    )
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipes of the 'recipes' section")
    p.add_argument("--wl", nargs="+", type=int, default=list(range(1, 9)), help="word lengths of the sweep")
    p.add_argument("--dataset", choices=["auto", "mnist", "fashion-mnist"], default="auto")
    p.add_argument("--data-dir", default=None, help="directory with the IDX files (default: see MNISTFamily)")
    p.add_argument("--output-dir", default="outputs/lenet", help="where results and the plot go")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--train-limit",
        type=int,
        default=10_000,
        help="train on the first N images (0: all 60,000); default 10,000 for a quick run",
    )
    p.add_argument("--test-limit", type=int, default=0, help="test on the first N images (0: all 10,000)")
    p.add_argument(
        "--limit-batches", type=int, default=None, help="at most N train and N test batches per run (smoke tests)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    bad_wl = [w for w in args.wl if not 1 <= w <= 25]
    if bad_wl:
        p.error(f"--wl values must be in 1..25, got {bad_wl}")
    for name in args.recipes:
        try:
            lp.get_recipe(name)
        except ValueError as err:
            p.error(str(err))
    return args


def run(name: str, recipe: str | None, datamodule, args, output_dir: Path) -> dict[str, object]:
    """Trains a fresh LeNet with `recipe` (None: float) and tests it; returns one result row."""
    pl.seed_everything(args.seed, verbose=False)
    plugins, callbacks = [], []
    if recipe is not None:
        # the recipe's plugin and callbacks; GEMM recipes (mxfp8, nvfp4) quantize the convs too
        gemm = lp.get_recipe(recipe).matmul_input is not None
        plugins, callbacks = lp.from_recipe(recipe, matmuls={"modules": (nn.Linear, nn.Conv2d)} if gemm else None)
        callbacks.append(lp.QuantizationMetrics(every_n_steps=50))
    limits = {}
    if args.limit_batches:
        limits = {
            "limit_train_batches": args.limit_batches,
            "limit_val_batches": args.limit_batches,
            "limit_test_batches": args.limit_batches,
        }
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        plugins=plugins,
        callbacks=callbacks,
        logger=CSVLogger(output_dir / "logs", name=name),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0,
        **limits,
    )
    model = lp.LeNet()
    start = time.time()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.time() - start
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    row = {
        "run": name,
        "recipe": recipe or "float32",
        "test_acc": round(100 * metrics["test/acc"], 2),
        "test_loss": round(metrics["test/loss"], 4),
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.global_step,
    }
    if "test/acc_float" in metrics:  # the same weights with float activations and GEMMs
        row["test_acc_float_activations"] = round(100 * metrics["test/acc_float"], 2)
    print(f"==> {name}: test accuracy {row['test_acc']:.2f}% ({row['train_seconds']}s training)", flush=True)
    return row


def sweep_recipe(wl: int) -> str:
    """The seed's section 3: block floating point of word length wl everywhere, bf16 state."""
    name = f"bfp{wl}_sweep"
    low = lp.BlockFloatingPoint(wl)
    lp.register_recipe(
        name,
        lp.Recipe(weight=low, grad=low, optimizer_state="bf16", master_weight="bf16", activation=low, error=low),
        overwrite=True,
    )
    return name


def plot(rows: list[dict[str, object]], baseline: float | None, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wl = [r["wl"] for r in rows]
    acc = [r["test_acc"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(wl, acc, "x", markersize=9, label="block floating point")
    if baseline is not None:
        ax.plot((min(wl), max(wl)), (baseline, baseline), label=f"float32 ({baseline:.2f}%)")
    ax.set_xlabel("word length (bits)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"LeNet on {dataset}: accuracy vs word length")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    started = time.time()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("highest")

    dm = lp.MNISTFamily(
        args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        train_limit=args.train_limit or None,
        val_limit=args.test_limit or None,
    )
    dm.prepare_data()
    dm.setup("fit")
    print(
        f"dataset: {dm.dataset_name} ({dm.source_dir}); epochs {args.epochs}; "
        f"train images {args.train_limit or 'all'}; sections {', '.join(args.sections)}",
        flush=True,
    )

    rows: list[dict[str, object]] = []
    if "float" in args.sections:
        rows.append(run("float", None, dm, args, output_dir))
    if "recipes" in args.sections:
        for name in args.recipes:
            rows.append(run(name, name, dm, args, output_dir))
    sweep = []
    if "sweep" in args.sections:
        for wl in args.wl:
            row = run(f"bfp_wl{wl}", sweep_recipe(wl), dm, args, output_dir)
            row["wl"] = wl
            rows.append(row)
            sweep.append(row)

    baseline = next((r["test_acc"] for r in rows if r["run"] == "float"), None)
    total = time.time() - started
    summary = {
        "dataset": dm.dataset_name,
        "epochs": args.epochs,
        "train_images": args.train_limit or "all",
        "total_seconds": round(total, 1),
        "runs": rows,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    columns = ["run", "recipe", "wl", "test_acc", "test_acc_float_activations", "test_loss", "steps", "train_seconds"]
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if sweep:
        plot(sweep, baseline, output_dir / "sweep.png", dm.dataset_name)

    print(f"\n{dm.dataset_name}, {args.epochs} epoch(s), train images: {args.train_limit or 'all'}\n")
    print("| run | recipe | test acc (%) | with float activations / GEMMs (%) | train time (s) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {r['recipe']} | {r['test_acc']:.2f} | {r.get('test_acc_float_activations', '')} "
            f"| {r['train_seconds']} |"
        )
    print(f"\nTotal execution time (s): {total:.1f}")
    print(
        f"results: {output_dir / 'results.json'}, {output_dir / 'results.csv'}"
        + (f", plot: {output_dir / 'sweep.png'}" if sweep else "")
    )
    return summary


if __name__ == "__main__":
    main()
