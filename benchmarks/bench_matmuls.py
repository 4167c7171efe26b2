"""GEMM-operand quantization overhead: a ViT training step, and one linear layer, against torchao's emulation.

    .venv/bin/python benchmarks/bench_matmuls.py                  # float, mxfp8, nvfp4, fp8_tensorwise, torchao
    .venv/bin/python benchmarks/bench_matmuls.py --rounds 5 --recipes mxfp8

The model: ``lp.ViT(image_size=28, patch_size=7, channels=1, num_classes=10, dim=64, depth=4,
heads=4, mlp_dim=128)`` at batch 64 on Fashion-MNIST-shaped random images (17 tokens per image,
so M = 1088 rows in every block's linear layers). A training step is ``zero_grad``, forward,
cross-entropy, backward and the model's own AdamW ``step``, timed with ``time.perf_counter`` in
a bare loop (no Trainer: its per-step bookkeeping would be the same for every configuration and
only dilute the ratios). Configurations, each on its own copy of the same initial model:

* ``float``: plain float32;
* ``lp <recipe>``: ``lp.QuantizeMatmuls.from_name(recipe)`` attached to the model with
  ``attach(model)``: the 17 ``nn.Linear`` layers (16 in the blocks and the head), each GEMM's
  operands quantized along its reduction axis by ``lp.quantized_linear``;
* ``lp mxfp8, head float``: the same with the head left out, the coverage of torchao's row;
* ``torchao MXFP8Linear``: the 16 block linears swapped for torchao's
  ``MXFP8Linear(kernel_preference=EMULATED, scale_calculation_mode=RCEIL)`` (weights copied),
  torchao's MX training linear: ``mx_mm`` quantizes the six operands with ``MXTensor.to_mx``
  and runs each GEMM as dequantize + float32 ``torch.mm``, on the CPU. The head (N = 10, not a
  multiple of 32) stays float: torchao's casts need every quantized axis to be a multiple of
  the block of 32. (``quantize_(model, MXFP8TrainingOpConfig(...))`` is not used: in torchao 0.18
  it drops the bias of an ``nn.Linear``; see tests/lightning/test_matmuls_torchao.py.) Its
  first step's loss is checked to equal ``lp mxfp8, head float``'s bit for bit.

Speed: one process, every configuration's warmup steps first, then ``--rounds`` rounds of
``--steps`` timed steps per configuration, each round starting with the next configuration;
the table gives the median step time and the median over rounds of the ratio of each
configuration's step time to float's in the same round (drift of a shared machine cancels).

The layer benchmark times forward + backward (y, dx, dW, db) of one linear of the ViT's MLP, x
(1088 × K), W (N × K): ``F.linear`` in float32; ``lp.quantized_linear`` with the mxfp8 recipe's
settings; torchao's ``_to_mxfp8_then_scaled_mm`` (what ``MXFP8Linear.forward`` calls) in EMULATED
mode, plus the bias. The second table times only the quantization of the six GEMM operands,
each quantized and dequantized to float32: ``lp.quantize`` along K, N and M, and torchao's
``MXTensor.to_mx(...).dequantize()`` on the contiguous (transposed where ``mx_mm`` transposes)
operands. Both are interleaved by rounds like the step timings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lightning_lowp as lp

BATCH, TOKENS = 64, 17  # (28 / 7)² patches and the class token
M = BATCH * TOKENS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_torchao() -> dict | None:
    """torchao's MX training pieces, or None when torchao (or its MX training) is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear, _to_mxfp8_then_scaled_mm
            from torchao.prototype.mx_formats.config import ScaleCalculationMode
            from torchao.prototype.mx_formats.mx_tensor import MXTensor
            from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    except ImportError as err:
        log(f"torchao's MX training is not available ({err}); its rows are left out")
        return None
    return {
        "MXFP8Linear": MXFP8Linear,
        "mm": _to_mxfp8_then_scaled_mm,
        "MXTensor": MXTensor,
        "EMULATED": KernelPreference.EMULATED,
        "RCEIL": ScaleCalculationMode.RCEIL,
    }


