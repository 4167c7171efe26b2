"""Bad and hostile IDX files: each is a ``ValueError`` naming the file, never a crash or a huge allocation.

``read_idx`` checks the header first: the magic number (and, when asked, the type and rank), then
the size it claims against the raw file's size, or against the data really there for gzip (read
in chunks). ``MNISTFamily`` also checks that images are uint8 (N, 28, 28), labels uint8 (N,) in
0..9, and that the counts agree.
"""

import gzip
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MNIST_LIKE, write_dataset, write_idx

from lightning_lowp.data import MNISTFamily, read_idx


def header(code: int, *shape: int) -> bytes:
    """An IDX header: magic number (type ``code``, ``len(shape)`` dimensions) and the dimensions."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


VALID = header(0x08, 2, 3) + bytes(range(6))  # a 2x3 uint8 IDX file

# name: (file content before any gzip, what the error says)
BAD_FILES = {
    "empty": (b"", "is empty"),
    "shorter than a magic number": (b"\x00\x00\x08", "not an IDX file"),
    "bad magic number": (b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
    "unknown type code": (header(0x07, 2, 3) + bytes(6), r"not an IDX file \(bad magic number 00000702\)"),
    "truncated header": (header(0x08, 2, 3, 4)[:10], "truncated IDX header"),
    "truncated data": (VALID[:-1], r"header says shape \(2, 3\) \(6 bytes of data\), file has 5"),
    "no data": (header(0x08, 2, 3), r"header says shape \(2, 3\) \(6 bytes of data\), file has 0"),
    "trailing data": (VALID + b"\x00", "header says shape"),
    "absurd dims": (header(0x08, 2**31, 2**31) + bytes(16), r"shape \(2147483648, 2147483648\) \(4611686018427387904 "),
    # 2^64 bytes: an int64 product of the dims would wrap to 0 and match an empty payload
    "dims overflowing int64": (header(0x08, 2**31, 2**31, 4), r"\(18446744073709551616 bytes of data\), file has 0"),
    "float64 dims claiming exabytes": (header(0x0E, 2**32 - 1, 2**32 - 1, 2**32 - 1), "header says shape"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_idx_files_are_errors_naming_the_file(tmp_path, case, compress):
    content, message = BAD_FILES[case]
    if compress:
        if case == "empty":
            message = "decompresses to nothing"
        content = gzip.compress(content)
    path = tmp_path / ("x-idx3-ubyte.gz" if compress else "x-idx3-ubyte")
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{case}: {peak} bytes allocated"  # the header's claim is never allocated


@pytest.mark.parametrize(
    ("payload", "cause"),
    [
        (lambda good: good[:30], EOFError),  # an interrupted download
        (lambda good: good[:10] + b"\xff" * 10 + good[20:], zlib.error),  # garbled deflate data
        (lambda good: good[:-8] + b"\x00" * 8, gzip.BadGzipFile),  # bad CRC: seen only at the end
        (lambda good: good + b"\x1f\x8b\x08junk", EOFError),  # a broken second member
        (lambda good: good + b"not gzip", gzip.BadGzipFile),  # junk after the gzip data
    ],
    ids=["truncated", "garbled", "bad-crc", "broken-member", "trailing-junk"],
)
def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path, payload, cause):
    good = gzip.compress(header(0x08, 4, 28, 28) + bytes(4 * 28 * 28))
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(payload(good))
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is a corrupt gzip file") as info:
        read_idx(path)
    assert isinstance(info.value.__cause__, cause)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_expected_type_and_rank_are_checked_on_the_header(tmp_path, compress):
    images = write_idx(tmp_path / "i-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.int16), compress)
    with pytest.raises(ValueError, match=re.escape(str(images)) + ".* says torch.int16 data, expected torch.uint8"):
        read_idx(images, dtype=torch.uint8, ndim=3)
    labels = write_idx(tmp_path / "l-idx1-ubyte", np.zeros(2, dtype=np.uint8), compress)
    with pytest.raises(ValueError, match=re.escape(str(labels)) + ".* says 1 dimensions, expected 3"):
        read_idx(labels, dtype=torch.uint8, ndim=3)
    # what is asked for loads
    assert read_idx(images, dtype=torch.int16, ndim=3).shape == (2, 28, 28)
    assert read_idx(labels, dtype=torch.uint8, ndim=1).tolist() == [0, 0]


def test_valid_files_still_load(tmp_path):
    raw = tmp_path / "v-idx2-ubyte"
    raw.write_bytes(VALID)
    gz = tmp_path / "v-idx2-ubyte.gz"
    gz.write_bytes(gzip.compress(VALID))
    for path in (raw, gz):
        t = read_idx(path, dtype=torch.uint8, ndim=2)
        assert t.dtype == torch.uint8
        assert t.tolist() == [[0, 1, 2], [3, 4, 5]]
    empty = tmp_path / "e-idx3-ubyte"  # zero items is a valid IDX file
    empty.write_bytes(header(0x08, 0, 28, 28))
    assert read_idx(empty).shape == (0, 28, 28)


# ---- MNISTFamily: one bad file in an otherwise good data directory --------------------------------

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _idx(array: np.ndarray) -> bytes:
    return (
        header({np.uint8: 0x08, np.float32: 0x0D}[array.dtype.type], *array.shape)
        + array.astype(array.dtype.newbyteorder(">")).tobytes()
    )


# name: (which file, its content, gzip it, what the error says)
BAD_DATASETS = {
    "images that are labels (1 dim)": (IMAGES, _idx(np.zeros(40, np.uint8)), False, "says 1 dimensions, expected 3"),
    "labels with 2 dims": (LABELS, _idx(np.zeros((40, 1), np.uint8)), True, "says 2 dimensions, expected 1"),
    "float32 images": (
        IMAGES,
        _idx(np.zeros((40, 28, 28), np.float32)),
        False,
        "torch.float32 data, expected torch.uint8",
    ),
    "32x32 images": (
        IMAGES,
        _idx(np.zeros((40, 32, 32), np.uint8)),
        True,
        r"expected 28x28 images, got shape \(40, 32, 32\)",
    ),
    "fewer labels than images": (LABELS, _idx(np.zeros(39, np.uint8)), False, "holds 40 images but .* holds 39 labels"),
    "label 10": (LABELS, _idx(np.full(40, 10, np.uint8)), True, r"labels must be 0\.\.9, found 10"),
    "empty images file": (IMAGES, b"", False, "is empty"),
    "truncated images": (IMAGES, _idx(np.zeros((40, 28, 28), np.uint8))[:-100], False, "file has"),
    "truncated gzip labels": (LABELS, gzip.compress(_idx(np.zeros(40, np.uint8)))[:20], False, "corrupt gzip"),
    "absurd image dims": (IMAGES, header(0x08, 2**31, 2**31, 28), True, "header says shape"),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_mnist_family_rejects_a_bad_file_naming_it(tmp_path, case):
    name, content, compress, message = BAD_DATASETS[case]
    d = write_dataset(tmp_path / "d", MNIST_LIKE, compress=False)
    (d / name).unlink()
    path = d / (name + ".gz" if compress else name)
    path.write_bytes(gzip.compress(content) if compress else content)
    dm = MNISTFamily("mnist", data_dir=d, download=False)
    with pytest.raises(ValueError, match=message) as info:
        dm.setup("fit")
    assert str(path) in str(info.value)
    assert dm.train_set is None  # nothing half-loaded


def test_mnist_family_rejects_a_split_without_examples(tmp_path):
    d = write_dataset(tmp_path / "d", MNIST_LIKE, n_train=0)
    with pytest.raises(ValueError, match="hold no examples"):
        MNISTFamily("mnist", data_dir=d, download=False).setup("fit")


def test_mnist_family_loads_a_good_directory_and_keeps_data_dir_as_a_str(tmp_path):
    d = write_dataset(tmp_path / "d", MNIST_LIKE)
    dm = MNISTFamily("mnist", data_dir=Path(d), download=False)
    dm.setup("fit")
    assert dm.train_set is not None
    assert dm.train_set.tensors[0].shape == (40, 1, 28, 28)
    assert dm.data_dir == d
    assert dm.hparams["data_dir"] == str(d)  # a str in checkpoints: they load with weights_only=True
