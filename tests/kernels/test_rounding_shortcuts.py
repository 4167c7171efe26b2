"""The float32 shortcuts of rounding.h for blocks with float scales, against the float64 path.

cpp/float_scaled_shortcuts.cpp includes the kernels' own header (the one the CPU and CUDA
kernels compile) and compares the shortcuts with the float64 path bit for bit over millions
of values, in every mode; stochastic rounding at each value's exact threshold, where an
off-by-one in 2^32 would show (the kernels' random bits would take billions of draws to).
The Python tests hold the float64 path itself to the reference.
"""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_float_scaled_shortcuts_equal_the_float64_path(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler builds the extension, and this check"
    binary = tmp_path / "float_scaled_shortcuts"
    source = ROOT / "tests" / "kernels" / "cpp" / "float_scaled_shortcuts.cpp"
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'cpp'}", str(source), "-o", str(binary)], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 of " in run.stdout.splitlines()[-1]
    checked = int(run.stdout.splitlines()[-1].split(" of ")[1].split()[0])
    assert checked > 1_000_000
