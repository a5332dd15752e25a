"""Kiln: the models of bench/workloads.py unchanged (lib=kiln).  Compiled mode appears by
itself once ``kiln.compile`` exists (same pattern as torch.compile: forward+loss compiled,
``optimizer.step()`` compiled separately)."""

from __future__ import annotations

import protocol
from peers import torchapi

MODES = ("eager", "compile")
COMPILED = ("compile",)
MATMUL_MODES = ("eager",)
kiln = None


def modes():
    import kiln as _kiln

    return [m for m in MODES if m == "eager" or hasattr(_kiln, m)]


def setup(mode):
    global kiln
    import kiln as _kiln

    kiln = _kiln
    n = protocol.THREADS
    if hasattr(kiln, "set_num_threads"):
        kiln.set_num_threads(n)
        how = f"kiln.set_num_threads({n})"
    else:  # Kiln computes with numpy: its BLAS pool is the only thread pool
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
        how = f"threadpoolctl.threadpool_limits({n}) (numpy/BLAS)"
    from kiln import jit

    if jit.available():  # native kernels (the optional kiln[jit] extra) have their own pool
        import llvmlite
        from kiln.jit import parallel

        parallel.set_num_threads(n)
        native = f"llvmlite {llvmlite.__version__}, {n} threads"
    else:
        native = "off"
    import numpy
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"version": kiln.__version__, "threads": n, "threading": how,
            "numpy": numpy.__version__, "blas": blas,
            "jit": native}


def _compile(mode):
    return kiln.compile if mode == "compile" else None


def compile_init(mode):
    return torchapi.trivial(kiln, _compile(mode))


def build_train(mode, workload):
    # kiln.compile captures the whole step (forward, backward and optimizer update) as one graph
    return torchapi.build_train(kiln, workload, _compile(mode), whole_step=True)


def build_infer(mode, workload, batch):
    return torchapi.build_infer(kiln, workload, batch, _compile(mode))


def build_matmul(mode, n):
    return torchapi.build_matmul(kiln, n)
