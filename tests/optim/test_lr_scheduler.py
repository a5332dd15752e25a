"""kiln.optim.lr_scheduler against torch.optim.lr_scheduler: the learning rates (and cycled
momentum/betas) of every group, compared step by step."""

import copy
import math
import warnings

import pytest
import torch

import kiln
from tests.helpers import check_exception

STEPS = 30


def _optimizer(lib, name="SGD", lrs=(0.1, 0.02)):
    ps = [lib.zeros(2, requires_grad=True) for _ in lrs]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(ps, lrs)]
    if name == "SGD":
        return lib.optim.SGD(groups, lr=0.5, momentum=0.9)
    if name == "Adam":
        return lib.optim.Adam(groups, betas=(0.9, 0.999))
    return lib.optim.__dict__[name](groups)


def _sched(lib, name):
    return lib.optim.lr_scheduler.__dict__[name]


def _lam(e):
    return 0.95**e


def _mul(e):
    return 0.9 if e % 2 else 1.05


# (optimizer, builder(lib, opt)), one entry per scheduler configuration.
CASES = {
    "StepLR": lambda L, o: _sched(L, "StepLR")(o, step_size=3, gamma=0.5),
    "StepLR-default": lambda L, o: _sched(L, "StepLR")(o, step_size=7),
    "MultiStepLR": lambda L, o: _sched(L, "MultiStepLR")(o, milestones=[2, 5, 5, 9], gamma=0.3),
    "ExponentialLR": lambda L, o: _sched(L, "ExponentialLR")(o, gamma=0.9),
    "CosineAnnealingLR": lambda L, o: _sched(L, "CosineAnnealingLR")(o, T_max=10),
    "CosineAnnealingLR-periodic": lambda L, o: _sched(L, "CosineAnnealingLR")(
        o, T_max=7, eta_min=0.001),
    "LambdaLR": lambda L, o: _sched(L, "LambdaLR")(o, lr_lambda=_lam),
    "LambdaLR-per-group": lambda L, o: _sched(L, "LambdaLR")(
        o, lr_lambda=[_lam, lambda e: 1.0 / (e + 1)]),
    "MultiplicativeLR": lambda L, o: _sched(L, "MultiplicativeLR")(o, lr_lambda=_mul),
    "LinearLR": lambda L, o: _sched(L, "LinearLR")(o),
    "LinearLR-custom": lambda L, o: _sched(L, "LinearLR")(
        o, start_factor=0.25, end_factor=0.9, total_iters=8),
    "LinearLR-decay": lambda L, o: _sched(L, "LinearLR")(
        o, start_factor=1.0, end_factor=0.1, total_iters=12),
    "ConstantLR": lambda L, o: _sched(L, "ConstantLR")(o, factor=0.5, total_iters=4),
    "PolynomialLR": lambda L, o: _sched(L, "PolynomialLR")(o, total_iters=10, power=2.0),
    "CosineAnnealingWarmRestarts": lambda L, o: _sched(L, "CosineAnnealingWarmRestarts")(
        o, T_0=4, T_mult=2, eta_min=0.01),
    "CosineAnnealingWarmRestarts-T1": lambda L, o: _sched(L, "CosineAnnealingWarmRestarts")(
        o, T_0=5),
    "SequentialLR": lambda L, o: _sched(L, "SequentialLR")(
        o, [_sched(L, "LinearLR")(o, start_factor=0.1, total_iters=5),
            _sched(L, "ExponentialLR")(o, gamma=0.9)], milestones=[5]),
    "SequentialLR-3": lambda L, o: _sched(L, "SequentialLR")(
        o, [_sched(L, "ConstantLR")(o, factor=0.2, total_iters=3),
            _sched(L, "CosineAnnealingLR")(o, T_max=8),
            _sched(L, "StepLR")(o, step_size=2, gamma=0.5)], milestones=[4, 12]),
    "ChainedScheduler": lambda L, o: _sched(L, "ChainedScheduler")(
        [_sched(L, "ConstantLR")(o, factor=0.5, total_iters=4),
         _sched(L, "ExponentialLR")(o, gamma=0.9)]),
}

