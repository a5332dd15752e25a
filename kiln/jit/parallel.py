"""Run a native kernel over a range of work items on all of the machine's cores.

Every kernel takes ``(start, stop, ...)`` as its first two arguments and handles the items in
``[start, stop)``.  Large ranges are cut into one part per thread: the calling thread runs the
first part while persistent workers run the others.  On Linux x86-64 the workers are native
loops that spin briefly between jobs (kiln/jit/workers.py: ~6 us to hand over a job); elsewhere
they are Python threads fed through queues (ctypes releases the GIL during each call; ~95 us).
The thread count is ``OMP_NUM_THREADS`` when set (as PyTorch reads it), else the CPUs this
process may run on; ``set_num_threads`` changes it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading

# Below this many element-operations a range runs on the calling thread: about what one core
# does in the time a handover costs (native workers; the Python-thread fallback needs 8x more).
MIN_PARALLEL_WORK = 1 << 17
_QUEUE_MIN_WORK = 1 << 20


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Worker(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="kiln-jit-worker")
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def run(self) -> None:
        while True:
            fn, args, done = self.tasks.get()
            try:
                fn(*args)
                done.put(None)
            except BaseException as e:  # reported to the caller, never lost in the thread
                done.put(e)


_threads = _default_threads()
_workers: list[_Worker] = []
_pool_lock = threading.Lock()
_native = None  # workers.Pool, made on first parallel use; False where unsupported


def _native_pool():
    global _native
    if _native is None:
        from kiln.jit import workers

        with _pool_lock:
            if _native is None:
                _native = workers.Pool() if workers.supported() else False
    return _native


def _after_fork() -> None:
    # threads do not survive fork: a child starts a fresh pool instead of waiting on dead workers
    global _pool_lock, _native
    _workers.clear()
    _pool_lock = threading.Lock()
    _native = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def num_threads() -> int:
    """How many threads native kernels use."""
    return _threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (at least 1) for native kernels."""
    global _threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads expects a positive integer, got {n!r}")
    _threads = n


def _get_workers(k: int) -> list[_Worker]:
    with _pool_lock:
        while len(_workers) < k:
            _workers.append(_Worker())
        return _workers[:k]


def run(fn, n: int, args: tuple, work_per_item: int = 1, align: int = 1) -> None:
    """``fn(start, stop, *args)`` over ``[0, n)``, split across threads when there is enough work.

    ``fn`` is a compiled kernel (a ctypes function: native workers run it) or any Python
    callable (run on Python threads).  Part boundaries are multiples of ``align`` (so that a
    part starts at a vector boundary or on a whole row when a kernel needs it).
    """
    parts = min(_threads, n // max(align, 1))
    if parts < 2 or n * work_per_item < MIN_PARALLEL_WORK:
        fn(0, n, *args)
        return
    step = -(-n // parts)
    step = -(-step // align) * align
    bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
    pool = _native_pool() if isinstance(fn, ctypes._CFuncPtr) else None
    if pool:
        if not pool.lock.acquire(blocking=False):  # another thread's job is running: no wait
            fn(0, n, *args)
            return
        try:
            pool.run(fn, bounds, args)
        finally:
            pool.lock.release()
        return
    if n * work_per_item < _QUEUE_MIN_WORK or threading.current_thread() in _workers:
        fn(0, n, *args)
        return
    done: queue.SimpleQueue = queue.SimpleQueue()
    workers = _get_workers(len(bounds) - 1)
    for w, (s, e) in zip(workers, bounds[1:]):
        w.tasks.put((fn, (s, e) + args, done))
    error = None
    try:
        fn(bounds[0][0], bounds[0][1], *args)
    except BaseException as e:
        error = e
    pending = len(workers)
    while pending:  # every worker must finish before the caller may free the arrays it writes
        try:
            r = done.get()
        except BaseException as e:  # KeyboardInterrupt: keep waiting, raise it afterwards
            error = error or e
            continue
        pending -= 1
        if r is not None and error is None:
            error = r
    if error is not None:
        raise error
