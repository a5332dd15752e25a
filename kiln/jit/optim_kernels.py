"""The optimizers' per-parameter updates as one native pass that rewrites p and its state in place.

Each update is written with ``kiln.jit.expr`` arithmetic in exactly the order (and with the same
float32 roundings of Python-float hyperparameters) as the op-by-op path of ``kiln.optim``, so the
results are bitwise those of numpy (sqrt and division are correctly rounded in both).

Unlike ``expr.Kernel``, whose outputs and inputs are separate pointers (LLVM cannot vectorize a
loop whose output may overlap an input by an unknown offset), the updated arrays here are read
and written through the same pointer, and distinct arrays are declared ``noalias``.  Scalars are
passed by value as C floats (rounded to float32 like numpy rounds a Python float).
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
from llvmlite import ir

from kiln.jit import engine, expr as X, parallel
from kiln.jit.engine import F32, I64

_names = itertools.count()
_cache: dict = {}


class InplaceKernel:
    """``state[k][i] = f_k(state[i], inputs[i], scalars)`` for every element i, in one pass."""

    def __init__(self, name: str, n_state: int, n_in: int, n_scalar: int, build) -> None:
        ex = X.inputs(n_state + n_in + n_scalar)
        outs = build(ex[:n_state], ex[n_state:n_state + n_in], ex[n_state + n_in:])
        if len(outs) != n_state:
            raise ValueError(f"{name}: build gave {len(outs)} results for {n_state} arrays")
        self.n_state, self.n_in, self.n_scalar = n_state, n_in, n_scalar
        self.cost = X._cost([X.lift(o) for o in outs])
        self.name = f"{name}_{next(_names)}"
        mod = engine.new_module(self.name)
        self._build(mod, [X.lift(o) for o in outs])
        sig = ((ctypes.c_int64, ctypes.c_int64) + (ctypes.c_void_p,) * (n_state + n_in)
               + (ctypes.c_float,) * n_scalar)
        self.fn = engine.compile_module(mod, {self.name: sig})[self.name]

    def __call__(self, state, inputs, scalars) -> None:
        """Update the float32 C-contiguous arrays ``state`` (all one size) in place."""
        n = state[0].size
        if n == 0:
            return
        args = (tuple(map(X.address, state)) + tuple(map(X.address, inputs))
                + tuple(float(s) for s in scalars))
        parallel.run(self.fn, n, args, work_per_item=self.cost)

    def _build(self, mod: ir.Module, outs) -> None:
        n_ptr = self.n_state + self.n_in
        fn = ir.Function(mod, ir.FunctionType(
            ir.VoidType(), [I64, I64] + [F32.as_pointer()] * n_ptr + [F32] * self.n_scalar),
            self.name)
        start, stop = fn.args[:2]
        ptrs = fn.args[2:2 + n_ptr]
        for p in ptrs:
            p.add_attribute("noalias")
        scalars = fn.args[2 + n_ptr:]
        entry = fn.append_basic_block("entry")
        loop = fn.append_basic_block("loop")
        done = fn.append_basic_block("done")
        b = ir.IRBuilder(entry)
        b.cbranch(b.icmp_signed("<", start, stop), loop, done)
        b.position_at_end(loop)
        i = b.phi(I64, "i")
        i.add_incoming(start, entry)
        values = {k: b.load(b.gep(p, [i])) for k, p in enumerate(ptrs)}
        values.update({n_ptr + k: s for k, s in enumerate(scalars)})
        memo: dict = {}
        results = [X._emit(b, o, values, memo) for o in outs]  # every value before any store
        for v, p in zip(results, ptrs):
            b.store(v, b.gep(p, [i]))
        i_next = b.add(i, ir.Constant(I64, 1))
        i.add_incoming(i_next, loop)
        b.cbranch(b.icmp_signed("<", i_next, stop), loop, done)
        b.position_at_end(done)
        b.ret_void()


def kernel(key, n_state: int, n_in: int, n_scalar: int, build) -> InplaceKernel:
    """The compiled kernel for ``build(state, inputs, scalars)``, once per key."""
    k = _cache.get(key)
    if k is None:
        k = _cache[key] = InplaceKernel(str(key[0] if isinstance(key, tuple) else key),
                                        n_state, n_in, n_scalar, build)
    return k


def usable(*arrays) -> bool:
    """True when every array is float32, C-contiguous, writeable, of one shape."""
    shape = arrays[0].shape
    return all(a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
               and a.shape == shape for a in arrays)


# -- Adam / AdamW ------------------------------------------------------------------------------

def _adam_build(decay: str):
    """``decay``: "none", "l2" (grad += wd p) or "decoupled" (p *= 1 - lr wd)."""

    def build(state, inputs, scalars):
        p, m, v = state
        (g,) = inputs
        one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps, wd = scalars
        if decay == "l2":
            g = g + p * wd
        elif decay == "decoupled":
            p = p * wd
        m = m + (g - m) * one_minus_beta1  # lerp_
        v = v * beta2 + g * one_minus_beta2 * g  # mul_, addcmul_
        denom = X.sqrt(v) / bias2_sqrt + eps
        return p - m * step_size / denom, m, v

    return build


def adam(p, grad, exp_avg, exp_avg_sq, *, one_minus_beta1, beta2, one_minus_beta2, step_size,
         bias2_sqrt, eps, decay: str, wd: float) -> None:
    """One Adam update of the arrays ``p``, ``exp_avg``, ``exp_avg_sq`` in place; ``wd`` is the
    L2 weight decay, or the factor ``1 - lr * weight_decay`` when ``decay`` is "decoupled"."""
    k = kernel(("adam", decay), 3, 1, 7, _adam_build(decay))
    k([p, exp_avg, exp_avg_sq], [grad],
      [one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps, wd])


# -- SGD ---------------------------------------------------------------------------------------

def _sgd_build(weight_decay: bool, momentum: bool, nesterov: bool, damped: bool):
    def build(state, inputs, scalars):
        (g,) = inputs
        lr, wd, mom, one_minus_damp = scalars
        if momentum:
            p, buf = state
        else:
            (p,) = state
        if weight_decay:
            g = g + p * wd
        if not momentum:
            return (p - g * lr,)
        buf = buf * mom + (g * one_minus_damp if damped else g)
        d = g + buf * mom if nesterov else buf
        return p - d * lr, buf

    return build


def sgd(p, grad, buf, *, lr, weight_decay, momentum, dampening, nesterov) -> None:
    """One SGD update of ``p`` (and the momentum buffer ``buf``, when not None) in place."""
    flags = (weight_decay != 0, buf is not None, bool(nesterov), 1 - dampening != 1)
    state = [p] if buf is None else [p, buf]
    k = kernel(("sgd",) + flags, len(state), 1, 4, _sgd_build(*flags))
    k(state, [grad], [lr, weight_decay, momentum, 1 - dampening])
