"""A small vision transformer (lightning_lowp.ViT) on MNIST or Fashion-MNIST with its GEMM
operands in float32, in bf16 and in each low-precision training recipe (MXFP8, MXFP4, NVFP4 and
torchao's / DeepSeek's FP8 scalings), with the training-loss curves on one plot.

    python examples/vit_lowp.py                          # quick defaults (see --help)
    python examples/vit_lowp.py --runs float mxfp8 nvfp4 --epochs 5 --train-limit 0

The runs:

- float: float32 throughout, no callback.
- bf16: what a bf16 autocast GEMM computes: every GEMM of the transformer (the nn.Linear
  layers and attention's q @ kᵀ and softmax @ v) with bf16 operands and float32 accumulation,
  lp.QuantizeMatmuls(input="bf16", weight="bf16", grad_output="bf16", attention=True,
  modules=(nn.Linear, Attention)).
- mxfp8, mxfp4, nvfp4, fp8_tensorwise, fp8_rowwise, fp8_blockwise: the recipe's GEMM operands
  (lp.QuantizeMatmuls.from_name) in every nn.Linear, with the output head in bf16 (the usual
  practice). The nvfp4 recipe also keeps the last 15% of the selected modules in bf16 (with
  the default depth 4: blocks.3.fc1 and blocks.3.fc2). Attention's two matmuls are not
  quantized in these runs (attention=False: they compute in float32).

In every run the patch embedding (a Conv2d, which neither selection includes) stays in
float32, as do LayerNorm, softmax, GELU, the weights and the optimizer.

Every run starts from the same seeded initialization, trains with AdamW under a warmup and
cosine schedule and is tested (in its own precision) on the test images. Writes results.json,
results.csv and loss.png (training loss per step, moving average) to --output-dir, and prints a
markdown table with each run's accuracy gap to float in percentage points and the mean SQNR of
the GEMM operands the run quantizes in its own formats (lp.QuantizationMetrics every 50 steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_lowp as lp
from lightning_lowp.vit import Attention

RECIPES = ("mxfp8", "mxfp4", "nvfp4", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise")
RUNS = ("float", "bf16", *RECIPES)
BF16 = {"input": "bf16", "weight": "bf16", "grad_output": "bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="epochs per run; default 5")
    p.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        metavar="RUN",
        help=f"which runs, in this order (default: all): {', '.join(RUNS)}",
    )
    p.add_argument("--dataset", choices=["auto", "mnist", "fashion-mnist"], default="auto")
    p.add_argument("--data-dir", default=None, help="directory with the IDX files (default: see MNISTFamily)")
    p.add_argument("--output-dir", default="outputs/vit", help="where results and the plot go")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak learning rate; default 2e-3")
    p.add_argument("--dim", type=int, default=64, help="the ViT's token width (a multiple of 4); default 64")
    p.add_argument("--depth", type=int, default=4, help="the ViT's number of encoder blocks; default 4")
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
    for name in ("epochs", "batch_size", "dim", "depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dim % 4:
        p.error(f"--dim must be a multiple of 4 (the number of heads), got {args.dim}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    for name in ("train_limit", "test_limit"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 (all) or positive, got {getattr(args, name)}")
    if args.limit_batches is not None and args.limit_batches < 1:
        p.error(f"--limit-batches must be at least 1, got {args.limit_batches}")
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {', '.join(map(repr, unknown))}; accepted runs: {', '.join(RUNS)}")
    args.runs = list(dict.fromkeys(args.runs))  # without repeats, in the order given
    return args


def matmul_callback(name: str) -> lp.QuantizeMatmuls | None:
    """The GEMM-operand callback of run `name` (None for float)."""
    if name == "float":
        return None
    if name == "bf16":
        return lp.QuantizeMatmuls(**BF16, attention=True, modules=(nn.Linear, Attention))
    return lp.QuantizeMatmuls.from_name(name, overrides={"head": BF16})


class OperandSQNR(pl.Callback):
    """The SQNR of the GEMM operands the recipe quantizes in its own formats, per sampled step.

    Reads what lp.QuantizationMetrics measured (it must come before this callback): the mean
    of sqnr_db over the operands of the modules that use the callback's base settings (not
    the head, nor the layers nvfp4 keeps in bf16), one value per sampled step.
    """

    def __init__(self, metrics: lp.QuantizationMetrics, quantizer: lp.QuantizeMatmuls) -> None:
        self.metrics, self.quantizer = metrics, quantizer
        self.samples: list[float] = []
        self._seen: int | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.metrics.last_sampled_step == self._seen:
            return
        self._seen = self.metrics.last_sampled_step
        own = {n for n, st in self.quantizer.hooked.items() if st == self.quantizer.settings}
        values = [
            st["sqnr_db"]
            for key, st in self.metrics.last_layer_stats.items()
            if key.split("/")[0] in own and math.isfinite(st["sqnr_db"])
        ]
        if values:
            self.samples.append(sum(values) / len(values))


class LossHistory(pl.Callback):
    """Records the training loss of every optimizer step (Lightning logs only every N steps)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss))