ONECYCLE = {
    "cos": {"max_lr": 0.1, "total_steps": STEPS},
    "linear": {"max_lr": 0.1, "total_steps": STEPS, "anneal_strategy": "linear"},
    "three_phase": {"max_lr": 0.2, "total_steps": STEPS, "three_phase": True},
    "three_phase-linear": {"max_lr": 0.2, "total_steps": STEPS, "three_phase": True,
                               "anneal_strategy": "linear", "pct_start": 0.2},
    "epochs": {"max_lr": [0.1, 0.05], "epochs": 5, "steps_per_epoch": 6, "pct_start": 0.25},
    "factors": {"max_lr": 0.3, "total_steps": STEPS, "div_factor": 10.0, "final_div_factor": 100.0,
                    "base_momentum": [0.8, 0.7], "max_momentum": 0.9},
    "no-momentum": {"max_lr": 0.1, "total_steps": STEPS, "cycle_momentum": False},
}
for _k, _kw in list(ONECYCLE.items()):
    for _opt in ("SGD", "Adam"):
        CASES[f"OneCycleLR-{_k}-{_opt}"] = (_opt, lambda L, o, kw=_kw: _sched(L, "OneCycleLR")(
            o, **kw))


def _groups_view(opt):
    """What a scheduler may change in the groups: lr, initial_lr, momentum / betas."""
    keys = ("lr", "initial_lr", "momentum", "betas", "max_lr", "min_lr", "max_momentum",
            "base_momentum")
    return [{k: g[k] for k in keys if k in g} for g in opt.param_groups]


def _run(lib, case, steps=STEPS, opt_name="SGD"):
    opt = _optimizer(lib, opt_name)
    sched = case(lib, opt)
    trace = [(sched.get_last_lr(), _groups_view(opt))]
    for _ in range(steps - 1 if "OneCycle" in type(sched).__name__ else steps):
        opt.step()
        sched.step()
        trace.append((list(sched.get_last_lr()), _groups_view(opt)))
    return opt, sched, trace


def _unpack(case):
    return case if isinstance(case, tuple) else ("SGD", case)


@pytest.mark.parametrize("name", list(CASES))
def test_learning_rates_match_torch(name):
    """Same Python-float formulas as PyTorch, so the values are equal, not just close."""
    opt_name, case = _unpack(CASES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ko, ks, ktrace = _run(kiln, case, opt_name=opt_name)
        _, ts, ttrace = _run(torch, case, opt_name=opt_name)
    assert len(ktrace) >= 20
    for step, (k, t) in enumerate(zip(ktrace, ttrace)):
        assert k == t, f"step {step}: kiln {k} != torch {t}"
    if hasattr(ts, "last_epoch"):
        assert ks.last_epoch == ts.last_epoch
    if hasattr(ts, "base_lrs"):
        assert ks.base_lrs == ts.base_lrs
    assert "initial_lr" in ko.param_groups[0]


def test_onecycle_values_are_the_documented_schedule():
    """Spot check the 1cycle shape itself: starts at max_lr/div_factor, peaks at max_lr at
    pct_start, ends at initial_lr/final_div_factor; momentum moves the other way."""
    opt = _optimizer(kiln, "SGD", lrs=(0.1,))
    s = kiln.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=12, pct_start=0.5)
    lrs, moms = [s.get_last_lr()[0]], [opt.param_groups[0]["momentum"]]
    for _ in range(11):
        opt.step()
        s.step()
        lrs.append(s.get_last_lr()[0])
        moms.append(opt.param_groups[0]["momentum"])
    assert lrs[0] == pytest.approx(1.0 / 25) and moms[0] == pytest.approx(0.95)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 5
    assert moms[5] == pytest.approx(0.85)
    assert lrs[-1] == pytest.approx(1.0 / 25 / 1e4)
    assert moms[-1] == pytest.approx(0.95)


def test_onecycle_past_total_steps_errors_like_torch():
    def run(lib):
        opt = _optimizer(lib)
        s = lib.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=3)
        for _ in range(4):
            opt.step()
            s.step()

    e = check_exception(run)
    assert str(e) == "Tried to step 4 times. The specified number of total steps is 3"


def test_reduce_lr_on_plateau():
    metrics = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.7, 0.7, 0.7,
               0.7, 0.7, 0.7, 0.7, 0.7, 0.69999, 0.7, 0.7, 0.7, 0.7, 0.7]
    configs = [{"patience": 2}, {"mode": "max", "patience": 1, "factor": 0.5, "cooldown": 2},
               {"patience": 1, "threshold": 0.1, "threshold_mode": "abs", "min_lr": [0.05, 0.001]},
               {"patience": 0, "factor": 0.5, "min_lr": 0.01, "eps": 1e-3}]
    for kw in configs:
        traces = {}
        for lib in (kiln, torch):
            opt = _optimizer(lib)
            s = lib.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
            trace = []
            for m in metrics:
                opt.step()
                s.step(m if lib is torch else kiln.tensor(m, dtype=kiln.float64))
                trace.append((s.get_last_lr(), s.num_bad_epochs, s.cooldown_counter, s.best,
                              s.last_epoch))
            traces[lib] = trace
        assert traces[kiln] == traces[torch], kw


