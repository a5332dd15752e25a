"""Native worker threads that wait for kernel jobs by spinning, then sleeping on a futex.

A Python thread woken through a queue takes ~95 us to start a kernel on a 2-core VM, longer
than many kernels run.  Here each worker is a Python thread that calls, once, a native loop
(ctypes releases the GIL): it polls a job counter, yielding the core between polls, for about
SPIN_CYCLES after its last job, then sleeps on a futex until the next one.  The caller posts a
job, runs its own part and waits for the workers in one native call (``dispatch``), so a
kernel call costs one ctypes call however many threads share it.

Kernels have different signatures; each job calls a trampoline ``t(start, stop, argv)`` that
unpacks ``argv`` (the kernel's address, then its arguments as 64-bit words) and calls the
kernel.  One trampoline is compiled per signature.

Linux only (futex); ``supported()`` is False elsewhere and parallel.py keeps Python threads.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading

import numpy as np
from llvmlite import ir

from kiln.jit import engine
from kiln.jit.engine import F32, I32, I64, i64

# control block: one int64 array shared with the workers; SPIN holds SPIN_CYCLES (a slot, so
# that an A/B can change it in a running process); DONE..: written per job
GEN, NEXT, SLEEPERS, SPIN, DONE, NPARTS, TRAMP, ARGV = range(8)
BOUNDS = ARGV + 1  # part i is [ctrl[BOUNDS + 2i], ctrl[BOUNDS + 2i + 1])
MAX_WORKERS = 255
MAX_ARGS = 32
# Spin for about this many TSC cycles (~2 ms at 2.3 GHz) after a job before sleeping: a
# sleeping worker takes ~90 us to wake, and a training step's kernels can be further apart than
# 100 us (a Python-heavy stretch, an optimizer's small updates).  In interleaved A/Bs, 5M
# cycles instead of 300k made the mlp's eager and compiled steps 13-14% faster and the cnn's 5%.
SPIN_CYCLES = 5_000_000

_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 128, 129
_LOW = 0xFFFFFFFF

_native = None  # (worker, dispatch) ctypes functions
_trampolines: dict = {}  # argument kinds -> trampoline address


def supported() -> bool:
    """Whether native workers can run here (Linux on x86-64)."""
    import platform

    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def _libc_symbols() -> None:
    import llvmlite.binding as llvm

    libc = ctypes.CDLL(None)
    for name in ("syscall", "sched_yield"):
        llvm.add_symbol(name, ctypes.cast(getattr(libc, name), ctypes.c_void_p).value)


class _Emitter:
    """IR helpers shared by the worker loop and the dispatcher."""

    def __init__(self, mod: ir.Module) -> None:
        self.ptr = I64.as_pointer()
        self.tramp_ty = ir.FunctionType(ir.VoidType(), [I64, I64, self.ptr])
        self.syscall = ir.Function(mod, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
        self.yield_ = ir.Function(mod, ir.FunctionType(I32, []), "sched_yield")
        self.pause = engine.intrinsic(mod, "llvm.x86.sse2.pause", ir.VoidType(), [])
        self.tsc = engine.intrinsic(mod, "llvm.readcyclecounter", I64, [])

    @staticmethod
    def slot(b, ctrl, k):
        return b.gep(ctrl, [k if isinstance(k, ir.Value) else i64(k)])

    def load(self, b, ctrl, k):
        return b.load_atomic(self.slot(b, ctrl, k), "acquire", 8)

    def futex(self, b, ctrl, op, val) -> None:
        addr = b.ptrtoint(self.slot(b, ctrl, GEN), I64)  # the low word of GEN (little-endian)
        b.call(self.syscall, [i64(_SYS_FUTEX), addr, i64(op), val, i64(0)])

    def claim_parts(self, fn, b, ctrl, gen, exit_bb) -> None:
        """Claim and run parts of job ``gen`` until none is left (or a newer job replaced it),
        then branch to ``exit_bb``.  A claim is a compare-and-swap of the one word
        NEXT = gen << 32 | parts << 16 | next part: a thread late for a job can never take a
        part of the next one, nor read the next job's part count while the caller writes it."""
        claim, check, run = (fn.append_basic_block(n) for n in ("claim", "check", "run"))
        b.branch(claim)
        b.position_at_end(claim)
        cur = self.load(b, ctrl, NEXT)
        same = b.icmp_unsigned("==", b.lshr(cur, i64(32)), b.and_(gen, i64(_LOW)))
        b.cbranch(same, check, exit_bb)
        b.position_at_end(check)
        part = b.and_(cur, i64(0xFFFF))
        left = b.icmp_unsigned("<", part, b.and_(b.lshr(cur, i64(16)), i64(0xFFFF)))
        got = fn.append_basic_block("got")
        b.cbranch(left, got, exit_bb)
        b.position_at_end(got)
        ok = b.extract_value(b.cmpxchg(self.slot(b, ctrl, NEXT), cur, b.add(cur, i64(1)),
                                       "seq_cst", "seq_cst"), 1)
        b.cbranch(ok, run, claim)
        b.position_at_end(run)
        k = b.add(i64(BOUNDS), b.mul(part, i64(2)))
        start = b.load(self.slot(b, ctrl, k))
        stop = b.load(self.slot(b, ctrl, b.add(k, i64(1))))
        tramp = b.inttoptr(b.load(self.slot(b, ctrl, TRAMP)), self.tramp_ty.as_pointer())
        argv = b.inttoptr(b.load(self.slot(b, ctrl, ARGV)), self.ptr)
        b.call(tramp, [start, stop, argv])
        b.atomic_rmw("add", self.slot(b, ctrl, DONE), i64(1), "seq_cst")
        b.branch(claim)


