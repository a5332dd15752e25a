"""PyTorch: eager, and torch.compile (Inductor) of forward+loss plus a separately compiled
``optimizer.step()``; cold Inductor cache in a fresh temporary directory."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import protocol
from peers import torchapi

MODES = ("eager", "compile")
COMPILED = ("compile",)
MATMUL_MODES = ("eager",)
torch = None


def modes():
    return list(MODES)


def setup(mode):
    global torch
    cache = tempfile.mkdtemp(prefix="kiln-bench-inductor-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold compile cache (the spec's rule 1)
    import torch as _torch

    torch = _torch
    torch.set_num_threads(protocol.THREADS)
    torch.set_num_interop_threads(protocol.THREADS)
    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "threading": f"torch.set_num_threads({torch.get_num_threads()}), "
                         f"set_num_interop_threads({torch.get_num_interop_threads()})"}


def _compile(mode):
    # dynamic=False: one static compiled function per shape (the spec: one per batch size).
    return functools.partial(torch.compile, dynamic=False) if mode == "compile" else None


def compile_init(mode):
    return torchapi.trivial(torch, _compile(mode))


def build_train(mode, workload):
    return torchapi.build_train(torch, workload, _compile(mode))


def build_infer(mode, workload, batch):
    return torchapi.build_infer(torch, workload, batch, _compile(mode))


def build_matmul(mode, n):
    return torchapi.build_matmul(torch, n)
