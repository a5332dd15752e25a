"""kiln.jit.bmm (batched products of small float32 matrices) against numpy and a float64
reference: attention's strided views, odd sizes (vector tails, row-block tails), broadcast and
negative strides, NaN and inf, the threaded path, and the inputs it must refuse (None)."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
import kiln.jit  # noqa: E402
from kiln.jit import bmm, parallel  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _jit_on(monkeypatch):
    """The JIT on, and every batch big enough for the native kernel (except where a test says)."""
    if not kiln.jit.available():
        pytest.skip("kiln.jit is off")
    monkeypatch.setattr(kiln.jit, "_available", True)
    monkeypatch.setattr(bmm, "MIN_MACS", 0)


def _check(a, b, out=None):
    """bmm.matmul(a, b) equals the exact product within the float32 bound for a K-term sum
    (K * 2**-24 * |a| @ |b|, doubled), and numpy's result within the same bound."""
    got = bmm.matmul(a, b, out=out)
    assert got is not None
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = np.matmul(a64, b64)
    bound = 2 * a.shape[-1] * 2.0 ** -24 * np.matmul(np.abs(a64), np.abs(b64)) + 1e-30
    assert got.shape == exact.shape and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.all(np.abs(got - exact) <= bound)
    assert np.all(np.abs(got - np.matmul(a, b)) <= 2 * bound)
    return got


def _attention_views():
    qkv = RNG.standard_normal((16, 64, 384), dtype=np.float32)
    q, k, v = (qkv[..., i * 128:(i + 1) * 128].reshape(16, 64, 4, 32).transpose(0, 2, 1, 3)
               for i in range(3))
    att = RNG.standard_normal((16, 4, 64, 64), dtype=np.float32)
    return q, k, v, att


def test_attention_products():
    q, k, v, att = _attention_views()
    t = lambda x: x.swapaxes(-1, -2)  # noqa: E731
    for a, b in [(q, t(k)), (att, v), (t(att), q), (att, t(np.ascontiguousarray(t(v)))),
                 (t(q), att), (att[..., :31, :], v[..., 1:])]:
        _check(a, b)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 33, 16), (13, 1, 100),
                                   (64, 128, 128), (128, 7, 33), (25, 64, 48), (2, 128, 1)])
@pytest.mark.parametrize("layout", ["contig", "ta", "tb", "both"])
def test_sizes_and_transposes(m, k, n, layout):
    a = RNG.standard_normal((3, k, m) if layout in ("ta", "both") else (3, m, k),
                            dtype=np.float32)
    b = RNG.standard_normal((3, n, k) if layout in ("tb", "both") else (3, k, n),
                            dtype=np.float32)
    if layout in ("ta", "both"):
        a = a.swapaxes(-1, -2)
    if layout in ("tb", "both"):
        b = b.swapaxes(-1, -2)
    _check(a, b)


def test_broadcast_and_negative_strides():
    a = RNG.standard_normal((3, 1, 20, 9), dtype=np.float32)
    b = RNG.standard_normal((1, 4, 9, 18), dtype=np.float32)
    _check(a, b)
    _check(a[::-1, :, ::-1, ::2], b[:, ::-1, ::2, ::-1])
    _check(np.broadcast_to(a[0, 0], (4, 20, 9)), b[0])        # zero batch stride
    _check(a[:, 0], RNG.standard_normal((9, 3), dtype=np.float32))  # 2-D b
    _check(RNG.standard_normal((6, 9), dtype=np.float32), b[0])   # 2-D a
    row = RNG.standard_normal((1, 9), dtype=np.float32)
    _check(np.broadcast_to(row, (3, 20, 9)), b[0, :3])          # zero row stride