# -- state_dict ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip(name, tmp_path):
    """Save the optimizer and scheduler half-way (through kiln.save / kiln.load), restore both
    into fresh objects, continue: the same learning rates as the uninterrupted run."""
    opt_name, case = _unpack(CASES[name])
    _, _, full = _run(kiln, case, opt_name=opt_name)
    opt = _optimizer(kiln, opt_name)
    sched = case(kiln, opt)
    half = STEPS // 2
    for _ in range(half):
        opt.step()
        sched.step()
    kiln.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, str(tmp_path / "c.kiln"))
    ckpt = kiln.load(str(tmp_path / "c.kiln"))
    osd, ssd = ckpt["opt"], ckpt["sched"]
    opt2 = _optimizer(kiln, opt_name)
    sched2 = case(kiln, opt2)  # PyTorch's order: build the scheduler, then load both
    opt2.load_state_dict(osd)
    sched2.load_state_dict(ssd)
    assert sched2.get_last_lr() == full[half][0]
    trace = []
    for _ in range(len(full) - 1 - half):
        opt2.step()
        sched2.step()
        trace.append((list(sched2.get_last_lr()), _groups_view(opt2)))
    assert trace == full[half + 1:]


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_keys_match_torch(name):
    opt_name, case = _unpack(CASES[name])
    _, ks, _ = _run(kiln, case, steps=3, opt_name=opt_name)
    _, ts, _ = _run(torch, case, steps=3, opt_name=opt_name)
    ksd, tsd = ks.state_dict(), ts.state_dict()
    assert set(ksd) == set(tsd)
    for key in ("last_epoch", "base_lrs", "_last_lr", "_step_count"):
        if key in tsd:
            assert ksd[key] == tsd[key], key


def test_torch_state_dict_loads_into_kiln():
    """Scheduler state_dicts are plain Python values: one written by PyTorch resumes in kiln."""
    lam = CASES["CosineAnnealingLR-periodic"]
    to = _optimizer(torch)
    ts = lam(torch, to)
    for _ in range(9):
        to.step()
        ts.step()
    ko = _optimizer(kiln)
    ks = lam(kiln, ko)
    ks.load_state_dict(copy.deepcopy(ts.state_dict()))
    for g, tg in zip(ko.param_groups, to.param_groups):
        g["lr"] = tg["lr"]
    for _ in range(10):
        to.step()
        ts.step()
        ko.step()
        ks.step()
        assert ks.get_last_lr() == ts.get_last_lr()


def test_lambda_state_dict_saves_callable_objects_only():
    class Decay:
        def __init__(self, rate):
            self.rate = rate

        def __call__(self, e):
            return self.rate**e

    for lib in (kiln, torch):
        s = lib.optim.lr_scheduler.LambdaLR(_optimizer(lib), [Decay(0.5), _lam])
        sd = s.state_dict()
        assert sd["lr_lambdas"] == [{"rate": 0.5}, None]
        sd["lr_lambdas"][0]["rate"] = 0.25
        s.load_state_dict(sd)
        assert s.lr_lambdas[0].rate == 0.25


# -- behaviour and errors --------------------------------------------------------------------

def test_step_before_optimizer_step_warns():
    s = kiln.optim.lr_scheduler.StepLR(_optimizer(kiln), step_size=2)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        s.step()


def test_get_lr_outside_step_warns():
    s = kiln.optim.lr_scheduler.StepLR(_optimizer(kiln), step_size=2)
    with pytest.warns(UserWarning, match="get_last_lr"):
        s.get_lr()


def test_epoch_argument_uses_closed_form():
    results = {}
    for lib in (kiln, torch):
        opt = _optimizer(lib)
        s = lib.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        opt.step()
        with pytest.warns(UserWarning):
            s.step(7)
        results[lib] = s.get_last_lr()
    assert results[kiln] == results[torch]


def test_scheduler_updates_tensor_lr_in_place():
    for lib in (kiln, torch):
        p = lib.zeros(2, requires_grad=True)
        lr = lib.tensor(0.1)
        opt = lib.optim.Adam([p], lr=lr)
        s = lib.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        opt.step()
        s.step()
        assert opt.param_groups[0]["lr"] is lr
        assert math.isclose(float(lr.item()), 0.05, rel_tol=1e-6)


