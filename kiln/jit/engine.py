"""Compile llvmlite IR modules to machine code for this CPU (kept for the life of the process)."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading

import llvmlite.binding as llvm
from llvmlite import ir

_lock = threading.Lock()
_machine = None
_engines: list = []  # the compiled code lives as long as its engine: keep every engine

F32 = ir.FloatType()
F64 = ir.DoubleType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR_F32 = F32.as_pointer()


# Kernels compiled per array shape (pooling, convolution gathers) cost 20-200 ms each and stay
# in memory: after this many shapes, new shapes keep the numpy path.
SHAPE_KERNELS = 48


def shape_kernel(cache: dict, key, build):
    """``cache[key]``, built by ``build()`` on first use; None (use numpy) when ``key`` is new
    and ``cache`` already holds SHAPE_KERNELS kernels."""
    k = cache.get(key)
    if k is None:
        if len(cache) >= SHAPE_KERNELS:
            return None
        k = cache[key] = build()
    return k


def _after_fork() -> None:
    # a fork during another thread's compile would leave the child's lock held forever
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def target_machine():
    """The host's target machine: its CPU name and features (AVX-512 where present), -O3."""
    global _machine
    if _machine is None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_triple(llvm.get_process_triple())
        _machine = target.create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
            opt=3, reloc="default", codemodel="jitdefault")
    return _machine


def address(a) -> int:
    """The address of numpy array ``a``'s first element (~0.4 us; ``a.ctypes.data`` takes
    ~1.7 us, several times per kernel call)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty
        return a.__array_interface__["data"][0]


def splat(b: ir.IRBuilder, x, lanes: int):
    """The scalar value ``x`` in every lane of a ``lanes``-wide vector."""
    ty = ir.VectorType(x.type, lanes)
    v = b.insert_element(ir.Constant(ty, ir.Undefined), x, ir.Constant(I32, 0))
    return b.shuffle_vector(v, ir.Constant(ty, ir.Undefined),
                            ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


def hsum(b: ir.IRBuilder, vs):
    """The float32 sum of all lanes of the float32 vectors ``vs`` (a tree of vector adds, then
    one horizontal reduction)."""
    reassoc = ("reassoc",)
    vs = list(vs)
    while len(vs) > 1:
        vs = [b.fadd(vs[i], vs[i + 1], flags=reassoc) if i + 1 < len(vs) else vs[i]
              for i in range(0, len(vs), 2)]
    ty = vs[0].type
    fn = intrinsic(b.module, f"llvm.vector.reduce.fadd.v{ty.count}f32", F32, [F32, ty])
    return b.call(fn, [ir.Constant(F32, -0.0), vs[0]], fastmath=reassoc)


def transpose(b: ir.IRBuilder, rows: list) -> list:
    """The n x n block whose rows are the n-lane vectors ``rows``, transposed: one bit of the
    row and lane indices swapped per stage of 2-source shuffles."""
    n = len(rows)
    rows = list(rows)
    m = 1
    while m < n:
        lo = ir.Constant(ir.VectorType(I32, n), [j if not j & m else n + j - m for j in range(n)])
        hi = ir.Constant(ir.VectorType(I32, n), [j + m if not j & m else n + j for j in range(n)])
        for i in range(n):
            if not i & m:
                a, c = rows[i], rows[i | m]
                rows[i], rows[i | m] = b.shuffle_vector(a, c, lo), b.shuffle_vector(a, c, hi)
        m *= 2
    return rows


def i64(v: int) -> ir.Constant:
    """An i64 constant (sizes, strides, loop bounds)."""
    return ir.Constant(I64, v)


def loop(b: ir.IRBuilder, lo, hi, body, init=None):
    """Emit ``for i in range(lo, hi)``: ``body(i)``, or with ``init`` (a list of values carried
    from one iteration to the next) ``carried = body(i, carried)``, returning the final values.
    ``lo``/``hi`` are ints (a constant trip count: no code at all when empty) or i64 values
    (checked at run time)."""
    carried = list(init) if init is not None else []
    if isinstance(lo, int) and isinstance(hi, int) and hi <= lo:
        return carried if init is not None else None
    lo_v = i64(lo) if isinstance(lo, int) else lo
    hi_v = i64(hi) if isinstance(hi, int) else hi
    fn = b.function
    pre = b.block
    body_bb = fn.append_basic_block("loop")
    after = fn.append_basic_block("after")
    checked = not (isinstance(lo, int) and isinstance(hi, int))
    if checked:
        b.cbranch(b.icmp_signed("<", lo_v, hi_v), body_bb, after)
    else:
        b.branch(body_bb)
    b.position_at_end(body_bb)
    i = b.phi(I64, "i")
    i.add_incoming(lo_v, pre)
    phis = []
    for v in carried:
        p = b.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    new = body(i, phis) if init is not None else body(i)
    new = list(new) if init is not None else []
    end = b.block
    nxt = b.add(i, i64(1))
    i.add_incoming(nxt, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    b.cbranch(b.icmp_signed("<", nxt, hi_v), body_bb, after)
    b.position_at_end(after)
    if init is None:
        return None
    if not checked:
        return new
    out = []
    for v0, v in zip(carried, new):
        p = b.phi(v0.type)
        p.add_incoming(v0, pre)
        p.add_incoming(v, end)
        out.append(p)
    return out


def fsum(b: ir.IRBuilder, lo, hi, term):
    """The float32 sum of ``term(i)`` over [lo, hi) (reassociated, so LLVM vectorizes it)."""
    return loop(b, lo, hi, lambda i, acc: [b.fadd(acc[0], term(i), flags=("reassoc",))],
                [ir.Constant(F32, 0.0)])[0]


def new_module(name: str) -> ir.Module:
    """An empty IR module for the host triple."""
    mod = ir.Module(name=name)
    mod.triple = llvm.get_process_triple()
    mod.data_layout = str(target_machine().target_data)
    return mod


def intrinsic(mod: ir.Module, name: str, ret, args) -> ir.Function:
    """Declare (once) an LLVM intrinsic such as ``llvm.sqrt.f32`` with an explicit signature."""
    if name in mod.globals:
        return mod.globals[name]
    return ir.Function(mod, ir.FunctionType(ret, args), name)


def range_function(mod: ir.Module, name: str, pointer_types, body, noalias: bool = False):
    """Define ``void name(i64 start, i64 stop, *pointers)`` running ``body(builder, i,
    *pointers)`` for each ``i`` in [start, stop) (a plane, an image, a row: the unit that
    parallel.run splits). ``noalias``: the kernel never writes an array it reads."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64, *pointer_types]), name)
    start, stop, *ptrs = fn.args
    if noalias:
        for a in ptrs:
            a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    loop = fn.append_basic_block("item")
    done = fn.append_basic_block("done")
    entry = b.block
    b.cbranch(b.icmp_signed("<", start, stop), loop, done)
    b.position_at_end(loop)
    i = b.phi(I64)
    i.add_incoming(start, entry)
    body(b, i, *ptrs)
    nxt = b.add(i, i64(1))
    i.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, stop), loop, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


