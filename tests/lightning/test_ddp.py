"""LowPrecision and QuantizeMatmuls under DDP: two CPU ranks (gloo) with stochastic rounding keep
bit-identical weights. The work is in ddp_check.py (beside this file), run as a script because Lightning's DDP launcher
re-runs the script for every extra rank."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import REPO, on_grid

SCRIPT = Path(__file__).with_name("ddp_check.py")


def test_ddp_ranks_keep_identical_weights_with_stochastic_rounding(tmp_path):
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(result_path), "6"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, output
    assert result_path.exists(), output
    result = json.loads(result_path.read_text())
    assert result["world_size"] == 2
    assert result["steps"] == 6
    assert result["different_data"], "the ranks should have trained on different batches"
    assert result["identical"], f"weights differ across ranks by up to {result['max_abs_difference']}"
    assert result["changed"], "training did not change the weights"
    weights = torch.tensor(result["weights"], dtype=torch.float32)
    assert on_grid(weights, "fixed(8,5)"), "weights are off the fixed(8,5) grid"
    assert not on_grid(weights, "fixed(8,4)")  # ... and use its finest step


def test_ddp_with_quantized_gemm_operands_and_their_metrics(tmp_path):
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(result_path), "4", "matmuls"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, output
    result = json.loads(result_path.read_text())
    assert result["different_data"]
    assert result["identical"], f"weights differ across ranks by up to {result['max_abs_difference']}"
    assert result["changed"]
    # nvfp4 keeps the last 15% of the 2 linear layers (1) in bf16: both run quantized GEMMs, 4 steps
    assert result["quantized_gemms"] == 2 * 4
    assert "net.0/wgrad.input" in result["operand_stats"]
    assert "net.2/fprop.weight" in result["operand_stats"]
