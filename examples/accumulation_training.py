"""Training with low-precision accumulation inside every GEMM: LeNet and the small ViT.

Each run trains from the same seeded initialization and tests on the test images. The GEMM
operands stay float32; only the sums change (lp.QuantizeMatmuls(accumulate=...), in the
forward, input-gradient and weight-gradient GEMMs of every selected layer):

- float: torch's float32 GEMMs, no callback;
- bf16: every product added into a bf16 accumulator, each addition rounded to nearest;
- bf16, chunk 32: the same, promoted into float32 every 32 products (Wang et al.'s chunks);
- bf16, stochastic: each addition rounded stochastically;
- aligned(32,14): the tensor-core model DeepSeek-V3 describes for H800 FP8 GEMMs, no promotion.

LeNet: its two convolutions (as implicit GEMMs) and two linear layers; the ViT: its linear
layers and attention's two matmuls (the patch embedding stays float32).

    python examples/accumulation_training.py                 # both models, ~15 min on 2 cores
    python examples/accumulation_training.py --models lenet --epochs 1 --train-limit 2000

Prints a markdown table (test accuracy, gap to float in points, training time) and writes
results.json to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import lightning_lowp as lp
from lightning_lowp.vit import Attention

RUNS: dict[str, dict[str, Any] | None] = {
    "float": None,
    "bf16": {"accumulate": "bf16"},
    "bf16, chunk 32": {"accumulate": "bf16", "chunk": 32},
    "bf16, stochastic": {"accumulate": "bf16", "accumulate_rounding": "stochastic"},
    "aligned(32,14)": {"accumulate": "aligned(32,14)", "accumulate_rounding": "toward_zero"},
}
MODELS = ("lenet", "vit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="RUN")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; default 2")
    p.add_argument("--train-limit", type=int, default=5000, help="train on the first N images; default 5000")
    p.add_argument("--test-limit", type=int, default=10000, help="test on the first N images; default all 10,000")
    p.add_argument("--limit-batches", type=int, default=None, help="at most N train/test batches (smoke tests)")
    p.add_argument("--dataset", choices=["auto", "mnist", "fashion-mnist"], default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output-dir", default="outputs/accumulation_training")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("epochs", "train_limit", "test_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def make_model(name: str, steps: int) -> pl.LightningModule:
    if name == "lenet":
        return lp.LeNet(lr=0.02)
    return lp.ViT(lr=2e-3, max_steps=steps)


def make_callback(model: str, settings: dict[str, Any] | None) -> lp.QuantizeMatmuls | None:
    if settings is None:
        return None
    if model == "lenet":
        return lp.QuantizeMatmuls(**settings, modules=(nn.Conv2d, nn.Linear))
    return lp.QuantizeMatmuls(**settings, attention=True, modules=(nn.Linear, Attention))


def run(model_name: str, run_name: str, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    data = lp.MNISTFamily(
        args.dataset, args.data_dir, batch_size=64, train_limit=args.train_limit, val_limit=args.test_limit
    )
    data.setup("fit")
    batches = len(data.train_dataloader())
    if args.limit_batches:
        batches = min(batches, args.limit_batches)
    callback = make_callback(model_name, RUNS[run_name])
    limits = {"limit_train_batches": args.limit_batches, "limit_test_batches": args.limit_batches}
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback] if callback else [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **({k: v for k, v in limits.items() if v}),
    )
    model = make_model(model_name, args.epochs * batches)
    start = time.time()
    trainer.fit(model, datamodule=data)
    seconds = time.time() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return {
        "model": model_name,
        "run": run_name,
        "test_acc": round(100 * metrics["test/acc"], 2),
        "test_loss": round(metrics["test/loss"], 4),
        "train_seconds": round(seconds, 1),
        "dataset": data.dataset_name,
    }


def table(rows: list[dict[str, Any]]) -> str:
    floats = {r["model"]: r["test_acc"] for r in rows if r["run"] == "float"}
    lines = ["| model | accumulation | test acc (%) | gap (pts) | train (s) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['test_acc'] - floats[r['model']]:+.2f}" if r["model"] in floats and r["run"] != "float" else ""
        lines.append(f"| {r['model']} | {r['run']} | {r['test_acc']:.2f} | {gap} | {r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("highest")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in args.models:
        for run_name in args.runs:
            row = run(model_name, run_name, args)
            rows.append(row)
            acc, seconds = row["test_acc"], row["train_seconds"]
            print(f"{model_name:5s} {run_name:16s} test acc {acc:6.2f}%  ({seconds} s)", flush=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print()
    print(f"{rows[0]['dataset']}, {args.epochs} epochs on {args.train_limit} images, tested on {args.test_limit}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
