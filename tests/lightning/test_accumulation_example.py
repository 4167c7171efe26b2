"""examples/accumulation.py runs (short sums), writes its outputs, and rewrites only the README's marked block."""

import importlib.util
import json
import os
import subprocess
import sys

from helpers import REPO

EXAMPLE = REPO / "examples" / "accumulation.py"


def test_runs_and_writes_tables(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--k", "64", "2048", "--size", "16", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "accumulation.json").read_text())
    assert data["k"] == [64, 2048]
    uniform = data["results"]["deepseek"]["uniform"]
    # float32 is far better than 14 aligned bits, and promotion every 128 bounds the growth with K
    assert uniform["fp32"][1] < uniform["14-bit aligned"][1] / 100
    assert uniform["14-bit aligned"][1] > 4 * uniform["14-bit aligned"][0]
    assert uniform["14-bit aligned, promoted every 128"][1] < uniform["14-bit aligned"][1] / 4
    wang = data["results"]["wang"]["uniform"]
    assert wang["bf16, chunks of 64"][1] < wang["bf16"][1] / 4  # chunking stops swamping
    assert "| 14-bit aligned, promoted every 128 |" in proc.stdout
    assert (tmp_path / "accumulation.png").stat().st_size > 10_000


def test_readme_block_is_the_only_change(tmp_path):
    spec = importlib.util.spec_from_file_location("accumulation_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = tmp_path / "README.md"
    start, end = "<!-- accumulation-tables:start -->\n", "<!-- accumulation-tables:end -->\n"
    readme.write_text(f"intro\n{start}old\n{end}tail\n")
    module.rewrite_readme(readme, "| new |\n")
    assert readme.read_text() == f"intro\n{start}| new |\n{end}tail\n"


def test_training_example_runs(tmp_path):
    script = REPO / "examples" / "accumulation_training.py"
    cmd = [sys.executable, str(script), "--epochs", "1", "--limit-batches", "2", "--train-limit", "256"]
    cmd += ["--test-limit", "128", "--dataset", "fashion-mnist", "--output-dir", str(tmp_path)]
    cmd += ["--runs", "float", "bf16, chunk 32", "aligned(32,14)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["run"]) for r in rows] == [
        (m, r) for m in ("lenet", "vit") for r in ("float", "bf16, chunk 32", "aligned(32,14)")
    ]
    assert all(0 <= r["test_acc"] <= 100 for r in rows)
    assert "| vit | aligned(32,14) |" in proc.stdout
