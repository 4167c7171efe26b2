"""Sharded training (FSDP2 / DTensor) on two CPU ranks over gloo. The work is in dtensor_check.py and
fsdp_check.py (beside this file), run as scripts: the ranks are processes of their own.

- lp.quantize, lp.quantize_ and lp.quantize_foreach_ accept DTensors and are shard-invariant:
  full_tensor() of the result is the full tensor quantized, bit for bit, in element-wise, block,
  scaled and tiled formats, to nearest and stochastically, sharded along either dim or
  replicated, with shards 2^20 apart in scale (a per-shard exponent or scale would show).
- A model fully sharded under ModelParallelStrategy (fully_shard in configure_model) trains with
  LowPrecision, QuantizeActivations, QuantizeMatmuls and QuantizationMetrics to the same weights,
  bit for bit, as under DDP on the same data.
"""

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO

HERE = Path(__file__).parent


def run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_quantizing_a_dtensor_is_shard_invariant(tmp_path):
    run("dtensor_check.py", tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cases"] == 12 * 2 * 3 * 3  # formats x roundings x placements x functions
    assert result["mismatches"] == []
    assert result["placements_kept"]


def test_fsdp2_trains_to_the_weights_of_ddp_bit_for_bit(tmp_path):
    run("fsdp_check.py", tmp_path / "ddp.json", "ddp", 4)
    run("fsdp_check.py", tmp_path / "fsdp.json", "fsdp", 4)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    fsdp = json.loads((tmp_path / "fsdp.json").read_text())
    assert fsdp["sharded"]  # the parameters really were DTensors
    assert not ddp["sharded"]
    assert ddp["steps"] == fsdp["steps"] == 4
    assert fsdp["weights"].keys() == ddp["weights"].keys()
    for name in ddp["weights"]:
        assert fsdp["weights"][name] == ddp["weights"][name], name
    assert fsdp["operand_stats"] == ddp["operand_stats"]
    assert "net.0/wgrad.grad_output" in fsdp["operand_stats"]
    assert fsdp["full_masters"]  # a checkpoint holds whole master weights, not rank 0's shards
