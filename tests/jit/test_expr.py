"""kiln.jit's math functions and elementwise kernels against numpy in float64."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llvmlite")

from kiln.jit import expr as X  # noqa: E402
from kiln.jit import parallel  # noqa: E402

RNG = np.random.default_rng(0)
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 1e-30, 88.0, 88.8,
                     -87.0, -87.4, -104.0, 0.62, 0.63, -0.625, 20.0, -20.0], np.float32)


def _ulps(got, want64):
    """Distance in float32 ulps of the float64 reference (where the reference is normal)."""
    with np.errstate(over="ignore"):
        want = want64.astype(np.float32)
    ok = np.isfinite(want) & (np.abs(want) >= np.finfo(np.float32).tiny)
    return np.abs(got[ok].astype(np.float64) - want64[ok]) / np.spacing(np.abs(want[ok]))


def _run(build, *arrays, kinds=None, dtypes=None):
    k = X.kernel(("test", build), len(arrays), build, in_kinds=kinds, in_dtypes=dtypes)
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    outs = [np.empty(shape, X.output_dtype(o)) for o in k.outputs]
    k(outs, list(arrays))
    return outs[0] if len(outs) == 1 else outs


@pytest.mark.parametrize("name, ref, scale, max_ulp", [
    ("exp", np.exp, 30.0, 1),
    ("log", np.log, 30.0, 1),
    ("tanh", np.tanh, 3.0, 2),
    ("sigmoid", lambda v: 1 / (1 + np.exp(-v)), 10.0, 3),  # exp's ulp, then a division
    ("sqrt", np.sqrt, 30.0, 0.5),  # correctly rounded
])
def test_math_functions_within_stated_ulps(name, ref, scale, max_ulp):
    fn = getattr(X, name)
    x = np.concatenate([(RNG.standard_normal(200_000) * scale).astype(np.float32), SPECIALS])
    if name in ("log", "sqrt"):
        x = np.concatenate([np.abs(x), [-1.0, -np.inf]]).astype(np.float32)
    got = _run(fn, x)
    with np.errstate(all="ignore"):
        want = ref(x.astype(np.float64))
    assert _ulps(got, want).max() <= max_ulp
    # specials: NaN where the reference is NaN, infinities exact
    with np.errstate(over="ignore"):
        want32 = want.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want32))
    inf = np.isinf(want32)
    np.testing.assert_array_equal(got[inf], want32[inf])


def test_exp_flushes_only_subnormal_results_to_zero():
    x = np.array([-87.3, -87.4, -100.0, -1e4], np.float32)
    got = _run(X.exp, x)
    assert got[0] > 0 and np.all(got[1:] == 0)
    assert np.all(got[1:] <= np.exp(x[1:].astype(np.float64)) + 1.2e-38)


def test_arithmetic_is_exact_float32():
    a, b, c = (RNG.standard_normal(10_001).astype(np.float32) for _ in range(3))
    got = _run(lambda x, y, z: (x * y + z) / (y - 3.0) - x, a, b, c)
    want = (a * b + c) / (b - np.float32(3)) - a
    np.testing.assert_array_equal(got, want)


def test_broadcast_kinds_match_numpy_broadcasting():
    full = RNG.standard_normal((37, 129)).astype(np.float32)
    row = RNG.standard_normal(129).astype(np.float32)
    col = RNG.standard_normal((37, 1)).astype(np.float32)
    scal = np.array(0.25, np.float32)
    k, kinds = X.layout([full.shape, row.shape, col.shape, scal.shape], full.shape)
    assert (k, kinds) == (1, ["full", "row", "col", "scalar"])
    got = _run(lambda p, q, r, s: (p + q) * r - s, full, row, col, scal, kinds=kinds)
    np.testing.assert_array_equal(got, (full + row) * col - scal)


def test_layout_picks_a_common_split_or_refuses():
    assert X.layout([(4, 5, 6), (5, 6)], (4, 5, 6)) == (1, ["full", "row"])
    assert X.layout([(4, 5, 6), (6,)], (4, 5, 6)) == (2, ["full", "row"])
    assert X.layout([(4, 5, 6), (4, 1, 1)], (4, 5, 6)) == (1, ["full", "col"])
    assert X.layout([(4, 5, 6), (4, 5, 1)], (4, 5, 6)) == (2, ["full", "col"])
    # a row over the last two dims and a column over the first two: no single split
    assert X.layout([(5, 6), (4, 5, 1)], (4, 5, 6)) is None
    assert X.layout([(5, 1)], (4, 5, 6)) is None


def test_where_comparisons_and_bool_inputs_outputs():
    g, y = RNG.standard_normal((2, 5000)).astype(np.float32)
    y[:10] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1, -1, 0, 2, -2]
    np.testing.assert_array_equal(_run(lambda a, b: X.where(b > 0, a, 0.0), g, y),
                                  np.where(y > 0, g, 0).astype(np.float32))
    np.testing.assert_array_equal(_run(lambda b: b <= 0, y), y <= 0)
    np.testing.assert_array_equal(_run(lambda b: X.ne(b, b), y), y != y)
    mask = y > 0
    np.testing.assert_array_equal(
        _run(lambda m, a: X.where(X.logical_not(m), a, -a) + X.to_float(m), mask, g,
             dtypes="bf"), np.where(~mask, g, -g) + mask.astype(np.float32))


def test_minimum_maximum_propagate_nan_like_numpy():
    a = np.array([1, np.nan, 3, np.nan, -0.0], np.float32)
    b = np.array([np.nan, 2, 1, np.nan, 0.0], np.float32)
    np.testing.assert_array_equal(_run(X.maximum, a, b), np.maximum(a, b))
    np.testing.assert_array_equal(_run(X.minimum, a, b), np.minimum(a, b))


def test_several_outputs_and_empty_arrays():
    a = RNG.standard_normal(1000).astype(np.float32)
    s, d = _run(lambda x: (x + 1.0, x * 2.0), a)
    np.testing.assert_array_equal(s, a + 1)
    np.testing.assert_array_equal(d, a * 2)
    empty = np.empty((0, 3), np.float32)
    assert _run(X.exp, empty).shape == (0, 3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_split_covers_every_element_once(threads):
    before = parallel.num_threads()
    parallel.set_num_threads(threads)
    try:
        # rows of 999 (not a multiple of any vector width), parts cutting rows mid-way
        full = RNG.standard_normal((701, 999)).astype(np.float32)
        row = RNG.standard_normal(999).astype(np.float32)
        col = RNG.standard_normal((701, 1)).astype(np.float32)
        got = _run(lambda p, q, r: p * q + r, full, row, col, kinds=("full", "row", "col"))
        np.testing.assert_array_equal(got, full * row + col)
    finally:
        parallel.set_num_threads(before)


def test_parallel_run_reraises_worker_errors():
    calls = []

    def fn(start, stop):
        calls.append((start, stop))
        if start > 0:
            raise ValueError("boom in a worker")

    before = parallel.num_threads()
    parallel.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="boom in a worker"):
            parallel.run(fn, 1 << 20, ())
    finally:
        parallel.set_num_threads(before)
    assert sorted(calls) == [(0, 1 << 19), (1 << 19, 1 << 20)]


def test_set_num_threads_rejects_bad_values():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            parallel.set_num_threads(bad)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="no native code for elementwise op 'erfinv'"):
        X.Kernel([X.Expr("erfinv", (X.inputs(1)[0],))], ("full",), "f")


def _python(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "KILN_JIT"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_kiln_does_not_load_llvmlite_and_kiln_jit_0_turns_it_off():
    assert _python("import sys, kiln; kiln.ones(3).exp(); print('llvmlite' in sys.modules)") \
        == "False"
    assert _python("import kiln.jit as j; print(j.available())") == "True"
    assert _python("import kiln.jit as j; print(j.available())", KILN_JIT="0") == "False"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_run_in_a_forked_child():
    code = ("import os, numpy as np\n"
            "from kiln.jit import expr as X\n"
            "k = X.kernel('e', 1, X.exp)\n"
            "x = np.ones(1 << 20, np.float32); o = np.empty_like(x); k([o], [x])\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    o[:] = 0; k([o], [x]); os._exit(0 if o.min() == o.max() > 2.7 else 1)\n"
            "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")
    assert _python(code) == "0"


def test_parallel_run_waits_for_workers_when_interrupted(monkeypatch):
    """A KeyboardInterrupt while waiting must not return before the workers stop writing."""
    import threading
    import time

    finished = []

    def fn(start, stop):
        if start > 0:
            time.sleep(0.2)
            finished.append(stop)

    real_get = parallel.queue.SimpleQueue.get
    calls = []

    class InterruptOnce(parallel.queue.SimpleQueue):
        def get(self, *a, **k):
            if not calls:
                calls.append(1)
                raise KeyboardInterrupt
            return real_get(self, *a, **k)

    monkeypatch.setattr(parallel.queue, "SimpleQueue", InterruptOnce)
    before = parallel.num_threads()
    parallel.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel.run(fn, 1 << 21, ())
    finally:
        parallel.set_num_threads(before)
    assert finished == [1 << 21]
    assert threading.active_count() >= 1


def test_llvm_that_cannot_start_means_no_jit():
    code = ("import kiln.jit as j, kiln.jit.engine as e\n"
            "def broken(): raise OSError('no libllvmlite')\n"
            "e.target_machine = broken\n"
            "import kiln, numpy as np\n"
            "y = kiln.nn.functional.gelu(kiln.linspace(-3, 3, 7))\n"
            "print(j.available(), y.tolist())\n")
    without = _python(code.replace("print(j.available(), ", "print(False, "), KILN_JIT="0")
    assert _python(code) == without
    assert without.startswith("False [")
