"""Plain helpers shared by the test modules: bit comparisons, IDX data sets, quiet Trainer settings.

Test modules import it as ``helpers`` (``from helpers import same_bits``). pytest's default import
mode puts tests/ on ``sys.path`` when it loads tests/conftest.py, which it always does before
collecting any test below tests/, so the import works from every subdirectory. The fixtures live in
tests/conftest.py; no test module imports from another test module.
"""

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

import lightning_lowp as lp

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"  # files the tests read (a copy of the seed notebook)


# ---- bits --------------------------------------------------------------------------------


def f32(values) -> torch.Tensor:
    """Numbers (rounded once from float64) as a float32 tensor; beyond float32's range they become ±inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(np.asarray(values, dtype=np.float64).astype(np.float32))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of ``t`` (other dtypes converted exactly to float32 first), as int32."""
    return t.detach().float().contiguous().view(torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal as float32 (signed zeros included), except that any NaN equals any NaN."""
    nan = torch.isnan(a.detach().float())
    return torch.equal(nan, torch.isnan(b.detach().float())) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, same shape and the same bits, NaN payloads included."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), (a, b)


def on_grid(t: torch.Tensor, fmt) -> bool:
    """Every value of ``t`` is a value of ``fmt``: quantizing (to nearest) changes nothing."""
    t = t.detach()
    return torch.equal(lp.quantize(t, fmt), t)


# ---- IDX data sets -----------------------------------------------------------------------

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
MNIST_LIKE, FASHION_LIKE = 33, 73  # mean pixels 0.13 and 0.29, as the real datasets


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """``array`` as an IDX file at ``path`` (``path`` + ``.gz`` when ``compress``); returns the path written."""
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_dataset(directory: Path, brightness: int, n_train=40, n_test=20, compress=True, seed=0) -> Path:
    """Four IDX files of fake 28x28 images whose mean pixel is about ``brightness``/255."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 2 * brightness + 1, size=(n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return directory


# ---- Lightning ---------------------------------------------------------------------------

# Trainer arguments for a quiet run on the CPU that writes nothing (no logs, no checkpoints).
QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
