"""The seed workflow example runs end to end (a few batches per section) and writes its outputs."""

import csv
import json
import os
import subprocess
import sys

from helpers import REPO


def test_lenet_example_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "examples" / "lenet_lowp.py"),
        "--limit-batches",
        "2",
        "--wl",
        "1",
        "4",
        "8",
        "--no-progress",
        "--output-dir",
        str(out),
        "--dataset",
        "fashion-mnist",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Total execution time (s):" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"float", "fixed8", "bfp8", "fixed8_roles", "mxfp8", "nvfp4", "bfp_wl1", "bfp_wl4", "bfp_wl8"}
    assert results["dataset"] == "fashion-mnist"
    assert results["total_seconds"] > 0
    assert all(0 <= r["test_acc"] <= 100 and r["steps"] == 2 for r in runs.values())
    # wl=1 turns every block into zeros: the network cannot learn anything (exactly chance-level outputs)
    assert runs["bfp_wl1"]["test_loss"] > 2.2
    assert (out / "sweep.png").stat().st_size > 10_000
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 9
    assert "| bfp_wl8 | bfp8_sweep |" in proc.stdout


def test_example_rejects_bad_arguments():
    cmd = [sys.executable, str(REPO / "examples" / "lenet_lowp.py"), "--recipes", "fixed9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "known recipes" in proc.stderr
