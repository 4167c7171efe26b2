"""How much a matmul's low-precision accumulator costs, as the length K of its sums grows.

Two experiments, each against the exact product (float64, which is exact for these operands'
products and sums to well under float32's last place):

1. DeepSeek-V3 (arXiv 2412.19437, §3.3): FP8 E4M3 operands, GEMMs whose tensor cores keep
   about 14 bits of the aligned partial sums. We model that accumulator as
   lp.AlignedSum(group=32, bits=14) (groups of 32 products aligned to the largest exponent,
   truncated to 14 bits, summed exactly, stored to float32 toward zero), with and without
   promotion into float32 every 128 products (their N_C = 128), next to float32
   accumulation. The paper reports "a maximum relative error of nearly 2%" at K = 4096.
2. Wang et al. (NeurIPS 2018, "Training deep neural networks with 8-bit floating point
   numbers"): FP8 E5M2 operands, fp16 and bf16 accumulators with every addition rounded
   (to nearest, or stochastically), with and without chunk-based accumulation (chunks of 64).

The operands are drawn two ways: N(0, 1) (products of both signs: the partial sums wander
like a random walk, growing as sqrt(K)) and U(0, 1) (all products positive, like a row of
post-ReLU activations against positive weights: the partial sums grow as K, so each new
product is ever smaller next to them, the case of swamping). The relative error is
||C - C_exact||_F / ||C_exact||_F over an M x N = 64 x 64 output.

    python examples/accumulation.py                # K = 256 .. 16384, about a minute
    python examples/accumulation.py --readme       # also rewrite the tables in README.md

Writes accumulation.json and accumulation.png (error against K, one panel per experiment
and distribution) to --output-dir and prints the tables as markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import lightning_lowp as lp

#: (label, accumulator, rounding, chunk) of each experiment; None: float32 (torch.matmul).
DEEPSEEK = (
    ("fp32", None, "nearest", None),
    ("14-bit aligned", lp.AlignedSum(32, 14), "toward_zero", None),
    ("14-bit aligned, promoted every 128", lp.AlignedSum(32, 14), "toward_zero", 128),
)
WANG = (
    ("fp16", "fp16", "nearest", None),
    ("fp16, chunks of 64", "fp16", "nearest", 64),
    ("fp16, stochastic", "fp16", "stochastic", None),
    ("bf16", "bf16", "nearest", None),
    ("bf16, chunks of 64", "bf16", "nearest", 64),
    ("bf16, stochastic", "bf16", "stochastic", None),
)
EXPERIMENTS = {"deepseek": ("fp8_e4m3", DEEPSEEK), "wang": ("fp8_e5m2", WANG)}
DISTRIBUTIONS = ("normal", "uniform")
README_MARK = "accumulation-tables"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192, 16384], help="sum lengths")
    p.add_argument("--size", type=int, default=64, help="M = N of every product; default 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/accumulation", help="where the json and the plot go")
    p.add_argument("--readme", action="store_true", help="rewrite the tables between the README's markers")
    return p.parse_args(argv)


def operands(dist: str, size: int, k: int, element: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of shapes (size, k) and (k, size), drawn from dist and rounded to element."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.randn if dist == "normal" else torch.rand
    a = draw(size, k, generator=g)
    b = draw(k, size, generator=g)
    return lp.quantize(a, element), lp.quantize(b, element)


def relative_error(c: torch.Tensor, exact: torch.Tensor) -> float:
    return float((c.double() - exact).norm() / exact.norm())


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, list[float]]]]:
    """results[experiment][distribution][label] = relative errors, one per K."""
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, (element, settings) in EXPERIMENTS.items():
        results[name] = {}
        for dist in DISTRIBUTIONS:
            errors: dict[str, list[float]] = {label: [] for label, *_ in settings}
            for k in args.k:
                start = time.perf_counter()
                a, b = operands(dist, args.size, k, element, args.seed)
                exact = a.double() @ b.double()
                for label, acc, rounding, chunk in settings:
                    gen = torch.Generator().manual_seed(args.seed)
                    c = lp.matmul(a, b, acc, rounding, chunk, generator=gen)
                    errors[label].append(relative_error(c, exact))
                print(f"{name:8s} {dist:7s} K={k:6d}: {time.perf_counter() - start:5.1f} s", flush=True)
            results[name][dist] = errors
    return results


def tables(results: dict[str, dict[str, dict[str, list[float]]]], ks: list[int]) -> str:
    """The markdown tables: relative error in % per K, one row per accumulator."""
    out = []
    for name, (element, _) in EXPERIMENTS.items():
        for dist in DISTRIBUTIONS:
            errors = results[name][dist]
            title = f"**{element} operands, {'N(0,1)' if dist == 'normal' else 'U(0,1)'}**: relative error (%)"
            out.append(title)
            out.append("")
            out.append("| accumulator | " + " | ".join(f"K={k}" for k in ks) + " |")
            out.append("|---|" + "---:|" * len(ks))
            for label, values in errors.items():
                out.append(f"| {label} | " + " | ".join(f"{100 * v:.3g}" for v in values) + " |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot(results: dict[str, dict[str, dict[str, list[float]]]], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for row, (name, (element, _)) in enumerate(EXPERIMENTS.items()):
        for col, dist in enumerate(DISTRIBUTIONS):
            ax = axes[row][col]
            for label, values in results[name][dist].items():
                ax.plot(ks, [max(100 * v, 1e-7) for v in values], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{element} operands, {'N(0,1)' if dist == 'normal' else 'U(0,1)'}")
            ax.set_ylabel("relative error (%)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("K (products per sum)")
    fig.suptitle("Low-precision accumulation: error against the exact product")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite_readme(readme: Path, text: str) -> None:
    """Replace what lies between the README's <!-- accumulation-tables --> markers by text."""
    source = readme.read_text()
    pattern = re.compile(rf"(<!-- {README_MARK}:start -->\n).*?(<!-- {README_MARK}:end -->)", re.S)
    if not pattern.search(source):
        raise SystemExit(f"{readme} has no <!-- {README_MARK}:start --> ... :end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), source))


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    args = parse_args(argv)
    if any(k < 1 for k in args.k) or args.size < 1:
        raise SystemExit("--k and --size must be positive")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(args)
    text = tables(results, args.k)
    print()
    print(text)
    (out_dir / "accumulation.json").write_text(json.dumps({"k": args.k, "results": results}, indent=1))
    plot(results, args.k, out_dir / "accumulation.png")
    print(f"wrote {out_dir / 'accumulation.json'} and {out_dir / 'accumulation.png'}")
    if args.readme:
        rewrite_readme(Path(__file__).resolve().parents[1] / "README.md", text)
        print("rewrote the tables in README.md")
    return results


if __name__ == "__main__":
    main()
