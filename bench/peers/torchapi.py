"""Shared by the peers with PyTorch's API (torch, kiln): the models of bench/workloads.py run
unchanged, eagerly or through the framework's ``compile``."""

from __future__ import annotations

import protocol
import workloads as W


def build_train(lib, workload, compile=None, whole_step=False):
    step, _ = W.build(lib, workload, compile=compile, whole_step=whole_step)
    return step, _no_sync, lambda loss: float(loss.item())


def build_infer(lib, workload, batch, compile=None):
    call = W.build_inference(lib, workload, batch, compile=compile)
    mode = getattr(lib, "inference_mode", None) or lib.no_grad
    return call, _no_sync, mode()


def build_matmul(lib, n):
    a, b = (lib.tensor(m) for m in protocol.matmul_operands(n))
    return (lambda: lib.mm(a, b)), _no_sync


def trivial(lib, compile):
    """Compile and run ``x*2+1`` once: the compiler's one-time start-up, in seconds."""
    import time

    x = lib.ones(8)
    t = time.perf_counter()
    compile(lambda x: x * 2 + 1)(x)
    return time.perf_counter() - t


def _no_sync(out):
    # CPU eager and compiled calls of both frameworks return only once the result is computed.
    return out

