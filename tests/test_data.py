"""kiln.utils.data against torch.utils.data: batching, collation, shuffling, samplers, splits."""

import collections
import warnings

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import kiln
import kiln.utils.data as kud


def plain(x):
    """A comparable view of a batch: tensors become (dtype name, shape, values)."""
    if isinstance(x, kiln.Tensor):
        return ("T", x.dtype.name, tuple(x.shape), x._data.tolist())
    if isinstance(x, torch.Tensor):
        return ("T", str(x.dtype).replace("torch.", ""), tuple(x.shape), x.tolist())
    if isinstance(x, dict):
        return ("dict", {k: plain(v) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return ("namedtuple", type(x).__name__, [plain(v) for v in x])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [plain(v) for v in x])
    return x


def both(fn):
    """Run fn(lib) with lib = kiln.utils.data-like namespace and torch.utils.data."""
    return fn(kud, kiln), fn(tud, torch)


Point = collections.namedtuple("Point", "x y")


def _samples(lib):
    """Samples of many kinds; the same Python/numpy values for both libraries."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        out.append({
            "tensor": lib.tensor(rng.standard_normal(3).astype(np.float32)),
            "int_tensor": lib.tensor([i, i + 1]),
            "np": rng.standard_normal((2, 2)),
            "np32": np.arange(3, dtype=np.int32) + i,
            "np_scalar": np.float32(i / 2),
            "float": i / 3,
            "int": i,
            "bool": bool(i % 2),
            "str": f"s{i}",
            "tuple": (i, float(i)),
            "list": [np.uint8(i), [i, i]],
            "point": Point(i, i * 0.5),
        })
    return out


# -- collation ------------------------------------------------------------------------------------
def test_default_collate_matches_torch_structure_dtypes_and_values():
    k, t = kud.default_collate(_samples(kiln)), tud.default_collate(_samples(torch))
    assert plain(k) == plain(t)
    assert k["float"].dtype == kiln.float64 and k["int"].dtype == kiln.int64
    assert k["bool"].dtype == kiln.bool and isinstance(k["tuple"], list)


@pytest.mark.parametrize("batch", [
    [1.5, 2], [1, 2.5], [True, False], [np.float16(1), np.float16(2)], [np.int32(3)],
    [np.zeros((0, 2), np.float32)] * 3, [b"a", b"b"], [[1, 2], [3, 4]], [(1, "a"), (2, "b")],
])
def test_default_collate_small_cases(batch):
    assert plain(kud.default_collate(batch)) == plain(tud.default_collate(batch))


def test_default_collate_promotes_mixed_tensor_dtypes_like_torch():
    k = kud.default_collate([kiln.zeros(2, dtype=kiln.int64), kiln.ones(2)])
    t = tud.default_collate([torch.zeros(2, dtype=torch.int64), torch.ones(2)])
    assert plain(k) == plain(t)


@pytest.mark.parametrize("make_batch, exc", [
    (lambda lib: [None, None], TypeError),
    (lambda lib: [[1, 2], [3]], RuntimeError),
    (lambda lib: [lib.zeros(3), lib.zeros(2)], RuntimeError),
    (lambda lib: [np.array(["a"]), np.array(["b"])], TypeError),
    (lambda lib: [object(), object()], TypeError),
])
def test_default_collate_errors_match_torch(make_batch, exc):
    with pytest.raises(exc):
        tud.default_collate(make_batch(torch))
    with pytest.raises(exc, match="default_collate|equal size|stack"):
        kud.default_collate(make_batch(kiln))


def test_default_convert_matches_torch():
    data = [np.zeros(2), 1, (np.ones(1, np.float32), "s"), {"a": np.int64(3)}]
    assert plain(kud.default_convert(data)) == plain(tud.default_convert(data))


# -- DataLoader over map-style datasets -----------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("batch_size", [1, 3, 5, 10, 16])
@pytest.mark.parametrize("drop_last", [False, True])
def test_len_and_batch_sizes_match_torch(n, batch_size, drop_last):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n)
    kl = kud.DataLoader(kud.TensorDataset(kiln.tensor(x), kiln.tensor(y)),
                        batch_size=batch_size, drop_last=drop_last)
    tl = tud.DataLoader(tud.TensorDataset(torch.tensor(x), torch.tensor(y)),
                        batch_size=batch_size, drop_last=drop_last)
    assert len(kl) == len(tl)
    kb, tb = [plain(b) for b in kl], [plain(b) for b in tl]
    assert kb == tb  # sequential order: values, dtypes, shapes and structure all equal
    assert len(kb) == len(kl)


def test_list_dataset_of_mixed_samples_matches_torch():
    kl = kud.DataLoader(_samples(kiln), batch_size=3)
    tl = tud.DataLoader(_samples(torch), batch_size=3)
    assert [plain(b) for b in kl] == [plain(b) for b in tl]


def test_batch_size_none_disables_batching_like_torch():
    data = [(np.arange(3) + i, i) for i in range(4)]
    kl, tl = kud.DataLoader(data, batch_size=None), tud.DataLoader(data, batch_size=None)
    assert len(kl) == len(tl) == 4
    assert [plain(b) for b in kl] == [plain(b) for b in tl]


def test_tensor_dataset_fast_path_equals_per_sample_collation():
    x = kiln.tensor(np.random.default_rng(1).standard_normal((50, 3, 2)).astype(np.float16))
    y = kiln.tensor(np.arange(50, dtype=np.int32))
    m = kiln.tensor(np.arange(50) % 3 == 0)
    ds = kud.TensorDataset(x, y, m)
    for sub in (ds, kud.random_split(ds, [0.6, 0.4])[0], kud.Subset(kud.Subset(ds, [5, 3, 9, 1]),
                                                                     [3, 0, 2])):
        fast = kud.DataLoader(sub, batch_size=7, shuffle=True,
                              generator=kiln.Generator().manual_seed(3))
        slow = kud.DataLoader(sub, batch_size=7, shuffle=True, collate_fn=kud.default_collate,
                              generator=kiln.Generator().manual_seed(3))
        fb, sb = [plain(b) for b in fast], [plain(b) for b in slow]
        assert fb == sb and len(fb) == len(fast)
        assert [b[1] for b in fb[0][1]] == ["float16", "int32", "bool"]


def test_fast_path_batches_are_copies():
    ds = kud.TensorDataset(kiln.zeros(4, 2))
    (batch,) = next(iter(kud.DataLoader(ds, batch_size=4)))
    batch._data += 1
    assert ds.tensors[0]._data.sum() == 0


def test_custom_sampler_batch_sampler_and_getitems():
    ds = list(range(10))
    ks = kud.DataLoader(ds, batch_size=3, sampler=[9, 0, 4, 4, 2])
    ts = tud.DataLoader(ds, batch_size=3, sampler=[9, 0, 4, 4, 2])
    assert [plain(b) for b in ks] == [plain(b) for b in ts]
    batches = [[1, 2], [7], [0, 3, 5]]
    kb = kud.DataLoader(ds, batch_sampler=batches)
    tb = tud.DataLoader(ds, batch_sampler=batches)
    assert len(kb) == len(tb) == 3
    assert [plain(b) for b in kb] == [plain(b) for b in tb]

    class Batched(kud.Dataset):
        calls = 0

        def __len__(self):
            return 6

        def __getitem__(self, i):
            raise AssertionError("__getitems__ should be used")

        def __getitems__(self, idx):
            Batched.calls += 1
            return [i * 10 for i in idx]

    out = [b.tolist() for b in kud.DataLoader(Batched(), batch_size=4)]
    assert out == [[0, 10, 20, 30], [40, 50]] and Batched.calls == 2


def test_subclassed_sampler_iteration_is_respected():
    class Reversed(kud.SequentialSampler):
        def __iter__(self):
            return iter(range(len(self.data_source) - 1, -1, -1))

    ds = kud.TensorDataset(kiln.arange(5))
    out = [b[0].tolist() for b in kud.DataLoader(ds, batch_size=2, sampler=Reversed(ds))]
    assert out == [[4, 3], [2, 1], [0]]


def test_num_workers_runs_in_process_with_same_results():
    ds = kud.TensorDataset(kiln.arange(20))
    a = [b[0].tolist() for b in kud.DataLoader(ds, batch_size=6, num_workers=2)]
    b = [b[0].tolist() for b in kud.DataLoader(ds, batch_size=6, num_workers=0)]
    assert a == b
    assert kud.get_worker_info() is None


# -- shuffling ------------------------------------------------------------------------------------
def _epoch(loader):
    return np.concatenate([b[0]._data for b in loader]).tolist()


def test_shuffle_is_a_permutation_that_changes_per_epoch():
    ds = kud.TensorDataset(kiln.arange(100))
    loader = kud.DataLoader(ds, batch_size=8, shuffle=True)
    e1, e2 = _epoch(loader), _epoch(loader)
    assert sorted(e1) == sorted(e2) == list(range(100))
    assert e1 != e2 and e1 != list(range(100))


def test_shuffle_reproducible_under_manual_seed():
    ds = kud.TensorDataset(kiln.arange(64))
    kiln.manual_seed(123)
    a = [_epoch(kud.DataLoader(ds, batch_size=5, shuffle=True)) for _ in range(2)]
    kiln.manual_seed(123)
    b = [_epoch(kud.DataLoader(ds, batch_size=5, shuffle=True)) for _ in range(2)]
    assert a == b and a[0] != a[1]


def test_shuffle_with_explicit_generator_ignores_global_state():
    ds = kud.TensorDataset(kiln.arange(64))
    kiln.manual_seed(1)
    a = _epoch(kud.DataLoader(ds, batch_size=5, shuffle=True,
                              generator=kiln.Generator().manual_seed(7)))
    kiln.manual_seed(2)
    kiln.rand(10)
    b = _epoch(kud.DataLoader(ds, batch_size=5, shuffle=True,
                              generator=kiln.Generator().manual_seed(7)))
    assert a == b


def test_shuffle_drop_last_keeps_only_full_batches():
    ds = kud.TensorDataset(kiln.arange(23))
    loader = kud.DataLoader(ds, batch_size=5, shuffle=True, drop_last=True)
    sizes = [len(b[0]) for b in loader]
    assert sizes == [5, 5, 5, 5] and len(loader) == 4


# -- iterable datasets ----------------------------------------------------------------------------
def _stream(lib):
    class Stream(lib.IterableDataset):
        def __iter__(self):
            return iter([(np.float32(i), i) for i in range(11)])

        def __len__(self):
            return 11

    return Stream()


@pytest.mark.parametrize("batch_size, drop_last", [(4, False), (4, True), (None, False), (11, 0)])
def test_iterable_dataset_matches_torch(batch_size, drop_last):
    kl = kud.DataLoader(_stream(kud), batch_size=batch_size, drop_last=bool(drop_last))
    tl = tud.DataLoader(_stream(tud), batch_size=batch_size, drop_last=bool(drop_last))
    assert len(kl) == len(tl)
    assert [plain(b) for b in kl] == [plain(b) for b in tl]


def test_chain_and_concat_datasets():
    c = kud.ConcatDataset([list(range(3)), list(range(10, 15))])
    tc = tud.ConcatDataset([list(range(3)), list(range(10, 15))])
    assert len(c) == len(tc) == 8
    assert [c[i] for i in range(-8, 8)] == [tc[i] for i in range(-8, 8)]
    with pytest.raises(IndexError):
        c[8]
    with pytest.raises(ValueError):
        c[-9]
    assert len(kud.TensorDataset(kiln.zeros(2)) + kud.TensorDataset(kiln.zeros(3))) == 5
    chained = kud.ChainDataset([_stream(kud), _stream(kud)])
    assert sum(1 for _ in chained) == 22 and len(chained) == 22


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(sampler=[0, 1], shuffle=True),
    dict(batch_sampler=[[0]], batch_size=2),
    dict(batch_sampler=[[0]], drop_last=True),
    dict(batch_size=None, drop_last=True),
    dict(num_workers=-1),
    dict(batch_size=0),
    dict(batch_size=2, drop_last="yes"),
    dict(prefetch_factor=2),
    dict(persistent_workers=True),
])
def test_loader_argument_errors_match_torch(kwargs):
    with pytest.raises(ValueError):
        tud.DataLoader(list(range(4)), **kwargs)
    with pytest.raises(ValueError):
        kud.DataLoader(list(range(4)), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(shuffle=True), dict(sampler=[0]),
                                    dict(batch_sampler=[[0]])])
def test_iterable_dataset_rejects_sampling_options_like_torch(kwargs):
    with pytest.raises(ValueError):
        tud.DataLoader(_stream(tud), **kwargs)
    with pytest.raises(ValueError, match="IterableDataset"):
        kud.DataLoader(_stream(kud), **kwargs)


def test_tensor_dataset_errors():
    with pytest.raises(ValueError, match="Size mismatch"):
        kud.TensorDataset(kiln.zeros(3), kiln.zeros(4))
    with pytest.raises(TypeError):
        kud.TensorDataset(np.zeros(3))
    ds = kud.TensorDataset(kiln.zeros(3, 2), kiln.arange(3))
    x, y = ds[-1]
    assert tuple(x.shape) == (2,) and y.shape == () and y.item() == 2
    with pytest.raises(IndexError):
        ds[3]


# -- samplers -------------------------------------------------------------------------------------
def test_samplers_basic_semantics():
    assert list(kud.SequentialSampler(range(4))) == list(tud.SequentialSampler(range(4)))
    rs = kud.RandomSampler(range(10))
    assert sorted(rs) == list(range(10)) and len(rs) == 10
    rep = kud.RandomSampler(range(3), replacement=True, num_samples=50)
    drawn = list(rep)
    assert len(drawn) == len(rep) == 50 and set(drawn) <= {0, 1, 2}
    many = list(kud.RandomSampler(range(4), num_samples=10))
    assert sorted(many[:4]) == sorted(many[4:8]) == [0, 1, 2, 3] and len(many) == 10
    sub = list(kud.SubsetRandomSampler([7, 3, 11]))
    assert sorted(sub) == [3, 7, 11]
    w = list(kud.WeightedRandomSampler([0.0, 1.0, 0.0, 3.0], num_samples=200))
    assert set(w) == {1, 3} and 0.6 < w.count(3) / 200 < 0.9
    nw = sorted(kud.WeightedRandomSampler([1, 1, 0, 1], num_samples=3, replacement=False))
    assert nw == [0, 1, 3]
    for k, t in ((10, 3), (9, 3), (2, 5)):
        for drop in (False, True):
            kb = kud.BatchSampler(range(k), t, drop)
            tb = tud.BatchSampler(range(k), t, drop)
            assert list(kb) == list(tb) and len(kb) == len(tb)


def test_sampler_errors_match_torch():
    for lib in (kud, tud):
        with pytest.raises(ValueError):
            lib.RandomSampler(range(3), num_samples=0)
        with pytest.raises(TypeError):
            lib.RandomSampler(range(3), replacement=1)
        with pytest.raises(ValueError):
            lib.BatchSampler(range(3), batch_size=True, drop_last=False)
        with pytest.raises(ValueError):
            lib.WeightedRandomSampler([[1.0]], num_samples=1)


# -- random_split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n, lengths", [
    (10, [3, 7]), (10, [0.3, 0.7]), (30, [0.3, 0.3, 0.4]), (11, [0.5, 0.5]), (7, [0.1] * 10),
    (5, [5, 0]), (0, [0, 0]),
])
def test_random_split_lengths_match_torch_and_are_disjoint(n, lengths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = kud.random_split(range(n), lengths, generator=kiln.Generator().manual_seed(0))
        t = tud.random_split(range(n), lengths, generator=torch.Generator().manual_seed(0))
    assert [len(s) for s in k] == [len(s) for s in t]
    seen = [i for s in k for i in s]
    assert sorted(seen) == list(range(n))


def test_random_split_reproducible_and_errors():
    ds = list(range(20))
    a = [list(s) for s in kud.random_split(ds, [5, 15], generator=kiln.Generator().manual_seed(4))]
    b = [list(s) for s in kud.random_split(ds, [5, 15], generator=kiln.Generator().manual_seed(4))]
    assert a == b
    kiln.manual_seed(9)
    c = [list(s) for s in kud.random_split(ds, [5, 15])]
    kiln.manual_seed(9)
    assert c == [list(s) for s in kud.random_split(ds, [5, 15])]
    for lib in (kud, tud):
        with pytest.raises(ValueError):
            lib.random_split(ds, [5, 5])
        with pytest.raises(ValueError):
            lib.random_split(ds, [1.5, -0.5])
    with pytest.warns(UserWarning, match="Length of split at index 1 is 0"):
        kud.random_split(list(range(3)), [1.0, 0.0])


def test_subset_indexing():
    ds = kud.TensorDataset(kiln.arange(10) * 2 if hasattr(kiln.Tensor, "__mul__")
                           else kiln.tensor(np.arange(10) * 2))
    sub = kud.Subset(ds, [4, 1, 7])
    assert len(sub) == 3 and sub[0][0].item() == 8 and sub[-1][0].item() == 14
    assert [x.tolist() for x in sub[[0, 2]]] == [[8, 14]]


def test_generic_subscript_and_stack_dataset():
    class Squares(kud.Dataset[int]):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i * i

    assert [b.tolist() for b in kud.DataLoader(Squares(), batch_size=3)] == [[0, 1, 4], [9]]
    s = kud.StackDataset(a=Squares(), b=list("wxyz"))
    assert s[2] == {"a": 4, "b": "y"} and len(s) == 4
    batch = next(iter(kud.DataLoader(s, batch_size=2)))
    assert batch["a"].tolist() == [0, 1] and batch["b"] == ["w", "x"]


def test_collate_keeps_graph_of_samples_that_require_grad():
    if not hasattr(kiln, "stack"):
        pytest.skip("kiln.stack not available yet")
    w = kiln.ones(3, requires_grad=True)
    batch = kud.default_collate([w, w])
    assert batch.requires_grad
    batch.sum().backward()
    assert w.grad.tolist() == [2.0, 2.0, 2.0]
