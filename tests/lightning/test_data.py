"""The IDX reader, MNISTFamily's choice of dataset and its errors, and LeNet."""

import gzip
import re
import struct
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FASHION_LIKE, MNIST_LIKE, write_dataset, write_idx

from lightning_lowp import data
from lightning_lowp.data import DATASETS, LeNet, MNISTFamily, read_idx


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No MNIST download, no Debian Fashion-MNIST, an empty default data directory."""
    calls = []

    def fail(name, root):
        calls.append(Path(root))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: Name or service not known")

    monkeypatch.setattr(data, "_download", fail)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    monkeypatch.setenv("LOWP_DATA_DIR", str(tmp_path / "default-root"))
    return calls


# ---- the IDX reader ------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    tensor = read_idx(path)
    assert tuple(tensor.shape) == (2, 3, 5)
    np.testing.assert_array_equal(tensor.numpy(), array)
    assert tensor.numpy().dtype == np.dtype(dtype)  # native byte order, same type


def test_read_idx_labels_and_images(tmp_path):
    labels = np.array([7, 2, 1, 0, 4], dtype=np.uint8)
    t = read_idx(write_idx(tmp_path / "labels-idx1-ubyte", labels, compress=False))
    assert t.dtype == torch.uint8
    assert t.tolist() == [7, 2, 1, 0, 4]
    images = np.full((3, 28, 28), 255, dtype=np.uint8)
    t = read_idx(write_idx(tmp_path / "images-idx3-ubyte", images, compress=True))
    assert t.shape == (3, 28, 28)
    assert t.dtype == torch.uint8
    assert int(t.min()) == 255


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 4, 4) + b"\x00" * 15)
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        read_idx(truncated)


# ---- choosing the dataset --------------------------------------------------------------


def test_explicit_data_dir_raw_files_normalized_and_limited(tmp_path, offline):
    write_dataset(tmp_path / "d" / "MNIST" / "raw", MNIST_LIKE, compress=False)
    dm = MNISTFamily("mnist", data_dir=tmp_path / "d", batch_size=16, train_limit=35, val_limit=12)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.dataset_name == "mnist"
    assert dm.source_dir == tmp_path / "d" / "MNIST" / "raw"
    x, y = dm.train_set.tensors
    assert x.shape == (35, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert dm.val_set.tensors[0].shape == (12, 1, 28, 28)
    raw = read_idx(tmp_path / "d" / "MNIST" / "raw" / "train-images-idx3-ubyte")[:35].float() / 255
    expected = (raw - 0.1307) / 0.3081  # the seed's normalization
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == [i % 10 for i in range(35)]
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [16, 16, 3]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(y.tolist())  # a shuffle
    assert [len(b[0]) for b in dm.val_dataloader()] == [12]
    assert offline == []  # files on disk: no download attempted


def test_fashion_from_debian_directory_uses_its_own_statistics(tmp_path, offline, monkeypatch):
    debian = write_dataset(tmp_path / "debian", FASHION_LIKE)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    dm = MNISTFamily("fashion-mnist")
    dm.setup("validate")  # without prepare_data, as on ranks other than 0
    assert dm.dataset_name == "fashion-mnist"
    assert dm.source_dir == debian
    assert dm.train_set is None
    assert len(dm.val_set) == 20
    raw = read_idx(debian / "t10k-images-idx3-ubyte.gz").float() / 255
    torch.testing.assert_close(dm.val_set.tensors[0][:, 0], (raw - 0.2860) / 0.3530)
    assert DATASETS["fashion-mnist"]["mean"] == 0.2860
    assert DATASETS["fashion-mnist"]["std"] == 0.3530
    assert offline == []


def test_auto_falls_back_to_fashion_when_mnist_download_fails(tmp_path, offline, monkeypatch):
    debian = write_dataset(tmp_path / "debian", FASHION_LIKE)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    dm = MNISTFamily("auto")
    dm.prepare_data()
    assert dm.dataset_name == "fashion-mnist"
    assert dm.source_dir == debian
    assert offline == [tmp_path / "default-root"]  # MNIST download was tried first, into the default root


def test_auto_prefers_mnist_when_the_download_works(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", write_dataset(tmp_path / "debian", FASHION_LIKE))
    downloads = []

    def fake_download(name, root):  # what torchvision leaves behind: raw files in <root>/MNIST/raw
        assert name == "mnist"
        downloads.append(root)
        write_dataset(Path(root) / "MNIST" / "raw", MNIST_LIKE, compress=False)

    monkeypatch.setattr(data, "_download", fake_download)
    dm = MNISTFamily("auto", data_dir=tmp_path / "cache")
    dm.prepare_data()
    assert dm.dataset_name == "mnist"
    assert dm.source_dir == tmp_path / "cache" / "MNIST" / "raw"
    assert downloads == [tmp_path / "cache"]
    # A second data module finds the files on disk and downloads nothing.
    again = MNISTFamily("auto", data_dir=tmp_path / "cache")
    again.setup("fit")
    assert again.dataset_name == "mnist"
    assert downloads == [tmp_path / "cache"]


def test_auto_tells_a_bare_directory_of_idx_files_apart(tmp_path, offline):
    """MNIST and Fashion-MNIST files have the same names; auto looks at the pixels."""
    dm = MNISTFamily("auto", data_dir=write_dataset(tmp_path / "a", MNIST_LIKE))
    dm.prepare_data()
    assert dm.dataset_name == "mnist"
    dm = MNISTFamily("auto", data_dir=write_dataset(tmp_path / "b", FASHION_LIKE))
    dm.prepare_data()
    assert dm.dataset_name == "fashion-mnist"
    assert dm.source_dir == tmp_path / "b"
    assert offline == []  # an explicit data_dir with Fashion-MNIST wins over a download
    explicit = MNISTFamily("mnist", data_dir=tmp_path / "b", download=False)  # the user knows best
    explicit.prepare_data()
    assert explicit.dataset_name == "mnist"
    assert explicit.source_dir == tmp_path / "b"


def test_clear_error_when_no_dataset_is_available(tmp_path, offline):
    for dataset in ("auto", "mnist", "fashion-mnist"):
        dm = MNISTFamily(dataset, data_dir=tmp_path / "empty")
        with pytest.raises(FileNotFoundError) as info:
            dm.prepare_data()
        message = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "data_dir" in message
        assert "t10k-images-idx3-ubyte" in message
        assert "online" in message
        assert str(tmp_path / "empty") in message  # says where it looked
        shown = "Fashion-MNIST" if dataset == "fashion-mnist" else "MNIST"
        assert f"downloading {shown}" in message
        assert "Name or service not known" in message
    assert len(offline) == 3  # every dataset choice tried torchvision's download
    with pytest.raises(FileNotFoundError, match="download=True"):
        MNISTFamily("mnist", data_dir=tmp_path / "empty", download=False).setup("fit")
    assert len(offline) == 3


def test_incomplete_directory_is_not_used(tmp_path, offline):
    d = write_dataset(tmp_path / "d" / "FashionMNIST" / "raw", FASHION_LIKE)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError):
        MNISTFamily("fashion-mnist", data_dir=tmp_path / "d").prepare_data()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        MNISTFamily("cifar10")
    with pytest.raises(ValueError, match="train_limit"):
        MNISTFamily(train_limit=0)
    with pytest.raises(ValueError, match="batch_size"):
        MNISTFamily(batch_size=0)


# ---- LeNet ---------------------------------------------------------------------------------


def test_lenet_is_the_seed_network():
    model = LeNet()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,),
        "fc2.weight": (10, 500), "fc2.bias": (10,),
    }  # fmt: skip
    assert dict(model.hparams) == {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "num_classes": 10}
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 1e-4)
    assert len(group["params"]) == 8


def test_lenet_fits_on_the_data_module_and_logs(tmp_path, offline):
    write_dataset(tmp_path / "d", MNIST_LIKE)
    dm = MNISTFamily("mnist", data_dir=tmp_path / "d", batch_size=8)
    model = LeNet()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}
    assert 0.0 <= result["test/acc"] <= 1.0


def test_fashion_mnist_is_downloaded_when_nowhere_on_disk(tmp_path, offline, monkeypatch):
    downloads = []

    def fake_download(name, root):  # torchvision's layout: <root>/FashionMNIST/raw
        downloads.append(name)
        write_dataset(Path(root) / "FashionMNIST" / "raw", FASHION_LIKE, compress=False)

    monkeypatch.setattr(data, "_download", fake_download)
    dm = MNISTFamily("fashion-mnist", data_dir=tmp_path / "cache")
    dm.prepare_data()
    assert downloads == ["fashion-mnist"]
    assert dm.dataset_name == "fashion-mnist"
    assert dm.source_dir == tmp_path / "cache" / "FashionMNIST" / "raw"


# ---- errors that name the file or the directory ------------------------------------------------


def test_a_corrupt_gzip_file_is_an_error_naming_it(tmp_path, offline):
    good = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8), compress=True).read_bytes()
    cases = {
        "truncated": (good[:30], EOFError),  # an interrupted download
        "garbled": (good[:10] + b"\xff" * 10 + good[20:], zlib.error),
        "bad-crc": (good[:-8] + b"\x00" * 8, gzip.BadGzipFile),
    }
    for name, (payload, cause) in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte.gz"
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=re.escape(str(path)) + " is a corrupt gzip file") as info:
            read_idx(path)
        assert isinstance(info.value.__cause__, cause), name
    # and when MNISTFamily reads it
    d = write_dataset(tmp_path / "d", MNIST_LIKE)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(good[:30])
    dm = MNISTFamily("mnist", data_dir=d, download=False)
    with pytest.raises(ValueError, match=re.escape(str(d / "train-labels-idx1-ubyte.gz"))):
        dm.setup("fit")


def test_an_explicit_data_dir_without_the_files_is_an_error_naming_it(tmp_path, offline, monkeypatch):
    """Never another copy instead (here: Debian's Fashion-MNIST, which data_dir=None would use)."""
    debian = write_dataset(tmp_path / "debian", FASHION_LIKE)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    missing = tmp_path / "does" / "not" / "exist"
    for dataset in ("fashion-mnist", "auto"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"data_dir='{missing}' does not exist")) as info:
            MNISTFamily(dataset, data_dir=missing, download=False).prepare_data()
        assert "pass download=True" in str(info.value)
        assert "leave data_dir unset" in str(info.value)
    partial = write_dataset(tmp_path / "partial", FASHION_LIKE)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no complete set.*missing there: t10k-labels-idx1-ubyte\)"):
        MNISTFamily("fashion-mnist", data_dir=partial, download=False).setup("fit")
    assert offline == []
    # download=True downloads into it; offline, that is the error (not Debian's copy)
    with pytest.raises(FileNotFoundError, match=r"downloading Fashion-MNIST into .*Name or service not known"):
        MNISTFamily("fashion-mnist", data_dir=missing).prepare_data()
    assert offline == [missing]
    # without data_dir, Debian's copy is used as before
    dm = MNISTFamily("fashion-mnist", download=False)
    dm.prepare_data()
    assert dm.source_dir == debian
