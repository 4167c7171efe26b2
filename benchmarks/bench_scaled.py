"""Scaled formats: our kernels against x.clone() and torchao's pure-PyTorch MX and NVFP4 paths.

    python benchmarks/bench_scaled.py                  # CPU, 2^24 float32 elements
    python benchmarks/bench_scaled.py --device cuda --log2-numel 28

Each preset is timed in nearest and stochastic rounding with its own blocks (runs along the
last dim for MX and NVFP4), and in nearest with the same blocks along dim 0 where that means
something, writing into a preallocated tensor (``lp.quantize_foreach_([out], fmt,
sources=[x])``), against ``out.copy_(x)``; then as ``lp.quantize(x, fmt)``, which allocates
its result, against ``x.clone()``, and torchao's quantize + dequantize of the same format
(``to_mx`` + ``to_dtype``; ``NVFP4Tensor.to_nvfp4(...).dequantize()``), also against
``x.clone()``. All in interleaved rounds of one run. Prints a Markdown table of milliseconds
and ratios.

Why both baselines: a new 64 MiB tensor is fresh pages from the kernel, and on a VM the cost
of faulting them in swings between runs (x.clone() between ~4 and ~20 ms on the machine of
docs/performance.md), which hides the kernels' own speed; the preallocated form shows it.
"""

import argparse
import dataclasses
from collections.abc import Callable

import torch
from bench_kernels import median_seconds

import lightning_lowp as lp

PRESETS = [
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4",
    "mxint8",
    "nvfp4",
    "fp8_tensorwise",
    "fp8_rowwise",
    "fp8_blockwise_1x128",
    "fp8_blockwise_128x128",
]


def torchao_roundtrip(fmt: lp.ScaledFormat) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchao's quantize + dequantize of an MX preset or NVFP4, or None where it has none."""
    try:
        from torchao.prototype.mx_formats import constants
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return None
    if fmt.tensor_scale:  # nvfp4

        def nvfp4(x: torch.Tensor) -> torch.Tensor:
            scale = per_tensor_amax_to_scale(x.abs().amax())
            return NVFP4Tensor.to_nvfp4(x, block_size=16, per_tensor_scale=scale).dequantize(torch.float32)

        return nvfp4
    dtypes = {
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
        "fp6_e3m2": constants.DTYPE_FP6_E3M2,
        "fp6_e2m3": constants.DTYPE_FP6_E2M3,
        "fp4_e2m1": torch.float4_e2m1fn_x2,
    }
    if fmt.scale != "e8m0" or fmt.block != 32 or str(fmt.element) not in dtypes:
        return None
    dtype = dtypes[str(fmt.element)]

    def mx(x: torch.Tensor) -> torch.Tensor:
        scale, data = to_mx(x, dtype, 32)
        return to_dtype(data, scale, dtype, 32, torch.float32)

    return mx


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
    out = torch.empty_like(x)
    into_out = ["nearest", "stochastic", "blocks along dim 0"]  # against out.copy_(x)
    new_tensor = ["lp.quantize", "torchao"]  # against x.clone()
    columns = into_out + new_tensor
    ops: dict[tuple[str, str], Callable[[], object]] = {
        ("out.copy_(x)", ""): lambda: out.copy_(x),
        ("x.clone()", ""): lambda: x.clone(),
    }

    def into(fmt: lp.ScaledFormat, rounding: str = "nearest") -> Callable[[], None]:
        return lambda: lp.quantize_foreach_([out], fmt, rounding, sources=[x])

    for name in args.formats:
        fmt = lp.parse_format(name)
        ops[name, "nearest"] = into(fmt)
        ops[name, "stochastic"] = into(fmt, "stochastic")
        if isinstance(fmt.block, int) or fmt.block == "row":
            ops[name, "blocks along dim 0"] = into(dataclasses.replace(fmt, dim=0))
        ops[name, "lp.quantize"] = lambda fmt=fmt: lp.quantize(x, fmt)
        roundtrip = torchao_roundtrip(fmt)
        if roundtrip is not None:
            ops[name, "torchao"] = lambda roundtrip=roundtrip: roundtrip(x)
    seconds = median_seconds(ops, args.device, args.repeats)
    copy, clone = seconds["out.copy_(x)", ""], seconds["x.clone()", ""]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}, float32 x of 2^{args.log2_numel} elements {tuple(x.shape)}, median of {args.repeats}")
    print(f"interleaved rounds. out.copy_(x): {copy * 1e3:.2f} ms; x.clone(): {clone * 1e3:.2f} ms.")
    print("Each cell: ms (ratio); nearest, stochastic, dim 0: into out, against out.copy_(x);")
    print("lp.quantize and torchao: a new tensor, against x.clone().\n")
    print("| format | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in args.formats:
        cells = [
            f"{seconds[name, c] * 1e3:.2f} ({seconds[name, c] / (copy if c in into_out else clone):.2f}x)"
            if (name, c) in seconds
            else ""
            for c in columns
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