def swap_to_torchao(model: nn.Module, ao: dict) -> int:
    """Replace every nn.Linear whose in and out features are multiples of 32 by torchao's MXFP8Linear."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.in_features % 32 == 0 and child.out_features % 32 == 0:
                new = ao["MXFP8Linear"](
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    kernel_preference=ao["EMULATED"],
                    scale_calculation_mode=ao["RCEIL"],
                )
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                swapped += 1
    return swapped


def make_configs(recipes: list[str], ao: dict | None) -> dict[str, tuple[nn.Module, str]]:
    """{name: (model, what its GEMMs are)}, every model a copy of the same initial ViT."""
    torch.manual_seed(0)
    base = lp.ViT(image_size=28, patch_size=7, channels=1, num_classes=10, dim=64, depth=4, heads=4, mlp_dim=128)
    linears = sum(isinstance(m, nn.Linear) for m in base.modules())
    configs = {"float": (copy.deepcopy(base), "float32")}
    for recipe in recipes:
        model = copy.deepcopy(base)
        cb = lp.QuantizeMatmuls.from_name(recipe)
        cb.attach(model)
        configs[f"lp {recipe}"] = (model, f"{len(cb.hooked)} of {linears} linears")
    if ao is not None:
        model = copy.deepcopy(base)
        cb = lp.QuantizeMatmuls.from_name("mxfp8", predicate=lambda name, module: name != "head")
        cb.attach(model)
        configs["lp mxfp8, head float"] = (model, f"{len(cb.hooked)} of {linears} linears")
        model = copy.deepcopy(base)
        n = swap_to_torchao(model, ao)
        configs["torchao MXFP8Linear (emulated)"] = (model, f"{n} of {linears} linears")
    return configs


def vit_steps(args: argparse.Namespace, ao: dict | None) -> str:
    configs = make_configs(args.recipes, ao)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(4)
    ]
    optimizers = {name: model.configure_optimizers() for name, (model, _) in configs.items()}
    for model, _ in configs.values():
        model.train()
    step_count = dict.fromkeys(configs, 0)

    def step(name: str) -> torch.Tensor:
        model, opt = configs[name][0], optimizers[name]
        x, y = batches[step_count[name] % len(batches)]
        step_count[name] += 1
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    first_loss = {name: step(name) for name in configs}  # the first step from the same weights
    names = list(configs)
    agree = ""
    if "torchao MXFP8Linear (emulated)" in configs:
        same = torch.equal(first_loss["torchao MXFP8Linear (emulated)"], first_loss["lp mxfp8, head float"])
        agree = (
            f"\nFirst step's loss, torchao MXFP8Linear vs lp mxfp8 with the head in float: bit for bit equal: {same}\n"
        )
    for name in names:
        for _ in range(args.warmup - 1):
            step(name)
    log(f"ViT: {len(names)} configurations, {args.rounds} rounds of {args.steps} steps each...")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)
        log(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in names))

    lines = [
        f"ViT (dim 64, depth 4, heads 4, mlp 128), batch 64 of 1x28x28, CPU with {torch.get_num_threads()} threads; "
        f"train step = zero_grad + forward + backward + AdamW step; {args.rounds} rounds of {args.steps} timed steps "
        "per configuration, medians over rounds",
        "",
        "| configuration | GEMMs quantized | step (ms) | steps/s | step time vs float |",
        "|---|---|---:|---:|---:|",
    ]
    for name in names:
        ratio = statistics.median(t / f for t, f in zip(times[name], times["float"], strict=True))
        median = statistics.median(times[name])
        lines.append(f"| {name} | {configs[name][1]} | {1e3 * median:.1f} | {1 / median:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n" + agree


def layer_impls(
    k: int, n: int, ao: dict | None
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """({name: forward + backward of one linear}, {name: quantize-dequantize of its six operands})."""
    settings = lp.QuantizeMatmuls.from_name("mxfp8").settings
    mx = "mx(fp8_e4m3,32,scale_rounding=rceil,dim={})"
    g = torch.Generator().manual_seed(k)
    x = torch.randn(M, k, generator=g).requires_grad_()
    w = (torch.randn(n, k, generator=g) * k**-0.5).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_()
    dy = torch.randn(M, n, generator=g)
    x2, w2 = x.detach(), w.detach()

    def fwd_bwd(linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = w.grad = b.grad = None
            linear(x, w, b).backward(dy)

        return run

    impls = {
        "float": fwd_bwd(F.linear),
        "lp": fwd_bwd(lambda x, w, b: lp.quantized_linear(x, w, b, settings)),
    }
    operands = ((x2, -1), (w2, -1), (dy, -1), (w2, -2), (dy, -2), (x2, -2))
    qdq: dict[str, Callable[[], object]] = {"lp": lambda: [lp.quantize(t, mx.format(d)) for t, d in operands]}
    if ao is not None:
        mm, to_mx, emulated, rceil = ao["mm"], ao["MXTensor"].to_mx, ao["EMULATED"], ao["RCEIL"]
        impls["torchao"] = fwd_bwd(lambda x, w, b: mm(x, w, emulated, rceil) + b)  # = MXFP8Linear.forward
        # as mx_mm casts them: the operands along K as stored, those along N or M transposed and contiguous
        stored = (x2, w2, dy, w2.t().contiguous(), dy.t().contiguous(), x2.t().contiguous())
        qdq["torchao"] = lambda: [
            to_mx(t, torch.float8_e4m3fn, 32, rceil, emulated).dequantize(torch.float32) for t in stored
        ]
    return impls, qdq


def linear_layers(args: argparse.Namespace, ao: dict | None) -> str:
    fwd_bwd_rows, qdq_rows = [], []
    for k, n in ((64, 128), (128, 64)):
        impls, qdq = layer_impls(k, n, ao)
        log(f"linear M={M} K={k} N={n}: {args.rounds} rounds of {args.reps} calls each...")
        t = interleave(impls, args.rounds, args.reps)
        q = interleave(qdq, args.rounds, args.reps)

        def ms(times: list[float]) -> str:
            return f"{1e3 * statistics.median(times):.2f}"

        def ratio(a: list[float], b: list[float]) -> str:
            return f"{statistics.median(x / y for x, y in zip(a, b, strict=True)):.2f}x"

        shape = f"{M}x{k} · ({n}x{k})ᵀ"
        if ao is not None:
            fwd_bwd_rows.append(
                f"| {shape} | {ms(t['float'])} | {ms(t['lp'])} | {ms(t['torchao'])} | {ratio(t['lp'], t['float'])} "
                f"| {ratio(t['torchao'], t['float'])} | {ratio(t['torchao'], t['lp'])} |"
            )
            qdq_rows.append(f"| {shape} | {ms(q['lp'])} | {ms(q['torchao'])} | {ratio(q['torchao'], q['lp'])} |")
        else:
            fwd_bwd_rows.append(
                f"| {shape} | {ms(t['float'])} | {ms(t['lp'])} | n/a | {ratio(t['lp'], t['float'])} | n/a | n/a |"
            )
            qdq_rows.append(f"| {shape} | {ms(q['lp'])} | n/a | n/a |")
    return "\n".join(
        [
            f"One linear layer of the ViT's MLP, forward + backward (y, dx, dW, db), float32 inputs; mxfp8 = E4M3, "
            f"blocks of 32, RCEIL scales; {args.rounds} rounds of {args.reps} calls, medians over rounds",
            "",
            "| x · Wᵀ | float (ms) | lp.quantized_linear (ms) | torchao emulated (ms) | lp vs float "
            "| torchao vs float | torchao vs lp |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *fwd_bwd_rows,
            "",
            "Only the quantize-dequantize of the six GEMM operands (x, W along K; dy, W along N; dy, x along M), "
            "to float32",
            "",
            "| x · Wᵀ | lp.quantize (ms) | torchao to_mx + dequantize (ms) | torchao vs lp |",
            "|---|---:|---:|---:|",
            *qdq_rows,
        ]
    )


def interleave(impls: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of every implementation, per round (each round starting with the next one)."""
    names = list(impls)
    for f in impls.values():  # warm up
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(reps):
                impls[name]()
            times[name].append((time.perf_counter() - start) / reps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["mxfp8", "nvfp4", "fp8_tensorwise"])
    parser.add_argument("--steps", type=int, default=4, help="timed ViT steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed ViT steps per configuration first")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=20, help="timed calls per implementation and round (layer)")
    parser.add_argument("--no-torchao", action="store_true", help="leave torchao's rows out")
    args = parser.parse_args()
    ao = None if args.no_torchao else load_torchao()
    start = time.perf_counter()
    vit = vit_steps(args, ao)
    layer = linear_layers(args, ao)
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(f"\n{vit}\n{layer}")


if __name__ == "__main__":
    main()