def _build(mod: ir.Module) -> None:
    e = _Emitter(mod)

    # void worker(i64* ctrl, i64 gen): runs the parts of jobs posted after generation `gen`,
    # for the life of the process (the threads are daemons)
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [e.ptr, I64]), "kiln_worker")
    ctrl, first = fn.args
    entry, top, poll, idle, sleep, job = (
        fn.append_basic_block(n) for n in ("entry", "top", "poll", "idle", "sleep", "job"))
    b = ir.IRBuilder(entry)
    b.branch(top)

    b.position_at_end(top)  # wait for a generation other than `last`
    last = b.phi(I64, "last")
    last.add_incoming(first, entry)
    t0 = b.call(e.tsc, [])
    b.branch(poll)

    b.position_at_end(poll)
    g = e.load(b, ctrl, GEN)
    b.cbranch(b.icmp_unsigned("!=", g, last), job, idle)

    b.position_at_end(idle)  # yield between polls: a spinning worker must not starve others
    b.call(e.pause, [])
    b.call(e.yield_, [])
    spun = b.sub(b.call(e.tsc, []), t0)
    b.cbranch(b.icmp_unsigned("<", spun, e.load(b, ctrl, SPIN)), poll, sleep)

    b.position_at_end(sleep)  # announce, re-check, then sleep while GEN's low word is unchanged
    b.atomic_rmw("add", e.slot(b, ctrl, SLEEPERS), i64(1), "seq_cst")
    g2 = b.load_atomic(e.slot(b, ctrl, GEN), "seq_cst", 8)
    with b.if_then(b.icmp_unsigned("==", g2, last)):
        e.futex(b, ctrl, _FUTEX_WAIT_PRIVATE, b.and_(last, i64(_LOW)))
    b.atomic_rmw("sub", e.slot(b, ctrl, SLEEPERS), i64(1), "seq_cst")
    last.add_incoming(last, b.block)
    b.branch(top)

    b.position_at_end(job)
    finished = fn.append_basic_block("finished")
    e.claim_parts(fn, b, ctrl, g, finished)
    b.position_at_end(finished)
    last.add_incoming(g, finished)
    b.branch(top)

    # void dispatch(i64* ctrl): post the job described in ctrl, run parts of it here until none
    # is left unclaimed, then wait for the parts that workers took
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [e.ptr]), "kiln_dispatch")
    (ctrl,) = fn.args
    entry, wait, spin, done = (fn.append_basic_block(n) for n in ("entry", "wait", "spin", "done"))
    b = ir.IRBuilder(entry)
    spins = b.alloca(I64)
    b.store(i64(0), spins)
    gen = b.add(b.load_atomic(e.slot(b, ctrl, GEN), "seq_cst", 8), i64(1))
    parts = b.shl(e.load(b, ctrl, NPARTS), i64(16))
    b.store_atomic(b.or_(b.shl(b.and_(gen, i64(_LOW)), i64(32)), parts), e.slot(b, ctrl, NEXT),
                   "seq_cst", 8)
    b.atomic_rmw("add", e.slot(b, ctrl, GEN), i64(1), "seq_cst")
    sleepers = b.load_atomic(e.slot(b, ctrl, SLEEPERS), "seq_cst", 8)
    with b.if_then(b.icmp_unsigned("!=", sleepers, i64(0))):
        e.futex(b, ctrl, _FUTEX_WAKE_PRIVATE, i64(MAX_WORKERS))
    e.claim_parts(fn, b, ctrl, gen, wait)
    b.position_at_end(wait)
    b.cbranch(b.icmp_unsigned("<", e.load(b, ctrl, DONE), e.load(b, ctrl, NPARTS)), spin, done)
    b.position_at_end(spin)  # a worker still runs its part; yield now and then in case it
    b.call(e.pause, [])      # shares this core
    n = b.add(b.load(spins), i64(1))
    b.store(n, spins)
    with b.if_then(b.icmp_unsigned("==", b.and_(n, i64(63)), i64(0))):
        b.call(e.yield_, [])
    b.branch(wait)
    b.position_at_end(done)
    b.ret_void()


def _compile():
    global _native
    if _native is None:
        _libc_symbols()
        mod = engine.new_module("kiln_workers")
        _build(mod)
        P = ctypes.c_void_p
        f = engine.compile_module(mod, {"kiln_worker": (P, ctypes.c_int64),
                                        "kiln_dispatch": (P,)})
        _native = f["kiln_worker"], f["kiln_dispatch"]
    return _native


