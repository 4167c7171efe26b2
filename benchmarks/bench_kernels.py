"""Kernel throughput: every format x {nearest, stochastic} against x.clone() and torch's casts.

    python benchmarks/bench_kernels.py                 # CPU, 2^24 float32 elements
    python benchmarks/bench_kernels.py --device cuda --log2-numel 28

Prints a Markdown table: median time, Melem/s, and the ratio to x.clone() measured in the
same run (1.00x = as fast as a memory copy; the goal is memory speed).
"""

import argparse
import statistics
import time

import torch

import lightning_lowp as lp

FORMATS = [
    "fixed(8,7)",
    "bf16",
    "fp16",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp4_e2m1",
    "float(8,23)",
    "bfp(8)",
    "bfp(8,dim=0)",
    "bfp(8,block_size=32)",
]


def median_seconds(fns: dict, device: str, repeats: int) -> dict:
    """Median time of each function, measured in interleaved rounds (one call of each per
    round), so that drifts in a shared machine's speed hit every entry alike."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--log2-numel", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--formats", nargs="*", default=FORMATS)
    args = parser.parse_args()

    torch.manual_seed(0)
    numel = 2**args.log2_numel
    # A 2-D shape so that per-dim blocks have something to do: 4096 rows.
    x = torch.randn(4096, numel // 4096, device=args.device)
    out = torch.empty_like(x)

    ops = {}  # (op, rounding) -> function
    ops["x.clone()", ""] = lambda: x.clone()
    ops["out.copy_(x)", ""] = lambda: out.copy_(x)
    ops["x.to(bfloat16)", "torch"] = lambda: x.to(torch.bfloat16)
    ops["x.to(bfloat16).float()", "torch"] = lambda: x.to(torch.bfloat16).float()
    ops["x.to(float16).float()", "torch"] = lambda: x.to(torch.float16).float()
    ops["x.to(float8_e4m3fn).float()", "torch"] = lambda: x.to(torch.float8_e4m3fn).float()
    for spec in args.formats:
        fmt = lp.parse_format(spec)
        for rounding in ("nearest", "stochastic"):
            ops[f"quantize {spec}", rounding] = lambda fmt=fmt, rounding=rounding: lp.quantize(x, fmt, rounding)
        ops[f"quantize_ {spec}", "nearest"] = lambda fmt=fmt: lp.quantize_(out, fmt, "nearest")
    seconds = median_seconds(ops, args.device, args.repeats)
    rows = [(op, rounding, t) for (op, rounding), t in seconds.items()]

    clone = rows[0][2]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}, float32 x of 2^{args.log2_numel} elements, median of {args.repeats} interleaved rounds\n")
    print("| op | rounding | ms | Melem/s | vs clone |")
    print("|---|---|---:|---:|---:|")
    for op, rounding, seconds in rows:
        print(f"| {op} | {rounding} | {seconds * 1e3:.2f} | {numel / seconds / 1e6:.0f} | {seconds / clone:.2f}x |")


if __name__ == "__main__":
    main()
