"""nn.Module, Parameter and the containers, checked against torch.nn on the same architectures:
registration, parameter order, state_dict keys and loading errors, repr, modes, hooks, dtype."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception


def _name(s: str) -> str:
    """Compare messages and reprs across libraries."""
    return s.replace("torch.nn.", "").replace("torch.", "").replace("kiln.nn.", "").replace(
        "kiln.", "")


def fake_bn(lib):
    """A module with BatchNorm's state layout (float and int64 buffers), in both libraries."""
    nn = lib.nn

    class FakeBN(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(lib.ones(n))
            self.bias = nn.Parameter(lib.zeros(n))
            self.register_buffer("running_mean", lib.zeros(n))
            self.register_buffer("running_var", lib.ones(n))
            self.register_buffer("num_batches_tracked", lib.tensor(0, dtype=lib.long))

        def forward(self, x):
            return x * self.weight + self.bias

    return FakeBN


def make_net(lib):
    """One architecture exercising every kind of member, built with ``lib.nn``."""
    nn = lib.nn
    FakeBN = fake_bn(lib)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = FakeBN(4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.fc(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.blocks = nn.ModuleList([Block() for _ in range(2)])
            self.heads = nn.ModuleDict({"b": nn.Linear(4, 2), "a": nn.Linear(4, 1, bias=False)})
            self.extra = nn.ParameterList([nn.Parameter(lib.zeros(3)),
                                           nn.Parameter(lib.ones(2, 2))])
            self.table = nn.ParameterDict({"y": nn.Parameter(lib.zeros(1)),
                                           "x": nn.Parameter(lib.zeros(2))})
            self.alpha = nn.Parameter(lib.tensor(0.5))
            self.register_buffer("scale", lib.ones(4))
            self.register_buffer("scratch", lib.zeros(2), persistent=False)
            self.register_parameter("unused", None)
            self.register_buffer("nothing", None)
            self.plain = lib.zeros(5)  # a plain tensor attribute: not registered

        def forward(self, x):
            h = self.stem(x)
            for b in self.blocks:
                h = b(h)
            return self.heads["b"](h * self.scale) * self.alpha

    return Net()


def both():
    torch.manual_seed(0)
    return make_net(kiln), make_net(torch)


def test_named_parameters_buffers_modules_match_torch():
    k, t = both()
    assert [n for n, _ in k.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in k.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert [n for n, _ in k.named_modules()] == [n for n, _ in t.named_modules()]
    assert [n for n, _ in k.named_children()] == [n for n, _ in t.named_children()]
    assert ([n for n, _ in k.named_parameters(prefix="m", recurse=False)]
            == [n for n, _ in t.named_parameters(prefix="m", recurse=False)])
    assert len(list(k.parameters())) == len(list(t.parameters()))
    assert len(list(k.buffers(recurse=False))) == len(list(t.buffers(recurse=False)))
    assert len(list(k.modules())) == len(list(t.modules()))
    assert [type(m).__name__ for m in k.children()] == [type(m).__name__ for m in t.children()]
    for (_, kp), (_, tp) in zip(k.named_parameters(), t.named_parameters(), strict=True):
        assert isinstance(kp, kiln.nn.Parameter) and kp.requires_grad
        assert tuple(kp.shape) == tuple(tp.shape)


def test_state_dict_keys_values_and_sharing():
    k, t = both()
    ks, ts = k.state_dict(), t.state_dict()
    assert isinstance(ks, OrderedDict)
    assert list(ks) == list(ts)
    assert "scratch" not in ks and "blocks.0.bn.num_batches_tracked" in ks
    v = ks["stem.0.weight"]
    assert type(v) is kiln.Tensor and not v.requires_grad
    assert np.shares_memory(v.numpy(), k.stem[0].weight.detach().numpy())
    assert ks["blocks.1.bn.num_batches_tracked"].dtype == kiln.int64
    kv = k.state_dict(keep_vars=True)
    assert kv["alpha"] is k.alpha
    assert list(k.state_dict(prefix="model.")) == list(t.state_dict(prefix="model."))


def test_load_state_dict_from_torch_numpy_and_roundtrip():
    k, t = both()
    sd = {name: v.numpy() for name, v in t.state_dict().items()}
    sd["blocks.0.bn.num_batches_tracked"] = np.array(7)
    w_before = k.stem[0].weight
    version = w_before._version_counter
    result = k.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert repr(result) == repr(t.load_state_dict(t.state_dict()))  # <All keys matched ...>
    assert k.stem[0].weight is w_before and w_before._version_counter > version
    for name, v in k.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[name])
        assert v.dtype.name == str(t.state_dict()[name].dtype).split(".")[-1]
    # Kiln tensors and torch tensors are accepted as values too.
    k2 = make_net(kiln)
    k2.load_state_dict(k.state_dict())
    np.testing.assert_array_equal(k2.alpha.detach().numpy(), k.alpha.detach().numpy())
    k2.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(k2.heads["a"].weight.detach().numpy(),
                                  t.heads["a"].weight.detach().numpy())


def _load_error(lib_model, sd):
    with pytest.raises(RuntimeError) as e:
        lib_model.load_state_dict(sd)
    return _name(str(e.value))


def test_strict_load_errors_match_torch():
    k, t = both()
    sd = {name: v.numpy() for name, v in t.state_dict().items()}
    del sd["stem.0.bias"]
    del sd["blocks.1.bn.running_var"]
    sd["stem.5.weight"] = np.zeros(2, np.float32)
    sd["bogus"] = np.zeros(1, np.float32)
    tsd = {name: torch.from_numpy(v) for name, v in sd.items()}
    msg = _load_error(k, sd)
    assert msg == _load_error(t, tsd)
    assert 'Missing key(s) in state_dict: "stem.0.bias", "blocks.1.bn.running_var"' in msg
    assert 'Unexpected key(s) in state_dict: "bogus", "stem.5.weight"' in msg
    # Non-strict: the same keys are reported, and nothing is raised.
    r = k.load_state_dict(sd, strict=False)
    assert r == t.load_state_dict(tsd, strict=False)
    assert r.missing_keys == ["stem.0.bias", "blocks.1.bn.running_var"]


def test_size_mismatch_error_matches_torch():
    k, t = both()
    sd = {name: v.numpy() for name, v in t.state_dict().items()}
    sd["heads.b.weight"] = np.zeros((3, 4), np.float32)
    tsd = {name: torch.from_numpy(v) for name, v in sd.items()}
    msg = _load_error(k, sd)
    assert msg == _load_error(t, tsd)
    assert "size mismatch for heads.b.weight" in msg and "[3, 4]" in msg and "[2, 4]" in msg
    with pytest.raises(RuntimeError, match="size mismatch"):  # even when not strict
        k.load_state_dict(sd, strict=False)
    with pytest.raises(TypeError, match="dict-like"):
        k.load_state_dict([1, 2])


def test_load_state_dict_assign_and_scalar_compat():
    k = kiln.nn.Linear(2, 2)
    w = kiln.ones(2, 2)
    k.load_state_dict({"weight": w, "bias": kiln.zeros(2)}, assign=True)
    assert isinstance(k.weight, kiln.nn.Parameter) and k.weight.requires_grad
    assert np.shares_memory(k.weight.detach().numpy(), w.numpy())
    m = kiln.nn.Module()
    m.p = kiln.nn.Parameter(kiln.tensor(1.0))
    m.load_state_dict({"p": np.array([3.0], np.float32)})  # 1-element into 0-d (old format)
    assert m.p.item() == 3.0


def test_repr_matches_torch():
    k, t = both()
    assert _name(repr(k)) == _name(repr(t))
    km = kiln.nn.Sequential(kiln.nn.Linear(784, 256), kiln.nn.ReLU(), kiln.nn.Linear(256, 10))
    assert repr(km) == ("Sequential(\n  (0): Linear(in_features=784, out_features=256, bias=True)"
                        "\n  (1): ReLU()\n  (2): Linear(in_features=256, out_features=10, "
                        "bias=True)\n)")
    for lib_empty in (lambda lib: lib.nn.Sequential(), lambda lib: lib.nn.ModuleList(),
                      lambda lib: lib.nn.ModuleList([lib.nn.ReLU()] * 3 + [lib.nn.Tanh()]),
                      lambda lib: lib.nn.ParameterList([lib.nn.Parameter(lib.zeros(2, 3))]),
                      lambda lib: lib.nn.Module()):
        assert _name(repr(lib_empty(kiln))) == _name(repr(lib_empty(torch)))

    class Multi(kiln.nn.Module):
        def extra_repr(self):
            return "a=1\nb=2"

    m = Multi()
    m.child = kiln.nn.Identity()
    assert repr(m) == "Multi(\n  a=1\n  b=2\n  (child): Identity()\n)"


def test_parameter_basics():
    data = kiln.tensor([1.0, 2.0])
    p = kiln.nn.Parameter(data)
    assert isinstance(p, kiln.Tensor) and p.requires_grad and p.is_leaf
    assert np.shares_memory(p.detach().numpy(), data.numpy())
    assert repr(p) == repr(torch.nn.Parameter(torch.tensor([1.0, 2.0])))
    assert not kiln.nn.Parameter(data, requires_grad=False).requires_grad
    assert tuple(kiln.nn.Parameter().shape) == (0,)
    q = p * 2
    assert type(q) is kiln.Tensor
    assert type(p.detach()) is kiln.Tensor
    with pytest.raises(TypeError):
        kiln.nn.Parameter([1.0, 2.0])
    check_exception(lambda lib: lib.nn.Parameter(lib.tensor([1, 2])), match="floating")
    c = copy.deepcopy(p)
    assert isinstance(c, kiln.nn.Parameter) and c.requires_grad
    assert not np.shares_memory(c.detach().numpy(), p.detach().numpy())


def test_setattr_registration_rules_match_torch():
    for lib in (kiln, torch):
        nn = lib.nn
        m = nn.Module()
        m.w = nn.Parameter(lib.zeros(2))
        m.sub = nn.Linear(2, 2)
        m.register_buffer("buf", lib.zeros(1))
        m.plain = lib.zeros(3)
        assert [n for n, _ in m.named_parameters()] == ["w", "sub.weight", "sub.bias"]
        assert "plain" not in dict(m.named_buffers()) and "plain" in m.__dict__
        m.buf = lib.ones(1)  # assigning a tensor to a buffer name replaces the buffer
        assert float(m._buffers["buf"][0]) == 1.0
        m.w = None  # a parameter may be set to None
        assert m.w is None and "w" in m._parameters
        m.w = nn.Parameter(lib.zeros(1))
        m.sub = None
        assert m.sub is None
        m.sub = nn.Identity()
        m.b = nn.Buffer(lib.ones(2), persistent=False)
        assert "b" in m._buffers and "b" not in m.state_dict()
        del m.w, m.buf, m.sub, m.plain
        assert not hasattr(m, "w") and not hasattr(m, "buf") and not hasattr(m, "sub")
    check_exception(lambda lib: setattr(_with_param(lib), "w", lib.zeros(2)), match="parameter")
    check_exception(lambda lib: setattr(_with_child(lib), "c", 3), match="child module")
    check_exception(lambda lib: lib.nn.Module().register_buffer("a.b", lib.zeros(1)))
    check_exception(lambda lib: lib.nn.Module().register_buffer("", lib.zeros(1)))
    check_exception(lambda lib: lib.nn.Module().register_buffer("x", [1.0]), match="buffer")
    check_exception(lambda lib: lib.nn.Module().register_buffer("training", lib.zeros(1)),
                    match="already exists")
    check_exception(lambda lib: lib.nn.Module().register_parameter("p", lib.zeros(1)),
                    match="Parameter or None")
    check_exception(lambda lib: lib.nn.Module().add_module("m", 3), match="not a Module")
    check_exception(lambda lib: lib.nn.Module().add_module("a.b", lib.nn.ReLU()))
    check_exception(lambda lib: lib.nn.Module().missing, match="has no attribute 'missing'")
    check_exception(lambda lib: _Early.make(lib), match="before Module.__init__")


def _with_param(lib):
    m = lib.nn.Module()
    m.w = lib.nn.Parameter(lib.zeros(2))
    return m


def _with_child(lib):
    m = lib.nn.Module()
    m.c = lib.nn.ReLU()
    return m


class _Early:
    @staticmethod
    def make(lib):
        class Bad(lib.nn.Module):
            def __init__(self):
                self.w = lib.nn.Parameter(lib.zeros(1))
                super().__init__()

        return Bad()


def test_shared_parameters_are_listed_once():
    for lib in (kiln, torch):
        nn = lib.nn
        a = nn.Linear(3, 3)
        m = nn.Sequential(a, nn.ReLU(), a)
        assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias"]
        assert len(list(m.named_parameters(remove_duplicate=False))) == 4
        assert [n for n, _ in m.named_modules()] == ["", "0", "1"]
        assert list(m.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        m2 = nn.Module()
        m2.x = nn.Linear(2, 2)
        m2.y = nn.Linear(2, 2)
        m2.y.weight = m2.x.weight
        assert [n for n, _ in m2.named_parameters()] == ["x.weight", "x.bias", "y.bias"]


def test_train_eval_propagates_and_requires_grad_():
    k, _ = both()
    assert all(m.training for m in k.modules())
    assert k.eval() is k
    assert not any(m.training for m in k.modules())
    k.blocks.train()
    assert k.blocks[1].bn.training and not k.stem.training
    k.train()
    assert all(m.training for m in k.modules())
    check_exception(lambda lib: lib.nn.Linear(2, 2).train("yes"), match="boolean")
    k.requires_grad_(False)
    assert not any(p.requires_grad for p in k.parameters())
    k.requires_grad_()
    assert all(p.requires_grad for p in k.parameters())


def test_zero_grad_and_forward_backward():
    k, _ = both()
    x = kiln.ones(5, 3)
    k(x).sum().backward()
    assert all(p.grad is not None for n, p in k.named_parameters() if n.startswith("stem"))
    grad = k.stem[0].weight.grad
    k.zero_grad(set_to_none=False)
    assert k.stem[0].weight.grad is grad and not np.any(grad.numpy())
    k.zero_grad()
    assert all(p.grad is None for p in k.parameters())


def test_apply_order_and_to_double_keeps_identity():
    order = []
    k, t = both()
    k.apply(lambda m: order.append(type(m).__name__))
    t_order = []
    t.apply(lambda m: t_order.append(type(m).__name__))
    assert order == t_order and order[-1] == "Net"
    w = k.stem[0].weight
    k(kiln.ones(2, 3)).sum().backward()
    assert k.double() is k
    assert k.stem[0].weight is w and w.dtype == kiln.float64 and w.requires_grad
    assert w.grad.dtype == kiln.float64
    assert k.scale.dtype == kiln.float64
    assert k.blocks[0].bn.num_batches_tracked.dtype == kiln.int64  # integers are not converted
    out = k(kiln.ones(2, 3, dtype=kiln.float64))
    assert out.dtype == kiln.float64
    k.to(kiln.float32)
    assert w.dtype == kiln.float32 and k.scale.dtype == kiln.float32
    k.to(kiln.ones(1, dtype=kiln.float64))
    assert w.dtype == kiln.float64
    k.float()
    k.half()
    assert w.dtype == kiln.float16
    k.to("cpu")
    k.to(device="cpu", dtype=kiln.float32)
    assert w.dtype == kiln.float32
    check_exception(lambda lib: lib.nn.Linear(2, 2).to(lib.int64), match="floating point")


def test_forward_hooks_match_torch():
    for lib in (kiln, torch):
        nn = lib.nn
        log = []
        m = nn.Sequential(nn.Identity(), nn.Identity())
        h1 = m[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        h2 = m[0].register_forward_hook(lambda mod, args, out: out + 1)
        m[1].register_forward_hook(lambda mod, args, out: log.append(("post", float(out[0]))))
        m[1].register_forward_hook(lambda mod, args, out: log.append(("first",)), prepend=True)
        m[1].register_forward_pre_hook(lambda mod, args, kw: ((args[0] * 10,), kw),
                                       with_kwargs=True)
        m.register_forward_hook(lambda mod, args, kw, out: log.append(("kw", kw)),
                                with_kwargs=True)
        x = lib.ones(1)
        out = m(x)
        assert float(out[0]) == 30.0
        assert log == [("first",), ("post", 30.0), ("kw", {})]
        h1.remove()
        h2.remove()
        log.clear()
        assert float(m(x)[0]) == 10.0
        with m[0].register_forward_pre_hook(lambda mod, args: args[0] + 1):
            assert float(m(x)[0]) == 20.0  # a bare (non-tuple) return value is wrapped
        assert float(m(x)[0]) == 10.0


def test_always_call_hook_and_global_hooks():
    class Boom(kiln.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    seen = []
    b = Boom()
    b.register_forward_hook(lambda m, a, o: seen.append(o), always_call=True)
    with pytest.raises(ValueError):
        b(kiln.ones(1))
    assert seen == [None]
    calls = []
    h = kiln.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: calls.append(type(m).__name__))
    try:
        kiln.nn.Sequential(kiln.nn.Identity())(kiln.ones(1))
    finally:
        h.remove()
    assert calls == ["Identity", "Sequential"]


def test_get_submodule_parameter_buffer_match_torch():
    k, t = both()
    assert k.get_submodule("blocks.1.bn") is k.blocks[1].bn
    assert k.get_submodule("") is k
    assert k.get_parameter("heads.b.weight") is k.heads["b"].weight
    assert k.get_parameter("alpha") is k.alpha
    assert k.get_buffer("blocks.0.bn.running_mean") is k.blocks[0].bn.running_mean
    for bad in ("blocks.7", "stem.0.weight", "nope"):
        check_exception(lambda lib: (k if lib is kiln else t).get_submodule(bad))
    for bad in ("scale", "stem.0.nope", "stem"):
        check_exception(lambda lib: (k if lib is kiln else t).get_parameter(bad))
    check_exception(lambda lib: (k if lib is kiln else t).get_buffer("alpha"),
                    match="not a buffer")


def test_dir_lists_members():
    k, t = both()
    kd, td = set(dir(k)), set(dir(t))
    for name in ("stem", "blocks", "alpha", "scale", "scratch", "forward", "plain"):
        assert name in kd and name in td
    assert "0" not in dir(k.stem)
    assert "append" in dir(k.stem)


def test_sequential_container_behaviour():
    for lib in (kiln, torch):
        nn = lib.nn
        a, b, c = nn.ReLU(), nn.Tanh(), nn.Sigmoid()
        s = nn.Sequential(a, b, c)
        assert len(s) == 3 and s[0] is a and s[-1] is c and list(s) == [a, b, c]
        sl = s[1:]
        assert isinstance(sl, nn.Sequential) and list(sl._modules) == ["1", "2"]
        assert list(sl) == [b, c]
        s.append(nn.Identity())
        assert len(s) == 4
        del s[1]
        assert list(s._modules) == ["0", "1", "2"] and s[1] is c
        s.insert(1, b)
        assert s[1] is b and len(s) == 4
        s[0] = nn.ELU()
        assert isinstance(s[0], nn.ELU)
        s.extend([nn.ReLU()])
        assert len(s) == 5
        assert len(s + nn.Sequential(a)) == 6 and len(s * 2) == 10
        popped = s.pop(0)
        assert isinstance(popped, nn.ELU)
        named = nn.Sequential(OrderedDict([("conv", nn.Identity()), ("act", a)]))
        assert named.act is a and named[1] is a and list(named._modules) == ["conv", "act"]
        with pytest.raises(IndexError):
            s[10]
    x = kiln.tensor([-1.0, 0.5])
    s = kiln.nn.Sequential(kiln.nn.Identity(), kiln.nn.Identity())
    assert s(x) is x


def test_modulelist_moduledict_behaviour():
    for lib in (kiln, torch):
        nn = lib.nn
        ml = nn.ModuleList([nn.ReLU(), nn.Tanh()])
        ml.append(nn.Identity())
        ml.extend([nn.Sigmoid()])
        ml.insert(0, nn.ELU())
        ml += [nn.ReLU()]
        assert len(ml) == 6 and isinstance(ml[0], nn.ELU) and isinstance(ml[-1], nn.ReLU)
        assert isinstance(ml[1:3], nn.ModuleList) and len(ml[1:3]) == 2
        del ml[0]
        assert list(ml._modules) == [str(i) for i in range(5)]
        ml[0] = nn.Identity()
        assert isinstance(ml[0], nn.Identity)
        with pytest.raises(IndexError):
            ml[9]
        with pytest.raises(TypeError):
            ml.extend(3)
        md = nn.ModuleDict({"b": nn.ReLU(), "a": nn.Tanh()})
        assert list(md) == ["b", "a"] and list(md.keys()) == ["b", "a"]
        md["c"] = nn.Identity()
        assert "c" in md and len(md) == 3
        md.update([("d", nn.ReLU())])
        assert isinstance(md.pop("d"), nn.ReLU) and len(md) == 3
        del md["b"]
        assert list(md.keys()) == ["a", "c"]
        assert [type(v).__name__ for v in md.values()] == ["Tanh", "Identity"]
        md.clear()
        assert len(md) == 0


def test_parameterlist_parameterdict_behaviour():
    for lib in (kiln, torch):
        nn = lib.nn
        pl = nn.ParameterList([lib.zeros(2), nn.Parameter(lib.ones(3))])
        assert all(isinstance(p, nn.Parameter) for p in pl)  # tensors are wrapped
        pl.append(lib.zeros(1))
        assert len(pl) == 3 and tuple(pl[-1].shape) == (1,)
        assert len(pl[:2]) == 2
        assert [n for n, _ in pl.named_parameters()] == ["0", "1", "2"]
        with pytest.raises(RuntimeError):
            pl(1)
        pd = nn.ParameterDict({"b": lib.zeros(1), "a": lib.zeros(2)})  # a plain dict: sorted
        assert list(pd) == ["a", "b"]
        pd["c"] = nn.Parameter(lib.zeros(3))
        assert "c" in pd and len(pd) == 3 and pd.get("zz") is None
        assert [n for n, _ in pd.named_parameters()] == ["a", "b", "c"]
        assert isinstance(pd.pop("a"), nn.Parameter) and list(pd.keys()) == ["b", "c"]
        pd2 = pd | nn.ParameterDict({"z": lib.zeros(1)})
        assert list(pd2.keys()) == ["b", "c", "z"]
        assert pd.setdefault("q", lib.ones(1)) is pd["q"]
        with pytest.raises(TypeError):
            pd[1]
    k = kiln.nn.ParameterDict({"w": kiln.zeros(2)})
    t = torch.nn.ParameterDict({"w": torch.zeros(2)})
    assert _name(repr(k)) == _name(repr(t))


def test_buffers_persistent_and_deepcopy():
    k, _ = both()
    assert [n for n, _ in k.named_buffers(recurse=False)] == ["scale", "scratch"]
    c = copy.deepcopy(k)
    assert [n for n, _ in c.named_parameters()] == [n for n, _ in k.named_parameters()]
    assert c.stem[0].weight is not k.stem[0].weight
    assert isinstance(c.stem[0].weight, kiln.nn.Parameter)
    np.testing.assert_array_equal(c.stem[0].weight.detach().numpy(),
                                  k.stem[0].weight.detach().numpy())
    assert not np.shares_memory(c.scale.numpy(), k.scale.numpy())
    c.blocks[0].fc.weight.detach().numpy()[...] = 5
    assert not np.any(k.blocks[0].fc.weight.detach().numpy() == 5)


def test_missing_forward_and_bad_init_args():
    check_exception(lambda lib: lib.nn.Module()(1), match="forward")
    check_exception(lambda lib: lib.nn.Module(3))


# -- nn.utils -------------------------------------------------------------------------------------

def _params_with_grads(lib, dtype=np.float32):
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (5,), (2, 2, 2), ()]
    params = []
    for i, s in enumerate(shapes):
        p = lib.nn.Parameter(lib.tensor(np.zeros(s, dtype)))
        if i != 1:  # one parameter without a gradient: skipped, as in torch
            p.grad = lib.tensor(rng.normal(0, 2, s).astype(dtype))
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1, 3.5, 0.5, float("inf"), "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype):
    kp, tp = _params_with_grads(kiln, dtype), _params_with_grads(torch, dtype)
    kn = kiln.nn.utils.clip_grad_norm_(kp, max_norm, norm_type=norm_type)
    tn = torch.nn.utils.clip_grad_norm_(tp, max_norm, norm_type=norm_type)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert isinstance(kn, kiln.Tensor) and kn.ndim == 0 and kn.dtype.name == str(tn.dtype)[6:]
    np.testing.assert_allclose(kn.item(), tn.item(), rtol=tol)
    for k, t in zip(kp, tp, strict=True):
        assert (k.grad is None) == (t.grad is None)
        if k.grad is not None:
            np.testing.assert_allclose(k.grad.numpy(), t.grad.numpy(), rtol=tol, atol=tol)


def test_clip_grad_norm_edge_cases():
    p = kiln.nn.Parameter(kiln.zeros(2))
    p.grad = kiln.tensor([3.0, 4.0])
    g = p.grad
    assert kiln.nn.utils.clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)  # a lone tensor
    assert p.grad is g  # scaled in place
    np.testing.assert_allclose(g.numpy(), [0.6, 0.8], rtol=1e-5)
    empty = kiln.nn.utils.clip_grad_norm_([], 1.0)
    assert empty.item() == 0.0 and empty.dtype == kiln.float32
    with pytest.warns(UserWarning, match="empty generator"):
        kiln.nn.utils.clip_grad_norm_((q for q in []), 1.0)
    p.grad = kiln.tensor([float("inf"), 1.0])
    check_exception(lambda lib: lib.nn.utils.clip_grad_norm_(
        _inf_param(lib), 1.0, error_if_nonfinite=True), match="non-finite")
    kiln.nn.utils.clip_grad_norm_([p], 1.0)  # no error by default


def _inf_param(lib):
    p = lib.nn.Parameter(lib.zeros(2))
    p.grad = lib.tensor([float("inf"), 1.0])
    return [p]


def test_clip_grad_value_and_vector_conversion_match_torch():
    kp, tp = _params_with_grads(kiln), _params_with_grads(torch)
    kiln.nn.utils.clip_grad_value_(kp, 1.5)
    torch.nn.utils.clip_grad_value_(tp, 1.5)
    for k, t in zip(kp, tp, strict=True):
        if t.grad is not None:
            np.testing.assert_array_equal(k.grad.numpy(), t.grad.numpy())
    km = kiln.nn.Sequential(kiln.nn.Linear(3, 2), kiln.nn.Linear(2, 1))
    tm = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    km.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    kv = kiln.nn.utils.parameters_to_vector(km.parameters())
    tv = torch.nn.utils.parameters_to_vector(tm.parameters())
    np.testing.assert_array_equal(kv.detach().numpy(), tv.detach().numpy())
    assert kv.requires_grad
    (kv * kiln.arange(kv.numel(), dtype=kiln.float32)).sum().backward()
    assert km[1].bias.grad.item() == kv.numel() - 1
    new = np.arange(kv.numel(), dtype=np.float32)
    kiln.nn.utils.vector_to_parameters(kiln.tensor(new), km.parameters())
    torch.nn.utils.vector_to_parameters(torch.tensor(new), tm.parameters())
    for (n, a), (_, b) in zip(km.named_parameters(), tm.named_parameters(), strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy(), err_msg=n)
    assert isinstance(km[0].weight, kiln.nn.Parameter)
    check_exception(lambda lib: lib.nn.utils.vector_to_parameters([1.0], []), match="expected")


def test_state_dict_with_batchnorm_matches_torch():
    make = lambda lib: lib.nn.Sequential(lib.nn.Conv2d(1, 2, 3), lib.nn.BatchNorm2d(2))  # noqa
    k, t = make(kiln), make(torch)
    assert list(k.state_dict()) == list(t.state_dict())
    assert "1.num_batches_tracked" in k.state_dict()
    t[1].running_mean.fill_(0.5)
    t[1].num_batches_tracked.fill_(3)
    k.load_state_dict({n: v.numpy() for n, v in t.state_dict().items()})
    assert k[1].num_batches_tracked.item() == 3
    np.testing.assert_array_equal(k[1].running_mean.numpy(), [0.5, 0.5])
    assert _name(repr(k)) == _name(repr(t))
