"""The capturable optimizer path (capturable=True, or kiln.compile tracing the step): no value
read back into Python, lr usable as a 0-d float64 tensor, same results as the default path
and as torch.optim."""

import numpy as np
import pytest
import torch

import kiln
from kiln.grad_mode import STATE
from kiln.optim.optimizer import group_lr, hyper, is_capturable

STEPS = 30
SHAPES = [(3, 4), (5,), ()]  # the 0-d parameter catches float64 promotion by 0-d factors

# Capturable vs default path in kiln.  float32: bit-identical, because every scalar factor is
# computed in float64 and rounded once into float32 on both paths (this also catches a 0-d
# parameter promoted to float64 by a 0-d factor).  float64: measured within 4 ulp over 30
# steps (numpy's float64 pow, used for the bias corrections from the step tensor, differs in
# the last bit from libm's pow that Python floats use); bound rtol 1e-13.
TOL_SAME = {np.float32: {"rtol": 0, "atol": 0}, np.float64: {"rtol": 1e-13, "atol": 1e-15}}
# vs torch.optim (foreach=False; PyTorch's capturable=True needs CUDA): float32 roundings of
# two libraries, as tests/optim/test_optimizers.py, over 30 steps.
TOL_TORCH = {np.float32: {"rtol": 1e-6, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}

CASES = {
    "SGD": [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True},
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    ],
    "Adam": [
        {},
        {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "amsgrad": True},
        {"lr": 0.01, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    "AdamW": [
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.01, "maximize": True, "betas": (0.85, 0.95)},
        {"lr": 0.01, "weight_decay": 0.2, "amsgrad": True, "maximize": True, "eps": 1e-5},
    ],
    "RMSprop": [
        {},
        {"lr": 0.01, "alpha": 0.9},
        {"lr": 0.01, "centered": True},
        {"lr": 0.01, "momentum": 0.9},
        {"lr": 0.01, "momentum": 0.9, "centered": True},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "maximize": True},
        {"lr": 0.01, "alpha": 0.95, "eps": 1e-6, "weight_decay": 0.05, "momentum": 0.5,
         "centered": True, "maximize": True},
    ],
    "Adagrad": [
        {},
        {"lr": 0.1, "lr_decay": 0.01},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "initial_accumulator_value": 0.5},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "initial_accumulator_value": 0.1,
         "eps": 1e-6, "maximize": True},
    ],
}
ALL = [(name, kw) for name, kws in CASES.items() for kw in kws]
IDS = [name + "-" + ",".join(f"{k}={v}" for k, v in kw.items()) for name, kw in ALL]
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return init, grads


def _np(t):
    return t.detach().numpy()


def _kiln_run(name, kw, init, grads, capturable, tracer=None, lrs=None):
    """Run ``STEPS`` steps; yields the parameters after each.  ``tracer`` is installed as
    ``STATE.tracer`` around every ``step()``; ``lrs[i]`` is set as every group's lr before
    step i (a scheduler)."""
    params = [kiln.tensor(a.copy(), requires_grad=True) for a in init]
    opt = getattr(kiln.optim, name)(params, capturable=capturable, **kw)
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = kiln.tensor(g)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        STATE.tracer = tracer
        try:
            opt.step()
        finally:
            STATE.tracer = None
        yield opt, params


def _assert_close(a_params, b_params, tol, where):
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_allclose(_np(a), _np(b), err_msg=f"param {i} {where}", **tol)


def _assert_same_state(opt_a, pa, opt_b, pb, tol):
    for a, b in zip(pa, pb):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert list(sa) == list(sb)
        for key in sa:
            assert isinstance(sa[key], kiln.Tensor) and sa[key].dtype == sb[key].dtype, key
            np.testing.assert_allclose(_np(sa[key]), _np(sb[key]), err_msg=key, **tol)


@DTYPES
@pytest.mark.parametrize("case", ALL, ids=IDS)
def test_capturable_matches_default_path_and_torch(case, dtype):
    name, kw = case
    init, grads = _data(dtype)
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    topt = getattr(torch.optim, name)(tp, foreach=False, **kw)
    runs = zip(_kiln_run(name, kw, init, grads, False), _kiln_run(name, kw, init, grads, True))
    for i, (eager, capt) in enumerate(runs):
        for p, g in zip(tp, grads[i]):
            p.grad = torch.tensor(g)
        topt.step()
        _assert_close(capt[1], eager[1], TOL_SAME[dtype], f"capturable vs default, step {i + 1}")
        for k, t in zip(capt[1], tp):
            np.testing.assert_allclose(_np(k), _np(t), err_msg=f"vs torch, step {i + 1}",
                                       **TOL_TORCH[dtype])
    _assert_same_state(*capt, *eager, TOL_SAME[dtype])
    copt, cp = capt
    assert all(copt.state[p]["step"].dtype == kiln.float32 for p in cp if "step" in copt.state[p])


class FakeTracer:
    """Stands in for kiln.compile's tracer: ``lift`` gives lr as a 0-d float64 tensor, every
    other hook does nothing but note Python reads of tensor values."""

    def __init__(self):
        self.lifted, self.reads = [], []

    def lift(self, group, name, index=None):
        self.lifted.append(name)
        value = group[name] if index is None else group[name][index]
        return kiln.tensor(float(value), dtype=kiln.float64)

    def on_read(self, t, what):
        self.reads.append(what)

    def record(self, *args):
        pass

    def on_write(self, *args):
        pass

    def on_make(self, *args):
        pass


