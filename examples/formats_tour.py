"""A tour of the number formats: one tensor rounded to each, with its error.

    python examples/formats_tour.py

Prints, for every preset and a few parametric formats, the values a small tensor becomes,
the signal-to-quantization-noise ratio on a large Gaussian tensor, and what stochastic
rounding does to a mean.
"""

import torch

import lightning_lowp as lp

SPECS = [
    "fp32",
    "bf16",
    "fp16",
    "fp8_e5m2",
    "fp8_e4m3",
    "fp6_e3m2",
    "fp4_e2m1",
    "float(8,7,subnormals=false)",
    "fixed(8,7)",
    "fixed(8,4)",
    "bfp(8)",
    "bfp(8,dim=0)",
    "bfp(4,block_size=32)",
]


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    noise = (x - q).pow(2).mean()
    return float(10 * torch.log10(x.pow(2).mean() / noise)) if noise > 0 else float("inf")


def main() -> None:
    torch.manual_seed(0)
    sample = torch.tensor([0.1, -1.7, 3.14159, 300.0, 1e-5, float("inf")])
    signal = torch.randn(256, 1024)
    print(f"{'format':30} {'sample values':62} SQNR on N(0,1)")
    for spec in SPECS:
        fmt = lp.parse_format(spec)
        values = ", ".join(f"{v:.4g}" for v in lp.quantize(sample, fmt).tolist())
        print(f"{fmt!s:30} [{values}]".ljust(94) + f"{sqnr_db(signal, lp.quantize(signal, fmt)):6.1f} dB")

    # Stochastic rounding is unbiased: the mean of many roundings of 0.3 to a grid of 1.
    x = torch.full((100_000,), 0.3)
    for rounding in ("nearest", "stochastic"):
        mean = lp.quantize(x, "fixed(8,0)", rounding).mean().item()
        print(f"mean of fixed(8,0) {rounding:>10} roundings of 0.3: {mean:.4f}")


if __name__ == "__main__":
    main()
