"""Scaled formats (MX): our kernels against x.clone() and torchao's pure-PyTorch MX path.

    python benchmarks/bench_scaled.py                  # CPU, 2^24 float32 elements
    python benchmarks/bench_scaled.py --device cuda --log2-numel 28

Each MX preset is timed with blocks of 32 along the last dim (nearest and stochastic
rounding) and along dim 0, and torchao's ``to_mx`` + ``to_dtype`` (quantize and dequantize,
the same values) for the same element type, in interleaved rounds of the same run. Prints a
Markdown table; ratios are to ``x.clone()``.
"""

import argparse

import torch
from bench_kernels import median_seconds

import lightning_lowp as lp

PRESETS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"]


def torchao_roundtrip(element: str):
    """torchao's quantize-dequantize for an MX element type, or None where torchao has none."""
    try:
        from torchao.prototype.mx_formats import constants
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    except ImportError:
        return None
    dtypes = {
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
        "fp6_e3m2": constants.DTYPE_FP6_E3M2,
        "fp6_e2m3": constants.DTYPE_FP6_E2M3,
        "fp4_e2m1": torch.float4_e2m1fn_x2,
    }
    if element not in dtypes:
        return None
    dtype = dtypes[element]

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        scale, data = to_mx(x, dtype, 32)
        return to_dtype(data, scale, dtype, 32, torch.float32)

    return roundtrip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--log2-numel", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--formats", nargs="*", default=PRESETS)
    args = parser.parse_args()

    torch.manual_seed(0)
    numel = 2**args.log2_numel
    x = torch.randn(4096, numel // 4096, device=args.device)
    ops = {"x.clone()": lambda: x.clone()}
    for name in args.formats:
        fmt = lp.parse_format(name)
        along_0 = lp.ScaledFormat(fmt.element, fmt.block, dim=0, scale_rounding=fmt.scale_rounding)
        ops[f"{name} nearest"] = lambda fmt=fmt: lp.quantize(x, fmt)
        ops[f"{name} stochastic"] = lambda fmt=fmt: lp.quantize(x, fmt, "stochastic")
        ops[f"{name} nearest, blocks along dim 0"] = lambda fmt=along_0: lp.quantize(x, fmt)
        roundtrip = torchao_roundtrip(str(fmt.element))
        if roundtrip is not None:
            ops[f"{name}: torchao to_mx + to_dtype"] = lambda roundtrip=roundtrip: roundtrip(x)
    seconds = median_seconds(ops, args.device, args.repeats)
    clone = seconds["x.clone()"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}, float32 x of 2^{args.log2_numel} elements, median of {args.repeats} interleaved rounds\n")
    print("| op | ms | vs clone |")
    print("|---|---:|---:|")
    for op, t in seconds.items():
        print(f"| {op} | {t * 1e3:.2f} | {t / clone:.2f}x |")


if __name__ == "__main__":
    main()