@DTYPES
@pytest.mark.parametrize("case", ALL, ids=IDS)
def test_traced_step_takes_lr_as_float64_tensor(case, dtype):
    """While tracing (even with capturable=False) lr comes from ``tracer.lift`` as a float64
    0-d tensor, read again at every step (a scheduler's change applies), and no tensor value
    is read into Python."""
    name, kw = case
    init, grads = _data(dtype, seed=1)
    base = kw.get("lr", getattr(kiln.optim, name)([kiln.zeros(1, requires_grad=True)])
                  .defaults["lr"])
    lrs = [base * 0.9**i for i in range(STEPS)]
    tracer = FakeTracer()
    eager = _kiln_run(name, kw, init, grads, False, lrs=lrs)
    traced = _kiln_run(name, kw, init, grads, False, tracer=tracer, lrs=lrs)
    for i, (e, t) in enumerate(zip(eager, traced)):
        _assert_close(t[1], e[1], TOL_SAME[dtype], f"traced vs default, step {i + 1}")
        assert tracer.lifted.count("lr") == i + 1  # (and momentum, betas, alpha)
    assert tracer.reads == []
    _assert_same_state(*t, *e, TOL_SAME[dtype])


def _no_python_reads(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read into Python in the capturable path")

    for method in ("item", "tolist", "numpy", "__float__", "__bool__", "__array__"):
        monkeypatch.setattr(kiln.Tensor, method, refuse)


@pytest.mark.parametrize("case", ALL, ids=IDS)
def test_capturable_step_never_calls_item(case, monkeypatch):
    name, kw = case
    params = [kiln.randn(*s, requires_grad=True) for s in SHAPES]
    opt = getattr(kiln.optim, name)(params, capturable=True, **kw)
    for _ in range(3):
        for p in params:
            p.grad = kiln.randn(*p.shape)
        with monkeypatch.context() as m:
            _no_python_reads(m)
            opt.step()
    # the patch does bite: the default path reads the step counter with .item()
    if name in ("Adam", "AdamW", "Adagrad"):
        eager = getattr(kiln.optim, name)(params, **kw)
        with monkeypatch.context() as m, pytest.raises(AssertionError, match="read into Python"):
            _no_python_reads(m)
            eager.step()


def test_capturable_with_tensor_lr_reads_nothing(monkeypatch):
    """A user's tensor lr is used as a tensor in the capturable path (the default path
    takes lr.item())."""
    init, grads = _data(np.float32, seed=2)
    runs = []
    for capturable in (False, True):
        params = [kiln.tensor(a.copy(), requires_grad=True) for a in init]
        opt = kiln.optim.Adam(params, lr=kiln.tensor(0.01), capturable=capturable,
                              weight_decay=0.1, decoupled_weight_decay=True)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = kiln.tensor(g)
            with monkeypatch.context() as m:
                if capturable:
                    _no_python_reads(m)
                opt.step()
        runs.append(params)
    _assert_close(runs[1], runs[0], TOL_SAME[np.float32], "tensor lr")


@pytest.mark.parametrize("case", ALL, ids=IDS)
def test_state_dict_round_trip(case):
    """Save a capturable optimizer after 10 steps, load into a fresh one: the flag comes with
    the groups and the run continues bit-identically."""
    name, kw = case
    init, grads = _data(np.float32, seed=3)
    params = [kiln.tensor(a.copy(), requires_grad=True) for a in init]
    opt = getattr(kiln.optim, name)(params, capturable=True, **kw)

    def step(o, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = kiln.tensor(g)
        o.step()

    for gs in grads[:10]:
        step(opt, params, gs)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["capturable"] is True
    params2 = [kiln.tensor(_np(p).copy(), requires_grad=True) for p in params]
    opt2 = getattr(kiln.optim, name)(params2, lr=123.0)  # all settings come from the dict
    opt2.load_state_dict(sd)
    assert is_capturable(opt2.param_groups[0])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for gs in grads[10:]:
        step(opt, params, gs)
        step(opt2, params2, gs)
        for a, b in zip(params, params2):
            np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_capturable_flag_of_optimizers_torch_lacks(name):
    """SGD and Adagrad take capturable=True (kiln's extension); unset, their defaults and
    state dicts stay exactly PyTorch's."""
    cls = getattr(kiln.optim, name)
    plain = cls([kiln.zeros(2, requires_grad=True)])
    assert "capturable" not in plain.defaults
    assert plain.defaults == getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)]
                                                         ).defaults
    assert not is_capturable(plain.param_groups[0])
    flagged = cls([kiln.zeros(2, requires_grad=True)], capturable=True)
    assert flagged.param_groups[0]["capturable"] is True
    flagged.add_param_group({"params": [kiln.zeros(1, requires_grad=True)]})
    assert is_capturable(flagged.param_groups[1])


def test_hyper_reads_the_group_or_lifts_it():
    group = {"lr": 0.25}
    assert hyper(group, "lr") == 0.25
    assert not is_capturable(group)
    tracer = FakeTracer()
    STATE.tracer = tracer
    try:
        assert is_capturable(group)
        lr = hyper(group, "lr")
    finally:
        STATE.tracer = None
    assert isinstance(lr, kiln.Tensor) and lr.dtype == kiln.float64 and lr.shape == ()
    assert lr.item() == 0.25 and tracer.lifted == ["lr"]
    # a user's float32 tensor lr is taken in float64 (as the default path's lr.item()) on the
    # capturable path, and as a float on the default one
    user = {"lr": kiln.tensor(0.1), "capturable": True}
    lr = group_lr(user, True)
    assert lr.dtype == kiln.float64 and lr.item() == float(np.float32(0.1))
    assert group_lr(user, False) == float(np.float32(0.1))
