"""The native worker pool (kiln/jit/workers.py) behind parallel.run: argument passing through the
trampolines, every part run exactly once, sleeping workers woken, concurrent callers."""

import ctypes
import threading
import time

import numpy as np
import pytest

pytest.importorskip("llvmlite")

from kiln.jit import engine, parallel, workers  # noqa: E402
from kiln.jit.engine import F32, F64, I64  # noqa: E402

pytestmark = pytest.mark.skipif(not workers.supported(), reason="native workers: Linux x86-64")


def _mixed_kernel():
    """``out[i] = a + b + c + i`` for i in [start, stop), with a float, a double and an int
    argument between the pointer and the range: every kind of word a trampoline unpacks."""
    mod = engine.new_module("mixed")

    def body(b, i, out, a, d, c):
        v = b.fadd(b.fadd(b.fpext(a, F64), d), b.sitofp(b.add(c, i), F64))
        b.store(v, b.gep(out, [i]))

    engine.range_function(mod, "mixed", [F64.as_pointer(), F32, F64, I64], body)
    sig = (ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_double,
           ctypes.c_int64)
    return engine.compile_module(mod, {"mixed": sig})["mixed"]


@pytest.fixture(scope="module")
def mixed():
    return _mixed_kernel()


@pytest.fixture
def threads():
    before = parallel.num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(before)


def _fill(fn, n, a=1.5, d=0.25, c=-7):
    out = np.full(n, np.nan)
    parallel.run(fn, n, (out.ctypes.data, ctypes.c_float(a), d, c), work_per_item=1 << 20)
    return out


@pytest.mark.parametrize("n_threads", [2, 3, 7])
def test_every_part_runs_once_with_its_arguments(mixed, threads, n_threads):
    threads(n_threads)
    n = 100_003
    got = _fill(mixed, n)
    np.testing.assert_array_equal(got, 1.5 + 0.25 - 7 + np.arange(n))


def test_workers_asleep_are_woken(mixed, threads):
    threads(2)
    _fill(mixed, 1000)
    time.sleep(0.3)  # far longer than the spin: the worker sleeps on its futex
    np.testing.assert_array_equal(_fill(mixed, 5000, c=3), 1.75 + 3 + np.arange(5000))


def test_many_jobs_back_to_back_of_every_size(mixed, threads):
    threads(2)
    for n in [2, 3, 17, 1000, 4097, 2, 65536, 5, 12345] * 20:
        got = _fill(mixed, n, c=n)
        np.testing.assert_array_equal(got, 1.75 + n + np.arange(n))


def test_concurrent_callers_each_get_their_own_results(mixed, threads):
    threads(2)
    errors = []

    def caller(c):
        try:
            for _ in range(200):
                got = _fill(mixed, 3001, c=c)
                np.testing.assert_array_equal(got, 1.75 + c + np.arange(3001))
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=caller, args=(c,)) for c in (10, 20, 30)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_argument_count_and_type_are_checked(mixed, threads):
    threads(2)
    with pytest.raises(TypeError, match="kernel takes 6 arguments, got 5"):
        parallel.run(mixed, 10_000, (0, 1.0, 2.0), work_per_item=1 << 20)
    bad = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64, ctypes.c_int16)(
        ctypes.cast(mixed, ctypes.c_void_p).value)
    with pytest.raises(TypeError, match="cannot pass a c_short"):
        parallel.run(bad, 10_000, (1,), work_per_item=1 << 20)
