"""kiln.datasets: the IDX reader (on files written here), Fashion-MNIST, digits, text corpus."""

import gzip
import os
import struct
import sys
import zlib

import numpy as np
import pytest

import kiln
from kiln.datasets import (
    CharTokenizer,
    FashionMNIST,
    load_digits,
    load_text_corpus,
    read_idx,
    train_test_split,
    write_idx,
)
from kiln.datasets.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT
from kiln.datasets.text import TEXT_CORPORA

HAVE_FASHION = os.path.isfile(os.path.join(DEFAULT_FASHION_MNIST_ROOT,
                                           "t10k-labels-idx1-ubyte.gz"))
HAVE_KJV = os.path.isfile(os.path.join(TEXT_CORPORA["kjv"][0], "nt.bzz"))
try:
    import sklearn  # noqa: F401
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False

needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
needs_kjv = pytest.mark.skipif(
    not HAVE_KJV, reason="KJV text not installed (apt-get install sword-text-kjv)")
needs_sklearn = pytest.mark.skipif(
    not HAVE_SKLEARN, reason='scikit-learn not installed (pip install "kiln[data]")')


# -- IDX ------------------------------------------------------------------------------------------
def test_read_idx_parses_hand_written_bytes(tmp_path):
    raw = bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 1, 2, 255])
    big = bytes([0, 0, 0x0C, 2, 0, 0, 0, 1, 0, 0, 0, 2]) + struct.pack(">ii", -5, 70000)
    dbl = bytes([0, 0, 0x0E, 1, 0, 0, 0, 1]) + struct.pack(">d", 1.25)
    out = {}
    for name, data in (("u8", raw), ("i32", big), ("f64", dbl)):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.write(data)
        out[name] = read_idx(p)
    assert out["u8"].dtype == np.uint8 and out["u8"].tolist() == [1, 2, 255]
    assert out["i32"].dtype == np.int32 and out["i32"].tolist() == [[-5, 70000]]
    assert out["f64"].dtype == np.float64 and out["f64"].tolist() == [1.25]
    assert out["i32"].dtype.isnative and out["i32"].flags.writeable


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 0, 3), (2, 3, 4)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, shape, gz):
    a = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    with open(p, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    b = read_idx(p)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def _valid_idx_bytes():
    return bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))


@pytest.mark.parametrize("data, why", [
    (b"", "only 0 bytes"),
    (b"\x00\x00", "only 2 bytes"),
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "bad magic"),
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 7]), "unknown data type"),
    (bytes([0, 0, 8, 0]), "zero dimensions"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "truncated header"),
    (_valid_idx_bytes()[:-1], "truncated"),
    (_valid_idx_bytes() + b"\x00", "trailing bytes"),
    (gzip.compress(_valid_idx_bytes())[:-6], "corrupt gzip"),
    (b"\x1f\x8b" + b"garbage" * 4, "corrupt gzip"),
])
def test_idx_corruption_is_a_clear_error(tmp_path, data, why):
    p = tmp_path / "bad-idx"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=f"not a valid IDX file: .*bad-idx.*{why}"):
        read_idx(p)


def test_write_idx_rejects_unsupported_dtypes(tmp_path):
    with pytest.raises(TypeError, match="IDX cannot hold"):
        write_idx(tmp_path / "x", np.zeros(2, np.int64))


