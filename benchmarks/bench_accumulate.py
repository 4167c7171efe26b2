"""Low-precision accumulation throughput: lp.matmul with every addition rounded to fp16, and
with the tensor-core accumulator lp.AlignedSum(32, 14), against torch.matmul in float32
measured in the same run.

    python benchmarks/bench_accumulate.py                  # (256 x 1024) @ (1024 x 256)
    python benchmarks/bench_accumulate.py --m 512 --k 4096 --n 512 --repeats 5
    python benchmarks/bench_accumulate.py --threads 1      # steadier on a shared machine
    python benchmarks/bench_accumulate.py --device cuda --m 4096 --k 4096 --n 4096

On CUDA every call is followed by torch.cuda.synchronize() inside its timing, and
torch.matmul is a true float32 GEMM (TF32 stays off, torch's default for matmuls).

Prints a Markdown table: median time, GFLOP/s (2 M K N flops, as for any GEMM) and the
ratio to torch.matmul (the goal: within 10x), then the exact Python reference
(accumulation_reference.reference_matmul) timed on a small product and extrapolated per
product, to show what the kernel replaces.
"""

import argparse
import statistics
import time

import torch

import lightning_lowp as lp
from lightning_lowp.accumulation_reference import reference_matmul


def median_seconds(fns: dict, repeats: int, sync) -> dict:
    """Median time of each function, measured in interleaved rounds (one call of each per
    round), so that drifts in a shared machine's speed hit every entry alike; ``sync()``
    waits for the device to finish."""
    for fn in fns.values():
        fn()  # warm up
    sync()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--accumulate", default="fp16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    a = torch.randn(args.m, args.k, device=args.device)
    b = torch.randn(args.k, args.n, device=args.device)
    acc = args.accumulate
    ops = {
        ("torch.matmul", "float32", "-"): lambda: torch.matmul(a, b),
        ("lp.matmul", f"{acc} nearest", "None"): lambda: lp.matmul(a, b, acc),
        ("lp.matmul", f"{acc} nearest", "128"): lambda: lp.matmul(a, b, acc, chunk=128),
        ("lp.matmul", f"{acc} stochastic", "None"): lambda: lp.matmul(a, b, acc, "stochastic"),
        ("lp.matmul", f"{acc} stochastic", "128"): lambda: lp.matmul(a, b, acc, "stochastic", chunk=128),
        ("lp.matmul", "aligned(32,14) toward_zero", "None"): lambda: lp.matmul(a, b, "aligned(32,14)", "toward_zero"),
        ("lp.matmul", "aligned(32,14) toward_zero", "128"): lambda: lp.matmul(
            a, b, "aligned(32,14)", "toward_zero", chunk=128
        ),
    }
    seconds = median_seconds(ops, args.repeats, sync)
    flops = 2 * args.m * args.k * args.n
    base = seconds["torch.matmul", "float32", "-"]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}, ({args.m} x {args.k}) @ ({args.k} x {args.n}), median of {args.repeats} interleaved rounds\n")
    print("| op | accumulator | chunk | ms | GFLOP/s | vs torch.matmul |")
    print("|---|---|---|---:|---:|---:|")
    for (op, accumulator, chunk), t in seconds.items():
        print(f"| {op} | {accumulator} | {chunk} | {t * 1e3:.2f} | {flops / t / 1e9:.2f} | {t / base:.1f}x |")

    # The exact reference: Fractions in Python, one product at a time (on the CPU).
    small_a, small_b = torch.randn(8, 64), torch.randn(64, 8)
    start = time.perf_counter()
    reference_matmul(small_a, small_b, acc)
    ref = time.perf_counter() - start
    products = 8 * 64 * 8
    kernel_per_product = seconds["lp.matmul", f"{acc} nearest", "None"] / (args.m * args.k * args.n)
    print(
        f"\nreference_matmul, (8 x 64) @ (64 x 8), {acc}: {ref * 1e3:.0f} ms, {ref / products * 1e6:.1f} us a product; "
        f"the size above would take ~{ref / products * args.m * args.k * args.n:.0f} s "
        f"({ref / products / kernel_per_product:.0f}x the kernel)"
    )


if __name__ == "__main__":
    main()
