"""lp.ViT (shapes, training, explicit attention matmuls, hyperparameters, schedule) and the ViT
example end to end (a few batches per run) and its argument checks."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET, REPO
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

import lightning_lowp as lp
from lightning_lowp.vit import Attention

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
EXAMPLE = REPO / "examples" / "vit_lowp.py"


class CountCalls(TorchFunctionMode):
    """Counts the torch functions called under it."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_exported():
    assert lp.ViT is lp.vit.ViT
    assert "ViT" in lp.__all__


@pytest.mark.parametrize(
    ("kwargs", "shape", "classes"),
    [
        ({}, (5, 1, 28, 28), 10),
        ({"image_size": 32, "patch_size": 4, "channels": 3, "num_classes": 7}, (2, 3, 32, 32), 7),
    ],
)
def test_output_shape_and_modules(kwargs, shape, classes):
    torch.manual_seed(0)
    model = lp.ViT(dim=32, depth=2, heads=4, mlp_dim=64, **kwargs)
    assert model(torch.randn(shape)).shape == (shape[0], classes)
    assert isinstance(model.patch_embed, nn.Conv2d)
    assert model.patch_embed.stride == (model.hparams["patch_size"],) * 2
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(model.blocks) == 2
    attn = model.blocks[0].attn
    assert isinstance(attn, Attention)
    assert (attn.qkv.in_features, attn.qkv.out_features, attn.proj.out_features) == (32, 96, 32)
    assert (model.blocks[0].fc1.out_features, model.blocks[0].fc2.out_features) == (64, 32)
    patches = (model.hparams["image_size"] // model.hparams["patch_size"]) ** 2
    assert model.pos_embed.shape == (1, patches + 1, 32)
    assert model.cls_token.shape == (1, 1, 32)
    assert isinstance(model.norm, nn.LayerNorm)
    assert model.head.out_features == classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "heads": 4}, "multiple of heads"),
        ({"image_size": 28, "patch_size": 5}, "multiple of patch_size"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"max_steps": 0}, "max_steps must be a positive int"),
        ({"lr": 0.0}, "lr must be positive"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lp.ViT(**kwargs)


def test_hyperparameters_saved():
    model = lp.ViT(dim=32, depth=2, heads=2, mlp_dim=48, lr=3e-4, weight_decay=0.1, max_steps=100)
    hp = dict(model.hparams)
    assert hp == {
        "image_size": 28,
        "patch_size": 7,
        "channels": 1,
        "num_classes": 10,
        "dim": 32,
        "depth": 2,
        "heads": 2,
        "mlp_dim": 48,
        "lr": 3e-4,
        "weight_decay": 0.1,
        "max_steps": 100,
    }


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = lp.ViT(dim=32, depth=2, mlp_dim=64, lr=3e-3)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_attention_is_explicit_matmuls():
    """A TorchFunctionMode sees q @ kᵀ and attn @ v (not a fused SDPA) and every F.linear."""
    model = lp.ViT(dim=32, depth=3, mlp_dim=64)
    with CountCalls() as mode:
        model(torch.randn(2, 1, 28, 28))
    assert sum(mode.calls[f] for f in MATMULS) == 2 * 3
    assert mode.calls[F.linear] == 4 * 3 + 1  # qkv, proj, fc1, fc2 per block; head
    assert mode.calls[F.scaled_dot_product_attention] == 0


def test_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 17, 32)
    q, k, v = attn.qkv(x).reshape(3, 17, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    expected = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_predict_step_returns_classes():
    model = lp.ViT(dim=32, depth=1)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x).argmax(dim=1)
    assert torch.equal(model.predict_step(x, 0), expected)
    assert torch.equal(model.predict_step((x, torch.zeros(4, dtype=torch.long)), 0), expected)


def test_warmup_cosine_schedule():
    model = lp.ViT(dim=32, depth=1, lr=1e-3, max_steps=100)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(model.head.weight) in decayed
    assert id(model.patch_embed.weight) in decayed
    assert not {id(model.head.bias), id(model.pos_embed), id(model.cls_token), id(model.norm.weight)} & decayed
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4)  # warmup: 10 steps
    assert lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 1e-5


def test_bf16_operands_reach_attention_matmuls():
    """The example's bf16 run: QuantizeMatmuls with Attention selected quantizes its two matmuls."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    callback = lp.QuantizeMatmuls(
        input="bf16", weight="bf16", grad_output="bf16", attention=True, modules=(nn.Linear, Attention)
    )
    trainer = pl.Trainer(max_steps=2, callbacks=[callback], **QUIET)
    trainer.fit(lp.ViT(dim=32, depth=2, mlp_dim=64), DataLoader(data, batch_size=8))
    assert callback.counts[("blocks.1.attn", "matmul")] == 2 * 2  # two matmuls, two steps
    assert callback.counts[("blocks.0.attn.qkv", "linear")] == 2
    assert callback.counts[("head", "linear")] == 2


def test_vit_example_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "--limit-batches",
        "2",
        "--runs",
        "float",
        "mxfp8",
        "nvfp4",
        "--no-progress",
        "--dataset",
        "fashion-mnist",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert list(runs) == ["float", "mxfp8", "nvfp4"]
    assert results["dataset"] == "fashion-mnist"
    assert results["total_seconds"] > 0
    assert all(0 <= r["test_acc"] <= 100 and r["steps"] == 2 * results["epochs"] for r in runs.values())
    assert runs["float"]["gap_to_float"] == 0
    assert len(runs["mxfp8"]["loss_curve"]["loss"]) == runs["mxfp8"]["steps"]
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "results.csv").read_text().count("\n") == 4
    assert (out / "logs" / "nvfp4").is_dir()
    assert (
        "| run | recipe | test acc (%) | gap to float (pp) | GEMM operand SQNR (dB) | train time (s) |" in proc.stdout
    )
    # the operands' SQNR, from QuantizationMetrics: none for float, 8-bit above 4-bit elements
    assert runs["float"]["operand_sqnr_db"] is None
    assert 25 < runs["mxfp8"]["operand_sqnr_db"] < 40
    assert 10 < runs["nvfp4"]["operand_sqnr_db"] < runs["mxfp8"]["operand_sqnr_db"] - 5
    assert "| nvfp4 | nvfp4 |" in proc.stdout
    assert "==> mxfp8: test accuracy" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "float", "mxfp9"], "accepted runs: float, bf16, mxfp8, mxfp4, nvfp4, fp8_tensorwise"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_vit_example_rejects_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "mxfp9" not in message or "'mxfp9'" in proc.stderr