# -- trampolines ------------------------------------------------------------------------------

def _kind(t) -> str:
    if t is ctypes.c_float:
        return "f"
    if t is ctypes.c_double:
        return "d"
    if t in (ctypes.c_int64, ctypes.c_long, ctypes.c_longlong, ctypes.c_ssize_t):
        return "i"
    if t is ctypes.c_void_p or issubclass(t, (ctypes._Pointer, ctypes.c_char_p)):
        return "p"
    raise TypeError(f"native workers cannot pass a {t.__name__} argument")


def _trampoline(kinds: str) -> int:
    addr = _trampolines.get(kinds)
    if addr is None:
        mod = engine.new_module(f"tramp_{kinds}")
        ptr = I64.as_pointer()
        types = {"i": I64, "p": ir.IntType(8).as_pointer(), "f": F32, "d": ir.DoubleType()}
        target = ir.FunctionType(ir.VoidType(), [I64, I64] + [types[k] for k in kinds])
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64, ptr]), "tramp")
        start, stop, argv = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        words = [b.load(b.gep(argv, [i64(j)])) for j in range(len(kinds) + 1)]
        args = []
        for k, w in zip(kinds, words[1:]):
            if k == "p":
                w = b.inttoptr(w, types["p"])
            elif k == "f":
                w = b.bitcast(b.trunc(w, I32), F32)
            elif k == "d":
                w = b.bitcast(w, types["d"])
            args.append(w)
        b.call(b.inttoptr(words[0], target.as_pointer()), [start, stop] + args)
        b.ret_void()
        P = ctypes.c_void_p
        cf = engine.compile_module(mod, {"tramp": (ctypes.c_int64, ctypes.c_int64, P)})["tramp"]
        addr = _trampolines[kinds] = ctypes.cast(cf, ctypes.c_void_p).value
    return addr


def _word(kind: str, v) -> int:
    if isinstance(v, ctypes._SimpleCData):
        v = v.value
    if kind == "f":
        return struct.unpack("<i", struct.pack("<f", v))[0]
    if kind == "d":
        return struct.unpack("<q", struct.pack("<d", v))[0]
    return 0 if v is None else int(v)


class Pool:
    """A control block and the worker threads polling it; one job at a time (``lock``)."""

    def __init__(self) -> None:
        self.worker, self.dispatch = _compile()
        self.ctrl = np.zeros(BOUNDS + 2 * (MAX_WORKERS + 1), np.int64)
        self.argv = np.zeros(MAX_ARGS + 1, np.int64)
        self.argv_addr = self.argv.ctypes.data
        self.addr = self.ctrl.ctypes.data
        self.ctrl[SPIN] = SPIN_CYCLES
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        # id(kernel) -> (kernel, address, trampoline, argument kinds, float argument positions)
        self.specs: dict = {}

    def grow(self, n: int) -> None:
        """Have at least ``n`` workers (at most MAX_WORKERS)."""
        while len(self.threads) < min(n, MAX_WORKERS):
            t = threading.Thread(target=self.worker, daemon=True, name="kiln-jit-worker",
                                 args=(self.addr, int(self.ctrl[GEN])))
            t.start()
            self.threads.append(t)

    def _spec(self, fn) -> tuple:
        spec = self.specs.get(id(fn))
        if spec is None or spec[0] is not fn:  # ctypes functions are not hashable
            kinds = "".join(_kind(t) for t in fn.argtypes[2:])
            if len(kinds) > MAX_ARGS:
                raise TypeError(f"native workers pass at most {MAX_ARGS} arguments")
            floats = [j for j, k in enumerate(kinds) if k in "fd"]
            spec = self.specs[id(fn)] = (fn, ctypes.cast(fn, ctypes.c_void_p).value,
                                         _trampoline(kinds), kinds, floats)
        return spec

    def run(self, fn, bounds: list, args: tuple) -> None:
        """Run ``fn(start, stop, *args)`` for each of ``bounds`` on this thread and the workers
        (whoever is free first takes the next part); returns when all are done.  Call with
        ``lock`` held."""
        _, address, tramp, kinds, floats = self._spec(fn)
        if len(args) != len(kinds):
            raise TypeError(f"kernel takes {len(kinds) + 2} arguments, got {len(args) + 2}")
        if len(bounds) > MAX_WORKERS + 1:
            raise ValueError(f"native workers split a range into at most {MAX_WORKERS + 1} parts")
        words = [address, *args]
        for j in floats:
            words[j + 1] = _word(kinds[j], args[j])
        try:
            self.argv[:len(words)] = words
        except TypeError:  # None or ctypes objects among the integers and pointers
            self.argv[:len(words)] = [address] + [_word(k, v) for k, v in zip(kinds, args)]
        self.grow(len(bounds) - 1)
        self.ctrl[DONE:BOUNDS + 2 * len(bounds)] = [0, len(bounds), tramp, self.argv_addr,
                                                    *(v for part in bounds for v in part)]
        self.dispatch(self.addr)