def test_nan_inf_match_numpy():
    a = RNG.standard_normal((4, 10, 12), dtype=np.float32)
    b = RNG.standard_normal((4, 12, 20), dtype=np.float32)
    a[0, 1, 2], a[1, 3, 4], b[2, 5, 6], b[3, 0, 0] = np.nan, np.inf, -np.inf, np.inf
    a[3, 2, 0] = 0.0  # 0 * inf = nan
    with np.errstate(invalid="ignore"):
        got, want = bmm.matmul(a, b), np.matmul(a, b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_threaded_path_and_out():
    a = RNG.standard_normal((256, 64, 64), dtype=np.float32)
    b = RNG.standard_normal((256, 64, 64), dtype=np.float32).swapaxes(-1, -2)
    old = parallel.num_threads()
    try:
        parallel.set_num_threads(2)
        got = _check(a, b)
        parallel.set_num_threads(1)
        np.testing.assert_array_equal(bmm.matmul(a, b), got)  # same order on any thread count
    finally:
        parallel.set_num_threads(old)
    out = np.empty((256, 64, 64), np.float32)
    assert _check(a, b, out=out) is out
    assert bmm.matmul(a, b, out=np.empty((64, 64, 256), np.float32).transpose(2, 0, 1)) is None
    assert bmm.matmul(a, b, out=np.empty((256, 64, 63), np.float32)) is None


def test_refuses_what_it_does_not_handle():
    f32 = lambda *s: np.ones(s, np.float32)  # noqa: E731
    assert bmm.matmul(f32(1, 4, 4), f32(1, 4, 4)) is None          # a batch of one
    assert bmm.matmul(f32(4, 4), f32(4, 4)) is None                # no batch
    assert bmm.matmul(f32(0, 4, 4), f32(0, 4, 4)) is None          # empty batch
    assert bmm.matmul(f32(2, 0, 4), f32(2, 4, 4)) is None          # M = 0
    assert bmm.matmul(f32(2, 4, 0), f32(2, 0, 4)) is None          # K = 0
    assert bmm.matmul(f32(2, 4, 129), f32(2, 129, 4)) is None      # K too large
    assert bmm.matmul(f32(2, 3, 4), f32(2, 5, 4)) is None          # mismatched K
    assert bmm.matmul(f32(3, 4, 4), f32(2, 4, 4)) is None          # batch does not broadcast
    for dt in (np.float64, np.float16, np.int32):
        assert bmm.matmul(np.ones((2, 4, 4), dt), np.ones((2, 4, 4), dt)) is None
    raw = np.zeros(400, np.uint8)
    odd = np.lib.stride_tricks.as_strided(raw.view(np.float32), (2, 4, 4), (96, 24, 6))
    assert bmm.matmul(odd, f32(2, 4, 4)) is None                   # strides not whole elements


def test_small_batches_stay_with_numpy(monkeypatch):
    monkeypatch.setattr(bmm, "MIN_MACS", 1 << 18)
    f32 = lambda *s: np.ones(s, np.float32)  # noqa: E731
    assert bmm.matmul(f32(4, 16, 16), f32(4, 16, 16)) is None          # 16k multiply-adds
    assert bmm.matmul(f32(64, 64, 32), f32(64, 32, 64)) is not None    # 8M: gpt's attention


def test_declines_an_out_that_overlaps_an_operand():
    a = RNG.standard_normal((4, 8, 8), dtype=np.float32)
    assert bmm.matmul(a, np.ones((4, 8, 8), np.float32), out=a) is None


def test_kiln_matmul_jit_matches_numpy_path(monkeypatch):
    """kiln's batched matmul with its gradients, native path vs numpy path (attention views)."""
    q, k, v, att = _attention_views()

    def run():
        tq, tk = kiln.tensor(q, requires_grad=True), kiln.tensor(k, requires_grad=True)
        ta = kiln.tensor(att, requires_grad=True)
        tv = kiln.tensor(v, requires_grad=True)
        s = tq @ tk.transpose(-1, -2)
        o = ta @ tv
        (s.sum() + (o * o).sum()).backward()
        return [s.detach().numpy(), o.detach().numpy()] + [t.grad.numpy()
                                                           for t in (tq, tk, ta, tv)]

    got = run()
    monkeypatch.setattr(kiln.jit, "_available", False)
    want = run()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
