"""DataLoader: batches, shuffling and collation over a dataset (torch.utils.data.DataLoader).

Worker processes are not used: ``num_workers > 0`` is accepted for compatibility and the data is
loaded in the calling process (NumPy releases the GIL in the copies that dominate loading, and
the common in-memory datasets are served by a batched fast path instead).
"""

from __future__ import annotations

import numpy as np

from kiln.tensor import _make
from kiln.utils.data._collate import default_collate, default_convert
from kiln.utils.data.dataset import IterableDataset, Subset, TensorDataset
from kiln.utils.data.sampler import BatchSampler, RandomSampler, Sampler, SequentialSampler

__all__ = ["DataLoader", "get_worker_info"]


def get_worker_info():
    """Always ``None``: Kiln loads data in the calling process (see ``DataLoader``)."""
    return None


class _InfiniteConstantSampler(Sampler):
    def __iter__(self):
        while True:
            yield None


def _tensor_source(dataset):
    """(TensorDataset, index map or None) when ``dataset`` is a TensorDataset, possibly behind
    Subsets, whose samples can be gathered a whole batch at a time; else None."""
    index_map = None
    while type(dataset) is Subset:
        inner = dataset._as_array()
        index_map = inner if index_map is None else inner[index_map]
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset or any(t._rg for t in dataset.tensors):
        return None
    return dataset, index_map


class DataLoader:
    """Iterate over ``dataset`` in (optionally shuffled) batches, like ``torch.utils.data``.

    Arguments and their rules follow PyTorch: ``shuffle`` makes a ``RandomSampler`` drawing
    from ``generator`` (or the global generator, so ``kiln.manual_seed`` makes epochs
    reproducible); ``sampler`` and ``batch_sampler`` replace the defaults; ``batch_size=None``
    turns automatic batching off; ``collate_fn`` defaults to ``default_collate``.
    ``num_workers``, ``pin_memory``, ``timeout``, ``worker_init_fn``, ``prefetch_factor`` and
    ``persistent_workers`` are accepted and validated, but loading runs in this process and
    ``worker_init_fn`` is never called.

    Batches of a ``TensorDataset`` (or a ``Subset`` of one, e.g. from ``random_split``) with
    the default collation are gathered with one NumPy fancy index per tensor instead of
    stacking samples one by one.

    >>> import kiln
    >>> ds = TensorDataset(kiln.arange(10, dtype=kiln.float32), kiln.arange(10))
    >>> [len(y) for x, y in DataLoader(ds, batch_size=4)]
    [4, 4, 2]
    """

    def __init__(self, dataset, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler=None, batch_sampler=None, num_workers: int = 0, collate_fn=None,
                 pin_memory: bool = False, drop_last: bool = False, timeout: float = 0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError("num_workers option should be non-negative; use num_workers=0 to "
                             "disable multiprocessing.")
        if timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if num_workers == 0 and prefetch_factor is not None:
            raise ValueError("prefetch_factor option could only be specified in multiprocessing."
                             "let num_workers > 0 to enable multiprocessing, otherwise set "
                             "prefetch_factor to None.")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")

        if isinstance(dataset, IterableDataset):
            if shuffle not in (None, False):
                raise ValueError("DataLoader with IterableDataset: expected unspecified shuffle "
                                 f"option, but got shuffle={shuffle}")
            if sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified sampler "
                                 f"option, but got sampler={sampler}")
            if batch_sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified "
                                 f"batch_sampler option, but got batch_sampler={batch_sampler}")
        shuffle = bool(shuffle)
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError("batch_sampler option is mutually exclusive with batch_size, "
                                 "shuffle, sampler, and drop_last")
            batch_size = None
            drop_last = False
        elif batch_size is None and drop_last:
            raise ValueError("batch_size=None option disables auto-batching and is mutually "
                             "exclusive with drop_last")

        if sampler is None:
            if isinstance(dataset, IterableDataset):
                sampler = _InfiniteConstantSampler()
            elif shuffle:
                sampler = RandomSampler(dataset, generator=generator)
            else:
                sampler = SequentialSampler(dataset)
        if batch_size is not None and batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)

        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.in_order = in_order
        self._default_collate = collate_fn is None
        if collate_fn is None:
            collate_fn = default_collate if batch_sampler is not None else default_convert
        self.collate_fn = collate_fn

    @property
    def _auto_collation(self) -> bool:
        return self.batch_sampler is not None

    @property
    def _index_sampler(self):
        return self.batch_sampler if self._auto_collation else self.sampler

    def __len__(self) -> int:
        if isinstance(self.dataset, IterableDataset):
            n = len(self.dataset)  # TypeError for a stream without a length, as in PyTorch
            if self.batch_size is not None:
                n = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
            return n
        return len(self._index_sampler)

    def __iter__(self) -> _LoaderIter:
        return _LoaderIter(self)

    # -- the three ways of producing batches ----------------------------------------------------
    def _iterable_batches(self):
        it = iter(self.dataset)
        collate = self.collate_fn
        if not self._auto_collation:
            for item in it:
                yield collate(item)
            return
        bs = self.batch_size
        batch = []
        for item in it:
            batch.append(item)
            if len(batch) == bs:
                yield collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch)

    def _map_batches(self):
        dataset, collate = self.dataset, self.collate_fn
        if not self._auto_collation:
            for i in self.sampler:
                yield collate(dataset[i])
            return
        bs = self.batch_sampler
        source = _tensor_source(dataset) if self._default_collate else None
        fast_batches = type(bs) is BatchSampler
        if source is not None:
            arrays = [t._data for t in source[0].tensors]
            index_map = source[1]
            n = len(arrays[0])
            for idx in (bs._index_batches() if fast_batches else bs):
                idx = np.asarray(idx, dtype=np.int64)
                if index_map is not None:
                    idx = index_map[idx]
                if idx.size and (idx.max() >= n or idx.min() < -n):
                    bad = int(idx.max() if idx.max() >= n else idx.min())
                    raise IndexError(f"DataLoader: index {bad} is out of range for a "
                                     f"TensorDataset of length {n}")
                yield [_make(a[idx]) for a in arrays]
            return
        getitems = getattr(dataset, "__getitems__", None)
        for idx in (bs._index_batches() if fast_batches else bs):
            if isinstance(idx, np.ndarray):
                idx = idx.tolist()
            if callable(getitems):
                data = getitems(idx)
            else:
                data = [dataset[i] for i in idx]
            yield collate(data)


class _LoaderIter:
    """One pass over a DataLoader (what ``iter(loader)`` returns); knows its length."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = loader
        self._gen = (loader._iterable_batches() if isinstance(loader.dataset, IterableDataset)
                     else loader._map_batches())

    def __iter__(self) -> _LoaderIter:
        return self

    def __next__(self):
        return next(self._gen)

    def __len__(self) -> int:
        return len(self._loader)
