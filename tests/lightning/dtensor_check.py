"""Standalone DTensor check (run by tests/lightning/test_sharding.py): two CPU ranks (gloo) quantize
DTensors sharded along dim 0 and dim 1 (and replicated), whose shards differ in scale by 2^20,
in element-wise, block, scaled and tiled formats, to nearest and stochastically, with
lp.quantize, lp.quantize_ and lp.quantize_foreach_, and compare full_tensor() of each result
with the unsharded tensor quantized, bit for bit.

    python tests/lightning/dtensor_check.py RESULT.json

Rank 0 writes RESULT.json: {"cases": int, "mismatches": [descriptions], "placements_kept": bool}.
"""

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lightning_lowp as lp

FORMATS = [
    "fixed(8,5)",
    "bf16",
    "fp8_e4m3",
    "bfp(8)",  # one exponent for the whole tensor
    "bfp(8,dim=0)",
    "bfp(8,block_size=4)",
    "mxfp8_e4m3",
    "mxfp4",
    "nvfp4",
    "fp8_rowwise",
    "fp8_tensorwise",
    "fp8_blockwise_128x128",
]
ROUNDINGS = ["nearest", "stochastic"]
PLACEMENTS = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}


def full_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)
    x[:4] *= 2.0**20  # rank 0's rows (Shard(0)) are 2^20 times rank 1's
    x[:, :32] *= 2.0**-10  # and rank 0's columns (Shard(1)) 2^-10 times rank 1's
    return x


def bits(t):
    return t.contiguous().view(torch.int32)


def run(rank, world, init_file, result_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    x = full_tensor()
    mismatches, cases, kept = [], 0, True
    for fmt in FORMATS:
        for rounding in ROUNDINGS:
            for pname, placements in PLACEMENTS.items():
                for api in ("quantize", "quantize_", "quantize_foreach_"):
                    dt = distribute_tensor(x.clone(), mesh, placements, src_data_rank=None)
                    g = torch.Generator().manual_seed(7)
                    if api == "quantize":
                        q = lp.quantize(dt, fmt, rounding, generator=g)
                    elif api == "quantize_":
                        q = lp.quantize_(dt, fmt, rounding, generator=g)
                    else:
                        other = distribute_tensor(x.clone() * 3, mesh, placements, src_data_rank=None)
                        lp.quantize_foreach_([other, dt], fmt, rounding, generator=g)  # dt draws the second key
                        q = dt
                    g_ref = torch.Generator().manual_seed(7)
                    if api == "quantize_foreach_":
                        lp.quantize(x * 3, fmt, rounding, generator=g_ref)
                    expected = lp.quantize(x, fmt, rounding, generator=g_ref)
                    cases += 1
                    kept &= tuple(q.placements) == tuple(placements)
                    if not torch.equal(bits(q.full_tensor()), bits(expected)):
                        mismatches.append(f"{fmt} {rounding} {pname} {api}")
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"cases": cases, "mismatches": mismatches, "placements_kept": kept}, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    result_path = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(2, os.path.join(tmp, "init"), result_path), nprocs=2, join=True)


if __name__ == "__main__":
    main()
