"""scikit-learn's bundled 8x8 handwritten digits (no download), and a deterministic split."""

from __future__ import annotations

import numpy as np

from kiln.tensor import Tensor, _make

__all__ = ["load_digits", "train_test_split"]


def load_digits(flatten: bool = False) -> tuple[Tensor, Tensor]:
    """The 1,797 8x8 handwritten digits that ship with scikit-learn (UCI optdigits test set).

    Returns ``(images, labels)``: images float32 scaled to [0, 1] (the raw values are 0..16),
    shape (1797, 1, 8, 8) - channels first, ready for ``nn.Conv2d`` - or (1797, 64) with
    ``flatten=True``; labels int64 in 0..9.  Needs scikit-learn: ``pip install "kiln[data]"``.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError('kiln.datasets.load_digits needs scikit-learn, which ships the data: '
                          'pip install "kiln[data]"  (or: pip install scikit-learn)') from None
    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x = x if flatten else x.reshape(-1, 1, 8, 8)
    return _make(x), _make(y.astype(np.int64))


def train_test_split(*tensors: Tensor, test_size: float | int = 0.25, seed: int = 0,
                     stratify: Tensor | None = None) -> list[Tensor]:
    """Split tensors along their first dimension into train and test parts, deterministically.

    Returns ``[a_train, a_test, b_train, b_test, ...]`` like scikit-learn.  ``test_size`` is a
    fraction or a count; the permutation comes from ``seed`` alone (not the global generator),
    so the split is the same on every run and machine.  With ``stratify`` (labels), each class
    contributes its share to the test part.

    >>> import kiln
    >>> x, y = kiln.arange(10), kiln.tensor([0, 1] * 5)
    >>> xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y)
    >>> len(xtr), len(xte), sorted(yte.tolist())
    (8, 2, [0, 1])
    """
    if not tensors:
        raise ValueError("train_test_split: at least one tensor is needed")
    n = tensors[0].shape[0] if tensors[0].ndim else 0
    for t in tensors:
        if t.ndim == 0 or t.shape[0] != n:
            raise ValueError("train_test_split: all tensors need the same first dimension, got "
                             f"{[tuple(t.shape) for t in tensors]}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"train_test_split: test_size={test_size} should be in (0, 1)")
        n_test = int(round(n * test_size))
    else:
        n_test = int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"train_test_split: test_size={test_size} leaves an empty split of "
                         f"{n} samples")
    rng = np.random.default_rng(seed)
    if stratify is None:
        perm = rng.permutation(n)
        test, train = perm[:n_test], perm[n_test:]
    else:
        labels = np.asarray(getattr(stratify, "_data", stratify)).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"train_test_split: stratify has {len(labels)} labels for {n} "
                             "samples")
        classes, inverse = np.unique(labels, return_inverse=True)
        # Largest-remainder allocation: per-class shares that add up to exactly n_test.
        counts = np.bincount(inverse, minlength=len(classes))
        share = counts * (n_test / n)
        take = np.floor(share).astype(np.int64)
        order = np.argsort(-(share - take), kind="stable")
        take[order[:n_test - take.sum()]] += 1
        test_parts, train_parts = [], []
        for c in range(len(classes)):
            members = rng.permutation(np.flatnonzero(inverse == c))
            test_parts.append(members[:take[c]])
            train_parts.append(members[take[c]:])
        test = rng.permutation(np.concatenate(test_parts))
        train = rng.permutation(np.concatenate(train_parts))
    out = []
    for t in tensors:
        out += [_make(t._data[train]), _make(t._data[test])]
    return out
