"""kiln.optim optimizers against torch.optim: same parameters, same gradient sequence, the
parameters (and state) compared after every step."""

import copy

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception

# float32: a few ulp per step of rounding differences (kiln and PyTorch order the same float32
# operations but are not bit-identical), over 20 steps; float64: round-off only.
TOL = {np.float32: {"rtol": 1e-6, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
SHAPES = [(3, 4), (5,), ()]
STEPS = 20

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
        {"lr": 0.01},
        {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "amsgrad": True},
        {"lr": 0.01, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    "AdamW": [
        {},
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "weight_decay": 0},
        {"lr": 0.01, "amsgrad": True},
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
        {"lr": 0.01, "alpha": 0.95, "eps": 1e-6, "weight_decay": 0.05, "momentum": 0.5, "centered": True,
             "maximize": True},
    ],
    "Adagrad": [
        {},
        {"lr": 0.1, "lr_decay": 0.01},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "initial_accumulator_value": 0.5},
        {"lr": 0.1, "eps": 1e-6},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "initial_accumulator_value": 0.1,
             "maximize": True},
    ],
}
ALL = [(name, kw) for name, kws in CASES.items() for kw in kws]


def _ids(case):
    name, kw = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kw.items())


def _data(dtype, seed=0, shapes=SHAPES, steps=STEPS):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return init, grads


def _params(lib, init):
    return [lib.tensor(a.copy(), requires_grad=True) for a in init]


def _torch_opt(name, params, **kw):
    return getattr(torch.optim, name)(params, foreach=False, **kw)


def _np(t):
    return t.detach().numpy()


def _set_grads(params, grads, lib):
    for p, g in zip(params, grads):
        p.grad = None if g is None else lib.tensor(g)


def _assert_params(kp, tp, tol, where=""):
    for i, (a, b) in enumerate(zip(kp, tp)):
        assert a.dtype == getattr(kiln, str(b.dtype).split(".")[-1]), where
        np.testing.assert_allclose(_np(a), _np(b), err_msg=f"param {i} {where}", **tol)


def _assert_state(kopt, topt, kp, tp, tol):
    for a, b in zip(kp, tp):
        ks, ts = kopt.state[a], topt.state[b]
        assert list(ks) == list(ts)
        for key in ts:
            if isinstance(ts[key], torch.Tensor):
                assert isinstance(ks[key], kiln.Tensor), key
                assert ks[key].dtype == getattr(kiln, str(ts[key].dtype).split(".")[-1]), key
                np.testing.assert_allclose(_np(ks[key]), _np(ts[key]), err_msg=key, **tol)
            else:
                assert ks[key] == ts[key]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ALL, ids=[_ids(c) for c in ALL])
def test_matches_torch_step_by_step(case, dtype):
    name, kw = case
    init, grads = _data(dtype)
    kp, tp = _params(kiln, init), _params(torch, init)
    kopt = getattr(kiln.optim, name)(kp, **kw)
    topt = _torch_opt(name, tp, **kw)
    tol = TOL[dtype]
    for step, gs in enumerate(grads):
        _set_grads(kp, gs, kiln)
        _set_grads(tp, gs, torch)
        assert kopt.step() is None
        topt.step()
        _assert_params(kp, tp, tol, f"after step {step + 1}")
    _assert_state(kopt, topt, kp, tp, tol)


@pytest.mark.parametrize("name", list(CASES))
def test_missing_grads_skip_the_parameter(name):
    """Parameters without a gradient are not touched and their step count lags (so bias
    corrections differ per parameter within one group)."""
    init, grads = _data(np.float64, seed=1)
    for i, gs in enumerate(grads):
        if i % 3 == 1:
            gs[0] = None
        if i % 4 == 2:
            gs[2] = None
    kw = CASES[name][-1]
    kp, tp = _params(kiln, init), _params(torch, init)
    kopt, topt = getattr(kiln.optim, name)(kp, **kw), _torch_opt(name, tp, **kw)
    for gs in grads:
        _set_grads(kp, gs, kiln)
        _set_grads(tp, gs, torch)
        kopt.step()
        topt.step()
        _assert_params(kp, tp, TOL[np.float64])
    _assert_state(kopt, topt, kp, tp, TOL[np.float64])