@functools.cache
def has_avx512() -> bool:
    """Whether the host CPU has AVX-512 (32 vector registers of 16 floats)."""
    return "+avx512f" in llvm.get_host_cpu_features().flatten()


def _wide_vectors(text: str) -> str:
    """Let the loop vectorizer use 512-bit registers on AVX-512 CPUs (LLVM prefers 256 there)."""
    if not has_avx512():
        return text
    text = re.sub(r'^(define [^\n]*\))$', r"\1 #0", text, flags=re.M)
    return text + '\nattributes #0 = { nounwind "prefer-vector-width"="512" }\n'


def compile_module(mod: ir.Module, signatures: dict, explicit_vectors: bool = False) -> dict:
    """Optimize and compile ``mod``; returns {function name: ctypes function}.

    ``signatures`` maps each exported function name to its ctypes argument types (all return
    void).  ctypes releases the GIL for the duration of each call, so the functions can run on
    several threads at once.  ``explicit_vectors``: the IR already holds its vector code
    (register-blocked kernels); the lighter -O1 pipeline without the vectorizers compiles it
    in about half the time into code as fast.
    """
    tm = target_machine()
    with _lock:
        m = llvm.parse_assembly(_wide_vectors(str(mod)))
        m.verify()
        pto = llvm.create_pipeline_tuning_options(speed_level=1 if explicit_vectors else 3)
        pto.loop_vectorization = not explicit_vectors
        pto.slp_vectorization = not explicit_vectors
        pb = llvm.create_pass_builder(tm, pto)
        pb.getModulePassManager().run(m, pb)
        engine = llvm.create_mcjit_compiler(m, tm)
        engine.finalize_object()
        _engines.append(engine)
        fns = {name: ctypes.CFUNCTYPE(None, *argtypes)(engine.get_function_address(name))
               for name, argtypes in signatures.items()}
        # the machine code belongs to the engine's memory manager: the IR (~40 KB a module)
        # is no longer needed once the addresses are known
        engine.remove_module(m)
        m.close()
        return fns


def assembly(mod: ir.Module) -> str:
    """The machine code ``compile_module`` would produce, as assembly text (for debugging)."""
    m = llvm.parse_assembly(_wide_vectors(str(mod)))
    tm = target_machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(m, pb)
    return tm.emit_assembly(m)
