"""NumPy (OpenBLAS), matmul probe only, at 2 and at 1 thread via threadpoolctl, with the thread
environment as inherited."""

from __future__ import annotations

MODES = ()
COMPILED = ()
MATMUL_MODES = ("2threads", "1thread")
np = None


def modes():
    return []


def setup(mode):
    global np
    import numpy as _np
    from threadpoolctl import threadpool_info, threadpool_limits

    np = _np
    n = 1 if mode == "1thread" else 2
    threadpool_limits(n, user_api="blas")
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"version": np.__version__, "threads": n, "blas": blas,
            "threading": f"threadpoolctl.threadpool_limits({n}, user_api='blas')"}


def build_matmul(mode, n):
    import protocol

    a, b = protocol.matmul_operands(n)
    return (lambda: a @ b), (lambda out: out)