GROUP_CASES = {
    "SGD": ({"lr": 0.1, "momentum": 0.9}, {"lr": 0.01, "momentum": 0.5, "nesterov": True,
                                           "weight_decay": 0.1}),
    "Adam": ({"lr": 0.01}, {"lr": 0.05, "betas": (0.8, 0.9), "amsgrad": True,
                            "weight_decay": 0.1}),
    "AdamW": ({"lr": 0.01}, {"lr": 0.02, "weight_decay": 0.3, "eps": 1e-4}),
    "RMSprop": ({"lr": 0.01}, {"lr": 0.02, "centered": True, "momentum": 0.5}),
    "Adagrad": ({"lr": 0.1}, {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", list(GROUP_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_param_groups(name, dtype):
    """Two groups with different hyper-parameters (one inheriting defaults), plus a third
    added with add_param_group half-way through."""
    g0, g1 = GROUP_CASES[name]
    shapes = SHAPES + [(2, 2)]
    init, grads = _data(dtype, seed=2, shapes=shapes)

    def build(lib, params):
        groups = [{"params": params[:2]}, {"params": [params[2]], **g1}]
        opt = lib.optim.__dict__[name](groups, **g0, **({"foreach": False}
                                                         if lib is torch else {}))
        return opt

    kp, tp = _params(kiln, init), _params(torch, init)
    kopt, topt = build(kiln, kp), build(torch, tp)
    for key in topt.param_groups[1]:
        if key not in ("params", "foreach"):  # torch runs with foreach=False (for-loop path)
            assert kopt.param_groups[1][key] == topt.param_groups[1][key], key
    for step, gs in enumerate(grads):
        if step == STEPS // 2:
            kopt.add_param_group({"params": kp[3], "lr": 0.03})
            topt.add_param_group({"params": tp[3], "lr": 0.03})
            assert [list(g) for g in kopt.param_groups] == [list(g) for g in topt.param_groups]
        _set_grads(kp, gs, kiln)
        _set_grads(tp, gs, torch)
        kopt.step()
        topt.step()
        _assert_params(kp, tp, TOL[dtype], f"after step {step + 1}")


def test_param_group_defaults_filled_like_torch():
    for name in CASES:
        k = kiln.optim.__dict__[name]([kiln.zeros(2, requires_grad=True)])
        t = torch.optim.__dict__[name]([torch.zeros(2, requires_grad=True)])
        kg = {k_: v for k_, v in k.param_groups[0].items() if k_ != "params"}
        tg = {k_: v for k_, v in t.param_groups[0].items() if k_ != "params"}
        assert kg == tg, name
        assert k.defaults == t.defaults, name


# -- state_dict ------------------------------------------------------------------------------

def _to_kiln_state_dict(sd):
    """A torch state_dict with its tensors turned into kiln tensors (as if read from disk)."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return kiln.tensor(v.detach().numpy().copy())
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return copy.deepcopy(v)
    return conv(sd)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_structure_matches_torch(name):
    kw = CASES[name][-1]
    init, grads = _data(np.float64, seed=3)
    kp, tp = _params(kiln, init), _params(torch, init)
    kopt = getattr(kiln.optim, name)([{"params": kp[:1]}, {"params": kp[1:], "lr": 0.02}], **kw)
    topt = _torch_opt(name, [{"params": tp[:1]}, {"params": tp[1:], "lr": 0.02}], **kw)
    for gs in grads[:3]:
        _set_grads(kp, gs, kiln)
        _set_grads(tp, gs, torch)
        kopt.step()
        topt.step()
    ksd, tsd = kopt.state_dict(), topt.state_dict()
    assert list(ksd) == ["state", "param_groups"]
    assert list(ksd["state"]) == list(tsd["state"]) == [0, 1, 2]
    for i in tsd["state"]:
        assert list(ksd["state"][i]) == list(tsd["state"][i])
        for key, tv in tsd["state"][i].items():
            kv = ksd["state"][i][key]
            assert kv.shape == tuple(tv.shape) and str(kv.dtype) .split(".")[-1] == \
                str(tv.dtype).split(".")[-1], key
            np.testing.assert_allclose(_np(kv), _np(tv), rtol=1e-12, atol=1e-12)
    for g in tsd["param_groups"]:
        g["foreach"] = None  # torch ran with foreach=False
    assert ksd["param_groups"] == tsd["param_groups"]


@pytest.mark.parametrize("case", [c for c in ALL if c[1]], ids=[_ids(c) for c in ALL if c[1]])
def test_state_dict_round_trip_continues_identically(case):
    """Save after 10 steps, load into a fresh optimizer over fresh copies of the parameters,
    continue 10 steps: bit-identical to the uninterrupted run."""
    name, kw = case
    init, grads = _data(np.float32, seed=4)
    kp = _params(kiln, init)
    kopt = getattr(kiln.optim, name)(kp, **kw)
    for gs in grads[:10]:
        _set_grads(kp, gs, kiln)
        kopt.step()
    sd = kopt.state_dict()
    kp2 = [kiln.tensor(_np(p).copy(), requires_grad=True) for p in kp]
    kopt2 = getattr(kiln.optim, name)(kp2, lr=123.0)  # hyper-parameters come from the dict
    kopt2.load_state_dict(sd)
    assert kopt2.param_groups[0]["lr"] == kopt.param_groups[0]["lr"]
    assert kopt2.param_groups[0]["params"][0] is kp2[0]
    for p, p2 in zip(kp, kp2):  # loaded state is a copy, never shared with the source
        for key in kopt.state[p]:
            assert kopt.state[p][key] is not kopt2.state[p2][key]
    for gs in grads[10:]:
        _set_grads(kp, gs, kiln)
        _set_grads(kp2, gs, kiln)
        kopt.step()
        kopt2.step()
        for a, b in zip(kp, kp2):
            np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("name", list(CASES))
def test_load_torch_state_dict_then_continue_like_torch(name):
    """A state_dict written by torch.optim (tensors converted) resumes the same trajectory."""
    kw = CASES[name][-1]
    init, grads = _data(np.float64, seed=5)
    tp = _params(torch, init)
    topt = _torch_opt(name, tp, **kw)
    for gs in grads[:10]:
        _set_grads(tp, gs, torch)
        topt.step()
    kp = [kiln.tensor(_np(p).copy(), requires_grad=True) for p in tp]
    kopt = getattr(kiln.optim, name)(kp)
    kopt.load_state_dict(_to_kiln_state_dict(topt.state_dict()))
    for gs in grads[10:]:
        _set_grads(tp, gs, torch)
        _set_grads(kp, gs, kiln)
        topt.step()
        kopt.step()
        _assert_params(kp, tp, TOL[np.float64])


def test_load_state_dict_casts_state_to_param_dtype():
    p = kiln.zeros(3, dtype=kiln.float64, requires_grad=True)
    opt = kiln.optim.Adam([p])
    sd = {"state": {0: {"step": kiln.tensor(2.0), "exp_avg": kiln.ones(3),
                        "exp_avg_sq": kiln.ones(3)}},
          "param_groups": [dict(kiln.optim.Adam([kiln.zeros(1, requires_grad=True)])
                                .state_dict()["param_groups"][0])]}
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg"].dtype == kiln.float64
    assert opt.state[p]["step"].dtype == kiln.float32
    p.grad = kiln.ones(3, dtype=kiln.float64)
    opt.step()
    assert opt.state[p]["step"].item() == 3.0


def test_load_state_dict_errors_like_torch():
    def groups(lib):
        a, b, c = (lib.zeros(2, requires_grad=True) for _ in range(3))
        one = lib.optim.SGD([a, b], lr=0.1)
        two = lib.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
        three = lib.optim.SGD([a, b, c], lr=0.1)
        return one, two, three

    def mismatch_groups(lib):
        one, two, _ = groups(lib)
        one.load_state_dict(two.state_dict())

    def mismatch_sizes(lib):
        one, _, three = groups(lib)
        one.load_state_dict(three.state_dict())

    e = check_exception(mismatch_groups, match="different number of parameter groups")
    assert str(e) == "loaded state dict has a different number of parameter groups"
    e = check_exception(mismatch_sizes, match="doesn't match the size of optimizer's group")
    assert str(e) == ("loaded state dict contains a parameter group that doesn't match the "
                      "size of optimizer's group")


def test_adagrad_state_exists_before_first_step():
    kp = [kiln.zeros(2, requires_grad=True)]
    tp = [torch.zeros(2, requires_grad=True)]
    ksd = kiln.optim.Adagrad(kp, initial_accumulator_value=0.3).state_dict()
    tsd = torch.optim.Adagrad(tp, initial_accumulator_value=0.3).state_dict()
    assert list(ksd["state"][0]) == list(tsd["state"][0]) == ["step", "sum"]
    np.testing.assert_allclose(_np(ksd["state"][0]["sum"]), [0.3, 0.3], rtol=1e-7)


# -- zero_grad, closure, hooks ---------------------------------------------------------------

def test_zero_grad():
    p = kiln.ones(3, requires_grad=True)
    q = kiln.ones(2, requires_grad=True)
    opt = kiln.optim.SGD([p, q], lr=0.1)
    p.grad = kiln.ones(3)
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    g = kiln.ones(3)
    p.grad = g
    opt.zero_grad(set_to_none=False)
    assert p.grad is g and q.grad is None
    np.testing.assert_array_equal(_np(p.grad), np.zeros(3, np.float32))
    # A gradient that is itself part of a graph (backward with create_graph) is detached.
    x = kiln.ones(3, requires_grad=True)
    p.grad = x * 2
    gr = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is gr and gr.grad_fn is None and not gr.requires_grad


@pytest.mark.parametrize("name", list(CASES))
def test_closure(name):
    """step(closure) evaluates the closure with gradients on (even when called under
    no_grad), returns its loss, and updates with the gradients it produced."""
    kw = CASES[name][1]
    init, _ = _data(np.float64, seed=6)
    results = {}
    for lib in (kiln, torch):
        params = _params(lib, init)
        opt = (getattr(kiln.optim, name)(params, **kw) if lib is kiln
               else _torch_opt(name, params, **kw))
        seen = []

        def closure(lib=lib, opt=opt, params=params, seen=seen):
            seen.append(lib.is_grad_enabled())
            opt.zero_grad()
            loss = sum(((p * p) * (i + 1)).sum() for i, p in enumerate(params))
            loss.backward()
            return loss

        losses = []
        for i in range(5):
            if i % 2:
                with lib.no_grad():
                    losses.append(opt.step(closure).item())
            else:
                losses.append(opt.step(closure).item())
        assert seen == [True] * 5
        results[lib] = losses, [_np(p).copy() for p in params]
    np.testing.assert_allclose(results[kiln][0], results[torch][0], rtol=1e-12)
    for a, b in zip(results[kiln][1], results[torch][1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_step_runs_without_grad_and_restores_mode():
    p = kiln.ones(2, requires_grad=True)
    opt = kiln.optim.SGD([p], lr=0.1)
    modes = []
    opt.register_step_pre_hook(lambda o, a, k: modes.append(("pre", kiln.is_grad_enabled())))
    handle = opt.register_step_post_hook(
        lambda o, a, k: modes.append(("post", kiln.is_grad_enabled())))
    p.grad = kiln.ones(2)
    opt.step()
    assert kiln.is_grad_enabled()
    assert p.is_leaf and p.requires_grad and p.grad_fn is None
    assert modes == [("pre", True), ("post", True)]
    handle.remove()
    opt.step()
    assert modes == [("pre", True), ("post", True), ("pre", True)]
    np.testing.assert_allclose(_np(p), [0.8, 0.8], rtol=1e-6)


def test_step_and_state_stay_out_of_the_graph():
    """Updating parameters after backward leaves them leaves; the next forward/backward
    works (the in-place update must not be recorded)."""
    for name in CASES:
        p = kiln.tensor([1.0, -2.0, 3.0], requires_grad=True)
        opt = kiln.optim.__dict__[name]([p], **CASES[name][-1])
        for _ in range(3):
            opt.zero_grad()
            (p * p).sum().backward()
            opt.step()
            assert p.is_leaf and p.requires_grad
            for v in opt.state[p].values():
                assert not v.requires_grad and v.grad_fn is None


def test_repr_like_torch():
    k = kiln.optim.Adam([kiln.zeros(1, requires_grad=True)], lr=0.01)
    t = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.01)
    assert repr(k) == repr(t)


# -- errors ----------------------------------------------------------------------------------

def _p(lib):
    return lib.zeros(2, requires_grad=True)


BAD_HYPER = [
    ("SGD", {"lr": -1}, "Invalid learning rate: -1"),
    ("SGD", {"lr": 0.1, "momentum": -0.5}, "Invalid momentum value: -0.5"),
    ("SGD", {"lr": 0.1, "weight_decay": -1}, "Invalid weight_decay value: -1"),
    ("SGD", {"lr": 0.1, "nesterov": True}, "Nesterov momentum requires a momentum and zero"),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov momentum"),
    ("Adam", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("Adam", {"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ("Adam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ("Adam", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ("Adam", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("Adam", {"betas": (0, 0.9)}, "betas must be either both floats or both Tensors"),
    ("AdamW", {"lr": -1.0}, "Invalid learning rate: -1.0"),
    ("AdamW", {"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1: 1.5"),
    ("RMSprop", {"lr": -1}, "Invalid learning rate: -1"),
    ("RMSprop", {"alpha": -0.1}, "Invalid alpha value: -0.1"),
    ("RMSprop", {"eps": -1.0}, "Invalid epsilon value: -1.0"),
    ("RMSprop", {"momentum": -1.0}, "Invalid momentum value: -1.0"),
    ("RMSprop", {"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    ("Adagrad", {"lr": -1}, "Invalid learning rate: -1"),
    ("Adagrad", {"lr_decay": -1}, "Invalid lr_decay value: -1"),
    ("Adagrad", {"weight_decay": -1}, "Invalid weight_decay value: -1"),
    ("Adagrad", {"initial_accumulator_value": -1}, "Invalid initial_accumulator_value value"),
    ("Adagrad", {"eps": -1}, "Invalid epsilon value: -1"),
]


@pytest.mark.parametrize("name,kw,msg", BAD_HYPER, ids=[f"{n}-{m}" for n, _, m in BAD_HYPER])
def test_invalid_hyper_parameters(name, kw, msg):
    e = check_exception(lambda lib: lib.optim.__dict__[name]([_p(lib)], **kw))
    assert msg in str(e)
    with pytest.raises(type(e)) as t:
        torch.optim.__dict__[name]([_p(torch)], **kw)
    assert str(e) == str(t.value)


def test_parameter_errors():
    e = check_exception(lambda lib: lib.optim.SGD([], lr=0.1))
    assert str(e) == "optimizer got an empty parameter list"
    e = check_exception(lambda lib: lib.optim.Adam([_p(lib) * 2]))
    assert str(e) == "can't optimize a non-leaf Tensor"
    e = check_exception(lambda lib: lib.optim.SGD(_p(lib), lr=0.1))
    assert "should be an iterable of Tensors or dicts" in str(e)
    e = check_exception(lambda lib: lib.optim.SGD([_p(lib), 3], lr=0.1))
    assert str(e) == "optimizer can only optimize Tensors, but one of the params is int"
    e = check_exception(lambda lib: lib.optim.SGD([{"params": {_p(lib)}}], lr=0.1))
    assert "ordered collections" in str(e)

    def twice(lib):
        p = _p(lib)
        lib.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)

    e = check_exception(twice)
    assert str(e) == "some parameters appear in more than one parameter group"
    e = check_exception(lambda lib: lib.optim.SGD([_p(lib)], lr=0.1).add_param_group([_p(lib)]))
    assert "param_group must be a dict" in str(e)


def test_non_leaf_with_retain_grad_is_accepted():
    for lib in (kiln, torch):
        y = _p(lib) * 2
        y.retain_grad()
        lib.optim.SGD([y], lr=0.1)


def test_named_parameters():
    kp, tp = _p(kiln), _p(torch)
    k = kiln.optim.SGD([("w", kp)], lr=0.1)
    t = torch.optim.SGD([("w", tp)], lr=0.1)
    assert k.param_groups[0]["param_names"] == t.param_groups[0]["param_names"] == ["w"]
    assert k.state_dict()["param_groups"] == t.state_dict()["param_groups"]
    e = check_exception(lambda lib: lib.optim.SGD([("w", _p(lib)), _p(lib)], lr=0.1))
    assert "Some param names are missing" in str(e)


def test_duplicate_parameters_warn():
    p = _p(kiln)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        kiln.optim.SGD([p, p], lr=0.1)


def test_tensor_lr():
    """A one-element tensor lr works, as in PyTorch.  (PyTorch divides the float32 lr tensor
    by the bias correction in float32; kiln uses lr.item() in double, so compare in float32.)"""
    init, grads = _data(np.float32, seed=7)
    kp, tp = _params(kiln, init), _params(torch, init)
    kopt = kiln.optim.Adam(kp, lr=kiln.tensor(0.01))
    topt = _torch_opt("Adam", tp, lr=torch.tensor(0.01))
    for gs in grads[:5]:
        _set_grads(kp, gs, kiln)
        _set_grads(tp, gs, torch)
        kopt.step()
        topt.step()
        _assert_params(kp, tp, TOL[np.float32])
    e = check_exception(lambda lib: lib.optim.SGD([_p(lib)], lr=lib.tensor([0.1, 0.2])))
    assert str(e) == "Tensor lr must be 1-element"


def test_checkpoint_through_kiln_save_and_load(tmp_path):
    """Optimizer and scheduler state_dicts survive kiln.save / kiln.load (no pickle) and
    resume the exact trajectory."""
    init, grads = _data(np.float32, seed=8)

    def build(params):
        opt = kiln.optim.AdamW(params, lr=0.01, amsgrad=True)
        return opt, kiln.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)

    kp = _params(kiln, init)
    opt, sched = build(kp)
    for i, gs in enumerate(grads):
        if i == 10:
            path = str(tmp_path / "ckpt.kiln")
            kiln.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, path)
            kp2 = [kiln.tensor(_np(p).copy(), requires_grad=True) for p in kp]
            opt2, sched2 = build(kp2)
            ckpt = kiln.load(path)
            opt2.load_state_dict(ckpt["opt"])
            sched2.load_state_dict(ckpt["sched"])
        _set_grads(kp, gs, kiln)
        opt.step()
        sched.step()
        if i >= 10:
            _set_grads(kp2, gs, kiln)
            opt2.step()
            sched2.step()
            assert sched2.get_last_lr() == sched.get_last_lr()
            for a, b in zip(kp, kp2):
                np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_trains_an_nn_module_like_torch(name):
    """End to end with kiln.nn: Parameters from model.parameters(), forward, backward, step."""
    kw = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 0.01},
          "AdamW": {"lr": 0.01, "weight_decay": 0.1}}[name]
    rng = np.random.default_rng(9)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    x, y = rng.standard_normal((8, 4)), rng.standard_normal((8, 3))
    out = {}
    for lib in (kiln, torch):
        model = lib.nn.Linear(4, 3).double()
        with lib.no_grad():
            model.weight.copy_(lib.tensor(w))
            model.bias.copy_(lib.tensor(b))
        opt = getattr(lib.optim, name)(model.parameters(), **kw)
        xt, yt = lib.tensor(x), lib.tensor(y)
        for _ in range(10):
            opt.zero_grad()
            loss = ((model(xt) - yt) * (model(xt) - yt)).mean()
            loss.backward()
            opt.step()
        out[lib] = [_np(p).copy() for p in model.parameters()]
    for a, b_ in zip(out[kiln], out[torch]):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)
