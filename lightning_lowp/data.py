"""The seed notebook's model and data as Lightning objects: ``LeNet`` and ``MNISTFamily``.

``MNISTFamily`` reads the IDX files of MNIST or Fashion-MNIST itself (gzip or raw) into
in-memory tensors, so it works offline and costs no per-item transform:

    >>> import lightning.pytorch as pl
    >>> from lightning_lowp.data import LeNet, MNISTFamily
    >>> dm = MNISTFamily("auto", batch_size=64)            # MNIST if it can be had, else Fashion-MNIST
    >>> pl.Trainer(max_epochs=1).fit(LeNet(), datamodule=dm)  # doctest: +SKIP

Where the files come from, in order: the data directory holding the four IDX files (also
``<dir>/MNIST/raw`` and ``<dir>/FashionMNIST/raw``, torchvision's layout); for Fashion-MNIST
the Debian package's directory (``apt-get install dataset-fashion-mnist`` puts the files in
``/usr/share/datasets/fashion-mnist``); then, with ``download=True``, a torchvision download
(MNIST, or Fashion-MNIST when asked for by name) into the data directory, which needs network
access. The data directory is ``data_dir``, default ``$LOWP_DATA_DIR``, else
``~/.cache/lightning_lowp``.

An explicit ``data_dir`` is the only place looked in: a copy elsewhere (Debian's included) is
never used instead. If it does not hold the files, they are downloaded into it
(``download=True``), or a ``FileNotFoundError`` names it and the files missing there.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["ClassifierModule", "LeNet", "MNISTFamily", "read_idx", "DATASETS", "DEBIAN_FASHION_MNIST_DIR"]

#: Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetInfo(TypedDict):
    """What :data:`DATASETS` holds for one dataset.

    Args:
        folder: torchvision's folder name for the dataset (``MNIST``, ``FashionMNIST``).
        mean: the pixel mean (of [0, 1] pixels) used to normalize.
        std: the pixel standard deviation (of [0, 1] pixels) used to normalize.
    """

    folder: str
    mean: float
    std: float


#: Per dataset: torchvision's folder name and the pixel mean and std (of [0, 1] pixels) used to
#: normalize. MNIST's are the seed notebook's; Fashion-MNIST's are its training set's own.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": {"folder": "MNIST", "mean": 0.1307, "std": 0.3081},
    "fashion-mnist": {"folder": "FashionMNIST", "mean": 0.2860, "std": 0.3530},
}

_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FILES = [name for pair in _SPLITS.values() for name in pair]

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "IDX file format").
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---- IDX files ------------------------------------------------------------------------


def read_idx(path: str | Path, *, dtype: torch.dtype | None = None, ndim: int | None = None) -> torch.Tensor:
    """An IDX file (``.gz`` or raw, told apart by content) as a tensor of its shape and type.

    The header is checked before any data is read: the size it claims is compared with the
    file's size (raw files) or with the data actually decompressed (gzip, read in chunks), so a
    header claiming absurd dimensions is an error, never a huge allocation.

    Args:
        path: the IDX file, gzipped or raw.
        dtype: if given, the type the file must hold (e.g. ``torch.uint8``); checked on the
            header, before the data is read.
        ndim: if given, the number of dimensions the file must have (3 for images, 1 for
            labels); checked on the header.

    Returns:
        The file's data, of the shape its header gives: uint8 data (images, labels) comes back
        as ``torch.uint8``; other types in their native width.

    Raises:
        ValueError: naming the file, on an empty file, gzip data that does not decompress (a
            truncated or corrupt download; the gzip error is chained), a bad magic number (not
            IDX, or not the ``dtype``/``ndim`` asked for), a truncated header, or data whose
            size does not match the header (truncated, trailing bytes, or absurd dimensions).
    """
    path = Path(path)
    with open(path, "rb") as raw:
        if raw.read(2) == b"\x1f\x8b":
            raw.seek(0)
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    return _read_idx_stream(path, unzipped, None, dtype, ndim)
            # EOFError: truncated; BadGzipFile (an OSError): bad header or CRC; zlib.error: bad deflate data
            except (EOFError, OSError, zlib.error) as err:
                raise ValueError(
                    f"{path} is a corrupt gzip file ({type(err).__name__}: {err}); "
                    "delete it and download or copy it again"
                ) from err
        raw.seek(0)
        return _read_idx_stream(path, raw, os.fstat(raw.fileno()).st_size, dtype, ndim)


_CHUNK = 1 << 20  # bytes read at a time from a gzip file, whose data size is known only once read


def _read_idx_stream(
    path: Path, f: io.BufferedIOBase, size: int | None, dtype: torch.dtype | None, ndim: int | None
) -> torch.Tensor:
    """``read_idx`` of an open stream: ``size`` is the stream's length in bytes, if known (raw files)."""
    magic = f.read(4)
    if not magic:
        empty = "is empty" if size is not None else "decompresses to nothing"
        raise ValueError(f"{path} {empty}: not an IDX file; delete it and download or copy it again")
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {magic.hex()})")
    np_dtype = np.dtype(_IDX_DTYPES[magic[2]])
    file_dtype = torch.from_numpy(np.empty(0, dtype=np_dtype.newbyteorder("="))).dtype
    if dtype is not None and file_dtype != dtype:
        raise ValueError(
            f"{path}: the IDX header (magic number {magic.hex()}) says {file_dtype} data, expected {dtype}"
        )
    if ndim is not None and magic[3] != ndim:
        raise ValueError(
            f"{path}: the IDX header (magic number {magic.hex()}) says {magic[3]} dimensions, expected {ndim}"
        )
    dims = f.read(4 * magic[3])
    if len(dims) < 4 * magic[3]:
        raise ValueError(
            f"{path}: truncated IDX header ({4 + len(dims)} bytes, {magic[3]} dimensions need {4 + 4 * magic[3]})"
        )
    shape = struct.unpack(f">{magic[3]}I", dims)
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: no overflow, whatever the header says
    claim = f"header says shape {tuple(shape)} ({expected} bytes of data)"
    if size is not None:  # a raw file: its size is known before anything is allocated
        if size - 4 - len(dims) != expected:
            raise ValueError(f"{path}: {claim}, file has {size - 4 - len(dims)}")
        payload: bytes | bytearray = f.read(expected)
    else:  # gzip: read in chunks, so memory follows the data really there, not the header's claim
        payload = bytearray()
        while len(payload) < expected:
            chunk = f.read(min(_CHUNK, expected - len(payload)))
            if not chunk:
                break
            payload += chunk
    if len(payload) != expected:
        raise ValueError(f"{path}: {claim}, file has {len(payload)}")
    if f.read(1):  # also makes gzip check its CRC and length at the end of the stream
        raise ValueError(f"{path}: {claim}, file has more (trailing data)")
    array = np.frombuffer(payload, dtype=np_dtype).reshape(shape)
    return torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _require_file(directory: Path, name: str) -> Path:
    """``_find_file``, raising ``FileNotFoundError`` if ``directory`` holds neither form of ``name``."""
    path = _find_file(directory, name)
    if path is None:
        raise FileNotFoundError(f"neither {name} nor {name}.gz is in {directory}")
    return path


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds all four IDX files (each raw or gzipped)."""
    return directory.is_dir() and all(_find_file(directory, n) is not None for n in _FILES)


def _looks_like(directory: Path) -> str:
    """Which of the two datasets the IDX files in ``directory`` hold, by their mean test pixel.

    The file names are the same; the mean test pixel is MNIST 0.13, Fashion-MNIST 0.29.
    """
    path = _require_file(directory, _SPLITS["test"][0])
    return _looks_like_file(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _looks_like_file(path: str, mtime_ns: int) -> str:
    images = read_idx(path)
    return "mnist" if images[:2000].float().mean().item() / 255 < 0.21 else "fashion-mnist"


def _download(name: str, root: Path) -> None:
    """Download MNIST or Fashion-MNIST with torchvision into ``root/<Folder>/raw``.

    Raises when offline.
    """
    import torchvision  # only needed here; slow to import

    dataset = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    dataset(str(root), download=True)


def _default_root() -> Path:
    return Path(os.environ.get("LOWP_DATA_DIR") or Path.home() / ".cache" / "lightning_lowp")


# ---- the data module --------------------------------------------------------------------


class MNISTFamily(pl.LightningDataModule):
    """MNIST or Fashion-MNIST from IDX files, as normalized in-memory tensors.

    The training split is the 60,000 training images (shuffled each epoch); validation and
    test both use the 10,000 test images, as the seed notebook evaluates on them after every
    epoch. Images are ``float32`` of shape ``(N, 1, 28, 28)``, normalized with the dataset's
    pixel mean and std (MNIST: the seed's 0.1307, 0.3081; Fashion-MNIST: 0.2860, 0.3530);
    labels are ``int64``.

    Args:
        dataset: ``"mnist"``, ``"fashion-mnist"``, or ``"auto"``: MNIST if its files are found
            or can be downloaded, else Fashion-MNIST.
        data_dir: a directory holding the four IDX files (``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
            each raw or ``.gz``), or torchvision's layout below it (``MNIST/raw``,
            ``FashionMNIST/raw``); also where a dataset is downloaded to. Given, it is the only
            place looked in: without the files there (and ``download=False``, or an offline
            download) it is an error naming it, never a fallback to another copy. Default:
            ``$LOWP_DATA_DIR``, else ``~/.cache/lightning_lowp``, searched the same way, then
            for Fashion-MNIST the Debian package's ``/usr/share/datasets/fashion-mnist``.
            Both datasets use the same file names: with ``"auto"`` the files of a bare
            directory are told apart by their mean pixel (MNIST 0.13, Fashion-MNIST 0.29).
        batch_size: as the seed notebook (64).
        num_workers: DataLoader workers (the tensors are in memory: 0 is usually fastest).
        train_limit: use only the first N training examples (quick runs, CI).
        val_limit: use only the first N test examples (quick runs, CI).
        download: allow torchvision's download (MNIST, or Fashion-MNIST when asked for by name)
            into the data directory when the files are not on disk.

    Attributes:
        dataset_name: after ``prepare_data``/``setup``, which dataset is used
            (``"mnist"`` or ``"fashion-mnist"``).
        source_dir: after ``prepare_data``/``setup``, where its files were read from.
    """

    def __init__(
        self,
        dataset: str = "auto",
        data_dir: str | Path | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        train_limit: int | None = None,
        val_limit: int | None = None,
        download: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in ("auto", *DATASETS):
            raise ValueError(f"dataset must be one of 'auto', {', '.join(map(repr, DATASETS))}; got {dataset!r}")
        for name, value in (("train_limit", train_limit), ("val_limit", val_limit)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # Saved as a str, not a Path: a checkpoint's hyperparameters then load with weights_only=True.
        data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.download = download
        self.dataset_name: str | None = None
        self.source_dir: Path | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.num_classes = 10
        self.dims = (1, 28, 28)

    # ---- finding the files --------------------------------------------------------------

    def _root(self) -> Path:
        """Where the files are searched first and downloaded to: ``data_dir``, else the default."""
        return self.data_dir if self.data_dir is not None else _default_root()

    def _candidates(self, name: str) -> list[Path]:
        """Directories that may hold ``name``'s files, in order of preference.

        An explicit ``data_dir`` is the only place looked in (with torchvision's layout below
        it): the user said where the files are, and another copy found elsewhere would be
        used without their knowing. Without one, the default root, then for Fashion-MNIST the
        Debian package's directory.
        """
        root = self._root()
        dirs = [root, root / DATASETS[name]["folder"] / "raw"]
        if name == "fashion-mnist" and self.data_dir is None:
            dirs.append(DEBIAN_FASHION_MNIST_DIR)
        return dirs

    def _locate(self, name: str) -> Path | None:
        for directory in self._candidates(name):
            if not _complete(directory):
                continue
            # The file names do not say which dataset a bare directory holds: with "auto",
            # look at the pixels; an explicit dataset= is trusted.
            if (
                self.dataset == "auto"
                and directory.name != "raw"
                and directory != DEBIAN_FASHION_MNIST_DIR
                and _looks_like(directory) != name
            ):
                continue
            return directory
        return None

    def _resolve(self, download: bool) -> tuple[str, Path]:
        """(dataset name, directory of its IDX files).

        Raises ``FileNotFoundError`` saying where it looked and how to get a dataset if none
        can be had.
        """
        wanted = ["mnist", "fashion-mnist"] if self.dataset == "auto" else [self.dataset]
        errors: list[str] = []

        def try_download(name: str = "mnist") -> Path | None:
            root = self._root()
            try:
                _download(name, root)
            except Exception as err:  # offline: URLError, RuntimeError, ...
                message = " ".join(str(err).split())
                shown = "MNIST" if name == "mnist" else "Fashion-MNIST"
                errors.append(f"downloading {shown} into {root} failed ({type(err).__name__}: {message[:300]})")
            return self._locate(name)

        if self.dataset == "mnist":
            found = self._locate("mnist") or (try_download() if download else None)
            if found is not None:
                return "mnist", found
        elif self.dataset == "fashion-mnist":
            found = self._locate("fashion-mnist") or (try_download("fashion-mnist") if download else None)
            if found is not None:
                return "fashion-mnist", found
        else:  # "auto": MNIST on disk; Fashion-MNIST in an explicit data_dir; MNIST download; Debian's
            found = self._locate("mnist")
            if found is not None:
                return "mnist", found
            if self.data_dir is not None:
                found = self._locate("fashion-mnist")
                if found is not None:
                    return "fashion-mnist", found
            found = try_download() if download else None
            if found is not None:
                return "mnist", found
            found = self._locate("fashion-mnist")  # Debian's, without an explicit data_dir
            if found is not None:
                return "fashion-mnist", found
        raise FileNotFoundError(self._not_found(wanted, errors, download))

    def _not_found(self, wanted: list[str], errors: list[str], download: bool) -> str:
        """The message of ``_resolve``'s error: where it looked, what failed, what to do."""
        names = " or ".join(wanted)
        searched = ", ".join(dict.fromkeys(str(d) for name in wanted for d in self._candidates(name)))
        files = (
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            "t10k-labels-idx1-ubyte (raw or .gz)"
        )
        failed = f"; {'; '.join(errors)}" if errors else ""
        if self.data_dir is not None:
            root = self.data_dir
            if not root.is_dir():
                problem = f"data_dir={str(root)!r} does not exist"
            else:
                missing = [n for n in _FILES if _find_file(root, n) is None]
                problem = f"data_dir={str(root)!r} holds no complete set of {names} IDX files"
                problem += f" (missing there: {', '.join(missing)})" if missing else ""
            shown = "Fashion-MNIST" if self.dataset == "fashion-mnist" else "MNIST"
            how = f"pass download=True to download {shown} into it" if not download else "be online for the download"
            return (
                f"MNISTFamily: {problem}; looked in: {searched}{failed}. Put {files} in data_dir "
                f"(or torchvision's MNIST/raw or FashionMNIST/raw below it), {how}, or leave data_dir unset to "
                f"use the default directory ({_default_root()}) and, for Fashion-MNIST, the Debian package's "
                f"{DEBIAN_FASHION_MNIST_DIR} (`apt-get install dataset-fashion-mnist`)."
            )
        return (
            f"MNISTFamily: no {names} IDX files found (looked in: {searched}){failed}. To get a dataset: "
            f"`apt-get install dataset-fashion-mnist` (Fashion-MNIST, into {DEBIAN_FASHION_MNIST_DIR}), "
            f"or pass data_dir= a directory holding {files}, or be online for torchvision's download"
            + ("" if download else " (and pass download=True)")
            + "."
        )

    @override
    def prepare_data(self) -> None:
        """Find the files, downloading MNIST if needed and allowed (Lightning: rank 0 only)."""
        self.dataset_name, self.source_dir = self._resolve(download=self.download)

    # ---- loading ------------------------------------------------------------------------

    def _load(self, name: str, directory: Path, split: str, limit: int | None) -> TensorDataset:
        image_file, label_file = (_require_file(directory, n) for n in _SPLITS[split])
        # uint8 (N, 28, 28) images and N uint8 labels in 0..9: type and rank are checked on the
        # headers, before any data is read
        images = read_idx(image_file, dtype=torch.uint8, ndim=3)
        labels = read_idx(label_file, dtype=torch.uint8, ndim=1)
        if tuple(images.shape[1:]) != self.dims[1:]:
            raise ValueError(f"{image_file}: expected 28x28 images, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels")
        if len(labels) == 0:
            raise ValueError(f"{image_file} and {label_file} hold no examples")
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"{label_file}: labels must be 0..{self.num_classes - 1}, found {int(labels.max())}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        stats = DATASETS[name]
        x = images.unsqueeze(1).float().div_(255).sub_(stats["mean"]).div_(stats["std"])
        return TensorDataset(x, labels.long())

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.dataset_name is None or self.source_dir is None:  # ranks other than 0, or setup() called directly
            try:
                self.dataset_name, self.source_dir = self._resolve(download=False)
            except FileNotFoundError:
                if not self.download:
                    raise
                self.dataset_name, self.source_dir = self._resolve(download=True)
        rank_zero_info(f"MNISTFamily: using {self.dataset_name} from {self.source_dir}")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._load(self.dataset_name, self.source_dir, "train", self.train_limit)
        if stage in (None, "fit", "validate", "test", "predict") and self.val_set is None:
            self.val_set = self._load(self.dataset_name, self.source_dir, "test", self.val_limit)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader[tuple[torch.Tensor, ...]]:
        if dataset is None:
            raise RuntimeError("MNISTFamily: call setup() for this stage before asking for its dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader(self.val_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return self._loader(self.val_set, shuffle=False)


# ---- the model --------------------------------------------------------------------------


class ClassifierModule(pl.LightningModule):
    """The steps of an image classifier whose ``forward`` returns logits (LeNet's and ViT's).

    The loss is ``F.cross_entropy``; logs ``train/loss``, ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc`` (accuracy as a fraction); ``predict_step`` returns the
    predicted classes.
    """

    @override
    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=True, sync_dist=True)
        return loss

    @override
    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    @override
    def predict_step(
        self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)


class LeNet(ClassifierModule):
    """The seed notebook's LeNet and its SGD.

    The network: conv 1->20 k5, pool, conv 20->50 k5, pool, fc 800->500, fc 500->10, ReLU; the
    optimizer: SGD (lr 0.05, momentum 0.9, weight decay 1e-4). ``forward`` returns logits; the
    loss is ``F.cross_entropy``. Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss``
    and ``test/acc`` (accuracy as a fraction).

    Args:
        lr: SGD's learning rate (the seed's 0.05).
        momentum: SGD's momentum (the seed's 0.9).
        weight_decay: SGD's weight decay (the seed's 1e-4).
        num_classes: the number of outputs of the last layer (logits).
    """

    def __init__(
        self, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    @override
    def configure_optimizers(self) -> torch.optim.SGD:
        return torch.optim.SGD(
            self.parameters(),
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
        )