def test_resume_with_last_epoch():
    def build(lib):
        opt = _optimizer(lib)
        return lib.optim.lr_scheduler.StepLR(opt, step_size=2, last_epoch=3)

    e = check_exception(build)
    assert "param 'initial_lr' is not specified in param_groups[0]" in str(e)
    for lib in (kiln, torch):
        opt = _optimizer(lib)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    ko, to = _optimizer(kiln), _optimizer(torch)
    for o in (ko, to):
        for g in o.param_groups:
            g["initial_lr"] = g["lr"]
    ks = kiln.optim.lr_scheduler.ExponentialLR(ko, gamma=0.5, last_epoch=3)
    ts = torch.optim.lr_scheduler.ExponentialLR(to, gamma=0.5, last_epoch=3)
    assert ks.get_last_lr() == ts.get_last_lr() and ks.last_epoch == ts.last_epoch == 4


ERRORS = [
    ("not an optimizer", lambda L: _sched(L, "StepLR")(object(), step_size=1), "not an Optimizer"),
    ("ConstantLR factor", lambda L: _sched(L, "ConstantLR")(_optimizer(L), factor=1.5),
     "between 0 and 1"),
    ("LinearLR start", lambda L: _sched(L, "LinearLR")(_optimizer(L), start_factor=0),
     "Starting multiplicative factor"),
    ("LinearLR end", lambda L: _sched(L, "LinearLR")(_optimizer(L), end_factor=2.0),
     "Ending multiplicative factor"),
    ("LambdaLR count", lambda L: _sched(L, "LambdaLR")(_optimizer(L), [_lam]),
     "Expected 2 lr_lambdas, but got 1"),
    ("MultiplicativeLR callable", lambda L: _sched(L, "MultiplicativeLR")(_optimizer(L), 0.5),
     "lr_lambda should be a function"),
    ("OneCycle steps", lambda L: _sched(L, "OneCycleLR")(_optimizer(L), max_lr=0.1),
     "You must define either total_steps OR"),
    ("OneCycle total", lambda L: _sched(L, "OneCycleLR")(_optimizer(L), 0.1, total_steps=0),
     "Expected positive integer total_steps, but got 0"),
    ("OneCycle epochs", lambda L: _sched(L, "OneCycleLR")(
        _optimizer(L), 0.1, epochs=-1, steps_per_epoch=3), "positive integer epochs"),
    ("OneCycle pct", lambda L: _sched(L, "OneCycleLR")(
        _optimizer(L), 0.1, total_steps=10, pct_start=1.5), "pct_start"),
    ("OneCycle anneal", lambda L: _sched(L, "OneCycleLR")(
        _optimizer(L), 0.1, total_steps=10, anneal_strategy="exp"), "anneal_strategy"),
    ("OneCycle max_lr list", lambda L: _sched(L, "OneCycleLR")(
        _optimizer(L), [0.1], total_steps=10), "max_lr must have the same length"),
    ("OneCycle no momentum", lambda L: _sched(L, "OneCycleLR")(
        _optimizer(L, "Adagrad"), 0.1, total_steps=10), "must support momentum or beta1"),
    ("Plateau factor", lambda L: _sched(L, "ReduceLROnPlateau")(_optimizer(L), factor=1.0),
     "Factor should be < 1.0."),
    ("Plateau mode", lambda L: _sched(L, "ReduceLROnPlateau")(_optimizer(L), mode="avg"),
     "mode avg is unknown!"),
    ("Plateau threshold", lambda L: _sched(L, "ReduceLROnPlateau")(
        _optimizer(L), threshold_mode="x"), "threshold mode x is unknown!"),
    ("Plateau min_lr", lambda L: _sched(L, "ReduceLROnPlateau")(_optimizer(L), min_lr=[0.1]),
     "expected 2 min_lrs, got 1"),
    ("WarmRestarts T_0", lambda L: _sched(L, "CosineAnnealingWarmRestarts")(_optimizer(L), 0),
     "Expected positive integer T_0"),
    ("SequentialLR milestones", lambda L: _sched(L, "SequentialLR")(
        (o := _optimizer(L)), [_sched(L, "StepLR")(o, 2)], milestones=[3]),
     "one more than the number of milestone points"),
    ("SequentialLR plateau", lambda L: _sched(L, "SequentialLR")(
        (o := _optimizer(L)), [_sched(L, "ReduceLROnPlateau")(o)], milestones=[]),
     "does not support `ReduceLROnPlateau`"),
    ("ChainedScheduler empty", lambda L: _sched(L, "ChainedScheduler")([]),
     "expects at least one scheduler"),
]


@pytest.mark.parametrize("fn,match", [(f, m) for _, f, m in ERRORS], ids=[n for n, _, _ in ERRORS])
def test_errors_like_torch(fn, match):
    check_exception(fn, match=match)