# -- Fashion-MNIST on a small fake copy ------------------------------------------------------------
def _fake_fashion(root, n=5, gz=True, labels=None, layout_dir=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
    d = root if layout_dir is None else os.path.join(root, layout_dir)
    os.makedirs(d, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    return images, labels


@pytest.mark.parametrize("gz, layout", [(True, None), (False, None),
                                        (True, os.path.join("FashionMNIST", "raw"))])
def test_fashion_mnist_on_fake_files(tmp_path, gz, layout):
    images, labels = _fake_fashion(str(tmp_path), gz=gz, layout_dir=layout)
    for train in (True, False):
        ds = FashionMNIST(root=tmp_path, train=train)
        assert len(ds) == 5
        assert ds.data.dtype == kiln.uint8 and tuple(ds.data.shape) == (5, 28, 28)
        assert ds.targets.dtype == kiln.int64 and ds.targets.tolist() == labels.tolist()
        img, label = ds[3]
        assert img.dtype == kiln.float32 and tuple(img.shape) == (1, 28, 28)
        np.testing.assert_allclose(img._data[0], images[3] / 255.0, rtol=1e-6)
        assert label == 3 and isinstance(label, int)
        td = ds.tensor_dataset(flatten=True)
        x, y = td[4]
        assert tuple(x.shape) == (784,) and y.item() == 4
        assert 0.0 <= td.tensors[0]._data.min() and td.tensors[0]._data.max() <= 1.0


def test_fashion_mnist_transforms_and_loader(tmp_path):
    _fake_fashion(str(tmp_path), n=10)
    ds = FashionMNIST(tmp_path, transform=lambda t: t._data.sum(), target_transform=str)
    assert ds[2][1] == "2" and isinstance(ds[2][0], np.floating)
    loader = kiln.utils.data.DataLoader(FashionMNIST(tmp_path), batch_size=4)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (4, 1, 28, 28) and y.dtype == kiln.int64
    assert "Number of datapoints: 10" in repr(ds)


def test_fashion_mnist_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        FashionMNIST(root=tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    bad = tmp_path / "bad"
    _fake_fashion(str(bad), labels=np.array([0, 1, 2], np.uint8))
    with pytest.raises(ValueError, match="5 images .* but 3 labels"):
        FashionMNIST(bad)
    worse = tmp_path / "worse"
    _fake_fashion(str(worse), labels=np.array([0, 1, 2, 3, 12], np.uint8))
    with pytest.raises(ValueError, match="label 12"):
        FashionMNIST(worse)
    corrupt = tmp_path / "corrupt"
    _fake_fashion(str(corrupt))
    p = corrupt / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a valid IDX file"):
        FashionMNIST(corrupt)
    with pytest.raises(RuntimeError, match="does not download"):
        FashionMNIST(tmp_path, download=True)


@needs_fashion
def test_real_fashion_mnist():
    test = FashionMNIST(train=False)
    assert len(test) == 10_000 and tuple(test.data.shape) == (10_000, 28, 28)
    assert np.bincount(test.targets._data).tolist() == [1000] * 10
    assert test.targets.tolist()[:3] == [9, 2, 1]  # ankle boot, pullover, trouser
    img, _ = test[0]
    assert float(img._data.min()) == 0.0 and float(img._data.max()) == 1.0
    train = FashionMNIST(train=True)
    assert len(train) == 60_000 and np.bincount(train.targets._data).tolist() == [6000] * 10


# -- digits ---------------------------------------------------------------------------------------
@needs_sklearn
def test_load_digits_shapes_dtypes_ranges():
    x, y = load_digits()
    assert tuple(x.shape) == (1797, 1, 8, 8) and x.dtype == kiln.float32
    assert y.dtype == kiln.int64 and tuple(y.shape) == (1797,)
    assert float(x._data.min()) == 0.0 and float(x._data.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    xf, yf = load_digits(flatten=True)
    assert tuple(xf.shape) == (1797, 64) and np.array_equal(xf._data.reshape(x.shape), x._data)


def test_load_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "kiln\[data\]"'):
        load_digits()


def test_train_test_split_deterministic_disjoint_stratified():
    n = 103
    x = kiln.tensor(np.arange(n * 2, dtype=np.float32).reshape(n, 2))
    y = kiln.tensor(np.arange(n) % 4)
    a = train_test_split(x, y, test_size=0.2, seed=5)
    b = train_test_split(x, y, test_size=0.2, seed=5)
    assert all(np.array_equal(p._data, q._data) for p, q in zip(a, b))
    xtr, xte, ytr, yte = a
    assert len(xtr) + len(xte) == n and len(xte) == round(0.2 * n)
    rows = sorted(xtr._data[:, 0].tolist() + xte._data[:, 0].tolist())
    assert rows == list(range(0, 2 * n, 2))
    assert np.array_equal(xte._data[:, 0] // 2 % 4, yte._data)  # rows stay aligned
    c = train_test_split(x, y, test_size=0.2, seed=6)
    assert not np.array_equal(c[1]._data, xte._data)
    _, _, ytr_s, yte_s = train_test_split(x, y, test_size=20, stratify=y)
    assert np.bincount(yte_s._data).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError):
        train_test_split(x, kiln.zeros(3))
    with pytest.raises(ValueError):
        train_test_split(x, test_size=1.5)


# -- text corpus ----------------------------------------------------------------------------------
def _fake_ztext(directory, verses_by_part):
    """A minimal SWORD zText module: one zlib block per testament, one index row per verse."""
    os.makedirs(directory, exist_ok=True)
    for part, verses in verses_by_part.items():
        block = b"".join(v.encode() for v in verses)
        comp = zlib.compress(block)
        with open(os.path.join(directory, part + ".bzz"), "wb") as f:
            f.write(comp)
        with open(os.path.join(directory, part + ".bzs"), "wb") as f:
            f.write(struct.pack("<III", 0, len(comp), len(block)))
        rows, start = [struct.pack("<IIH", 0, 0, 0)], 0
        for v in verses:
            rows.append(struct.pack("<IIH", 0, start, len(v.encode())))
            start += len(v.encode())
        with open(os.path.join(directory, part + ".bzv"), "wb") as f:
            f.write(b"".join(rows))


def test_ztext_reader_on_a_small_module(tmp_path):
    mod = tmp_path / "mod"
    _fake_ztext(str(mod), {
        "ot": ['<title>Book One</title>', '<w lemma="x">In</w> the  <transChange>very</transChange>'
               ' beginning<note type="x">a footnote</note>.', '&amp; \\nd LORD said “so”'],
        "nt": ["<div/>", "The end."],
    })
    text = load_text_corpus(root=mod)
    assert text == "Book One\nIn the very beginning.\n& LORD said “so”\nThe end.\n"
    (mod / "nt.bzz").write_bytes(b"not zlib at all")
    with pytest.raises(ValueError, match="corrupt block"):
        load_text_corpus(root=mod)


def test_text_corpus_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install sword-text-kjv"):
        load_text_corpus(root=tmp_path)
    with pytest.raises(ValueError, match="unknown corpus"):
        load_text_corpus("shakespeare")


@needs_kjv
def test_kjv_corpus():
    text = load_text_corpus()
    assert len(text) > 4_000_000 and len(text.encode()) > 1_000_000
    lines = text.splitlines()
    assert lines[0] == "The First Book of Moses, called Genesis"
    assert lines[1] == "In the beginning God created the heaven and the earth."
    assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert "<" not in text and ">" not in text and "\\" not in text and "  " not in text
    tok = CharTokenizer(text)
    assert 60 <= tok.vocab_size <= 120
    ids = tok.encode(text[:5000], return_tensor=True)
    assert ids.dtype == kiln.int64 and tok.decode(ids) == text[:5000]


def test_char_tokenizer():
    tok = CharTokenizer("banana bread")
    assert tok.itos == [" ", "a", "b", "d", "e", "n", "r"] and len(tok) == 7
    ids = tok.encode("bad bean")
    assert ids == [2, 1, 3, 0, 2, 4, 1, 5] and tok.decode(ids) == "bad bean"
    assert tok.decode(np.array(ids)) == tok.decode(kiln.tensor(ids)) == "bad bean"
    assert tok.encode("", return_tensor=True).shape == (0,)
    with pytest.raises(KeyError, match="'z'"):
        tok.encode("zebra")
    with pytest.raises(ValueError):
        tok.decode([7])
    assert CharTokenizer(["é", "a"]).encode("éa") == [1, 0]
