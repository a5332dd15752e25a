"""Fashion-MNIST from the standard IDX files (by default, Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import os

import numpy as np

from kiln.datasets.idx import read_idx
from kiln.tensor import _make
from kiln.utils.data.dataset import Dataset, TensorDataset

__all__ = ["FashionMNIST", "DEFAULT_FASHION_MNIST_ROOT"]

#: Where ``apt-get install dataset-fashion-mnist`` (Debian, Ubuntu) puts the four .gz files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_INSTALL = "apt-get install dataset-fashion-mnist"


def _find(root: str, stem: str) -> str:
    # The flat layout of the Debian package and of the original release, and torchvision's
    # root/FashionMNIST/raw layout, each compressed or not.
    for d in (root, os.path.join(root, "FashionMNIST", "raw")):
        for name in (stem + ".gz", stem):
            p = os.path.join(d, name)
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(
        f"FashionMNIST: {stem}(.gz) not found in {root!r}. Install the data set with "
        f"`{_INSTALL}` (it goes to {DEFAULT_FASHION_MNIST_ROOT}), or pass root= a directory "
        "holding the four IDX files of https://github.com/zalandoresearch/fashion-mnist")


class FashionMNIST(Dataset):
    """Zalando's Fashion-MNIST: 28x28 grey images of 10 clothing classes, 60,000 for training
    and 10,000 for testing, with torchvision's interface.

    ``root`` is a directory holding the IDX files (``train-images-idx3-ubyte.gz`` etc., gzip
    or not); by default the Debian package's ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``).  ``data`` is the uint8 tensor (N, 28, 28) and
    ``targets`` the int64 labels.  ``ds[i]`` is ``(image, label)`` with the image a float32
    tensor (1, 28, 28) scaled to [0, 1] (what torchvision gives after ``ToTensor()``) and the
    label an int; ``transform`` / ``target_transform`` are applied to them.
    ``tensor_dataset()`` gives all of it as one ``TensorDataset`` for fast batched loading.
    """

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root=None, train: bool = True, transform=None, target_transform=None,
                 download: bool = False) -> None:
        if download:
            raise RuntimeError(f"FashionMNIST: kiln does not download data; install it with "
                               f"`{_INSTALL}` or pass root=")
        self.root = os.fspath(root) if root is not None else DEFAULT_FASHION_MNIST_ROOT
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        prefix = "train" if train else "t10k"
        img_path = _find(self.root, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find(self.root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"FashionMNIST: {img_path!r} should hold uint8 images of shape "
                             f"(N, 28, 28), found {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"FashionMNIST: {lbl_path!r} should hold a 1-d uint8 label "
                             f"vector, found {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(f"FashionMNIST: {len(images)} images in {img_path!r} but "
                             f"{len(labels)} labels in {lbl_path!r}")
        if labels.size and labels.max() >= len(self.classes):
            raise ValueError(f"FashionMNIST: label {int(labels.max())} in {lbl_path!r} is not "
                             f"a class (0..{len(self.classes) - 1})")
        self.data = _make(images)
        self.targets = _make(labels.astype(np.int64))

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int):
        img = _make((self.data._data[index] / np.float32(255))[None])
        target = int(self.targets._data[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def tensor_dataset(self, flatten: bool = False) -> TensorDataset:
        """All images as float32 in [0, 1], shape (N, 1, 28, 28) (or (N, 784) with
        ``flatten``), with the int64 labels, as a TensorDataset (the DataLoader's fast path).
        ``transform`` and ``target_transform`` are not applied."""
        x = self.data._data.astype(np.float32) / np.float32(255)
        x = x.reshape(len(x), -1) if flatten else x[:, None]
        return TensorDataset(_make(x), _make(self.targets._data.copy()))

    def __repr__(self) -> str:
        return (f"Dataset FashionMNIST\n    Number of datapoints: {len(self)}\n"
                f"    Root location: {self.root}\n    Split: {'Train' if self.train else 'Test'}")