def run(name: str, datamodule: lp.MNISTFamily, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Trains a fresh ViT in run `name`'s precision and tests it; returns one result row."""
    pl.seed_everything(args.seed, verbose=False)
    history = LossHistory()
    callbacks: list[pl.Callback] = [history]
    quantizer = matmul_callback(name)
    sqnr = None
    if quantizer is not None:
        metrics = lp.QuantizationMetrics(every_n_steps=50, accuracy=False)
        sqnr = OperandSQNR(metrics, quantizer)
        callbacks += [quantizer, metrics, sqnr]
    limits = {}
    if args.limit_batches:
        limits = {"limit_train_batches": args.limit_batches, "limit_test_batches": args.limit_batches}
    batches = len(datamodule.train_dataloader())
    if args.limit_batches:
        batches = min(batches, args.limit_batches)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=callbacks,
        logger=CSVLogger(output_dir / "logs", name=name),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # the validation set would be the test images: tested once, after fit
        **limits,
    )
    model = lp.ViT(dim=args.dim, depth=args.depth, lr=args.lr, max_steps=args.epochs * batches)
    start = time.time()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.time() - start
    start = time.time()
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    test_seconds = time.time() - start
    row: dict[str, Any] = {
        "run": name,
        "recipe": name if name in RECIPES else ("bf16 operands" if name == "bf16" else "float32"),
        "test_acc": round(100 * metrics["test/acc"], 2),
        "test_loss": round(metrics["test/loss"], 4),
        "final_train_loss": round(sum(history.losses[-20:]) / max(1, len(history.losses[-20:])), 4),
        "train_seconds": round(train_seconds, 1),
        "ms_per_step": round(1000 * train_seconds / max(1, trainer.global_step), 1),
        "test_seconds": round(test_seconds, 1),
        "steps": trainer.global_step,
        "operand_sqnr_db": round(sum(sqnr.samples) / len(sqnr.samples), 1) if sqnr and sqnr.samples else None,
        "loss_curve": {"step": history.steps, "loss": [round(v, 5) for v in history.losses]},
    }
    print(
        f"==> {name}: test accuracy {row['test_acc']:.2f}% ({row['train_seconds']}s training, "
        f"{row['ms_per_step']} ms/step)",
        flush=True,
    )
    return row


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(rows: list[dict[str, Any]], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        steps, losses = r["loss_curve"]["step"], r["loss_curve"]["loss"]
        window = max(1, min(50, len(losses) // 10))
        style = {"color": "black", "linewidth": 2} if r["run"] == "float" else {"linewidth": 1.2}
        ax.plot(steps, moving_average(losses, window), label=f"{r['run']} ({r['test_acc']:.1f}%)", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(f"ViT on {dataset}: training loss by GEMM precision")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, title="run (test acc)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
        f"train images {args.train_limit or 'all'}; runs {', '.join(args.runs)}",
        flush=True,
    )

    rows = [run(name, dm, args, output_dir) for name in args.runs]
    baseline = next((r["test_acc"] for r in rows if r["run"] == "float"), None)
    for r in rows:
        r["gap_to_float"] = round(r["test_acc"] - baseline, 2) if baseline is not None else None
    plot(rows, output_dir / "loss.png", dm.dataset_name or args.dataset)

    total = time.time() - started
    summary = {
        "dataset": dm.dataset_name,
        "epochs": args.epochs,
        "train_images": args.train_limit or "all",
        "model": {"dim": args.dim, "depth": args.depth, "lr": args.lr, "batch_size": args.batch_size},
        "total_seconds": round(total, 1),
        "runs": rows,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    columns = [
        "run",
        "recipe",
        "test_acc",
        "gap_to_float",
        "operand_sqnr_db",
        "test_loss",
        "final_train_loss",
        "steps",
        "train_seconds",
        "ms_per_step",
        "test_seconds",
    ]
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    print(f"\n{dm.dataset_name}, {args.epochs} epoch(s), train images: {args.train_limit or 'all'}\n")
    print("| run | recipe | test acc (%) | gap to float (pp) | GEMM operand SQNR (dB) | train time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        gap = "" if r["gap_to_float"] is None else f"{r['gap_to_float']:+.2f}"
        db = "" if r["operand_sqnr_db"] is None else f"{r['operand_sqnr_db']:.1f}"
        print(f"| {r['run']} | {r['recipe']} | {r['test_acc']:.2f} | {gap} | {db} | {r['train_seconds']} |")
    print(f"\nTotal execution time (s): {total:.1f}")
    print(f"results: {output_dir / 'results.json'}, {output_dir / 'results.csv'}, plot: {output_dir / 'loss.png'}")
    return summary


if __name__ == "__main__":
    main()
