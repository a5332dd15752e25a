"""Gaps found auditing issue #2 (eager core) against PyTorch 2.13, each pinned by a test."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception


# -- kiln.normal: PyTorch's errors --------------------------------------------------------------
def test_normal_with_non_broadcasting_mean_and_std_is_a_runtime_error():
    e = check_exception(lambda lib: lib.normal(lib.zeros(2), lib.ones(3)), match="normal")
    assert "[2]" in str(e) and "[3]" in str(e)


def test_normal_with_float_mean_and_std_needs_a_size():
    check_exception(lambda lib: lib.normal(0.0, 1.0), match="size")
    assert kiln.normal(0.0, 1.0, (2, 3)).shape == (2, 3)
    assert kiln.normal(2.0, kiln.ones(3)).shape == (3,)


# -- Tensor.device, stride(), new_* --------------------------------------------------------------
def test_device_is_a_device_object_that_compares_to_cpu():
    x = kiln.ones(2)
    t = torch.ones(2)
    assert x.device.type == t.device.type == "cpu"
    assert str(x.device) == str(t.device)
    assert x.device == "cpu"
    assert repr(kiln.device("cpu")) == repr(torch.device("cpu"))
    assert kiln.zeros(2, device=x.device).shape == (2,)
    assert x.to(x.device) is not None


@pytest.mark.parametrize("make", [
    lambda lib: lib.ones(2, 3), lambda lib: lib.ones(2, 3).T, lambda lib: lib.ones(4, 5)[:, 1:3],
    lambda lib: lib.ones(3, 1).expand(3, 4), lambda lib: lib.tensor(1.0),
    lambda lib: lib.ones(2, 3, 4).permute(2, 0, 1),
])
def test_stride_matches_pytorch(make):
    assert make(kiln).stride() == make(torch).stride()
    assert make(kiln).stride(-1) == make(torch).stride(-1) if make(kiln).ndim else True


@pytest.mark.parametrize("fn", [
    lambda x, lib: x.new_zeros(2, 3), lambda x, lib: x.new_zeros((2,)),
    lambda x, lib: x.new_ones(3), lambda x, lib: x.new_full((2,), 7),
    lambda x, lib: x.new_tensor([1, 2]), lambda x, lib: x.new_empty(2).zero_(),
    lambda x, lib: x.new_zeros(2, dtype=lib.int64),
])
@pytest.mark.parametrize("dt", ["float64", "int32"])
def test_new_factories_take_the_tensor_dtype(fn, dt):
    k = fn(kiln.ones(1, dtype=getattr(kiln, dt)), kiln)
    t = fn(torch.ones(1, dtype=getattr(torch, dt)), torch)
    assert str(k.dtype).split(".")[-1] == str(t.dtype).split(".")[-1]
    np.testing.assert_array_equal(k.numpy(), t.numpy())


# -- silent inf/nan arithmetic, as PyTorch ----------------------------------------------------
def test_reductions_and_matmul_of_inf_do_not_warn():
    # a fresh interpreter: pytest's own warning filters would hide the numpy warnings
    code = ("import kiln\n"
            "s = kiln.tensor([float('inf'), -float('inf')]).sum()\n"
            "m = kiln.tensor([[1e38, 1e38]]) @ kiln.tensor([[1e38], [1e38]])\n"
            "p = kiln.nn.Parameter(kiln.ones(2)); p.grad = kiln.tensor([float('nan'), 1.0])\n"
            "kiln.nn.utils.clip_grad_norm_([p], 1.0)\n"
            "print(s.item(), m.item())\n")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                       text=True, check=True)
    assert "Warning" not in r.stderr, r.stderr
    assert r.stdout.split() == ["nan", "inf"]


# -- messages name kiln, not torch -------------------------------------------------------------
def test_error_messages_name_kiln_ops():
    with pytest.raises(RuntimeError, match=r"^kiln\.clamp"):
        kiln.clamp(kiln.ones(2))
    with pytest.raises(RuntimeError, match=r"^kiln\.hsplit"):
        kiln.hsplit(kiln.ones(()), 1)


# -- basic indexing with an Ellipsis (the fast parser) and basic-slice views ------------------
@pytest.mark.parametrize("key", [
    (None, Ellipsis, 2), (Ellipsis,), (Ellipsis, None), (1, Ellipsis), (Ellipsis, 1, 2),
    (0, Ellipsis, 1, 2), (None, 0, Ellipsis, None, slice(1, 3)), (Ellipsis, -1),
    (None, None, Ellipsis, None, None), (slice(None, None, 2), Ellipsis, slice(1, None, 3)),
])
def test_getitem_with_ellipsis_matches_pytorch(key):
    from tests.helpers import check_op, randn

    check_op(lambda lib, x: x[key], [randn(3, 4, 5)], atol=0, rtol=0)
    check_op(lambda lib, x: x[key], [randn(3, 4, 5, dtype=np.float64)], atol=0, rtol=0)


@pytest.mark.parametrize("key", [(Ellipsis, 0, 0, 0, 0), (Ellipsis, 5), (slice(None),) * 3 + (
    Ellipsis, slice(None))])
def test_getitem_with_ellipsis_errors_match_pytorch(key):
    check_exception(lambda lib: lib.ones(3, 4, 5)[key])


def test_basic_slices_are_views_sharing_storage_and_version():
    x = kiln.arange(24.0).reshape(2, 3, 4)
    for v in (x[None, ..., 2], x.narrow(2, 1, 2), x.unbind(1)[0], x.chunk(2, -1)[1],
              x.split([1, 2], 1)[1]):
        assert np.shares_memory(v.numpy(), x.numpy())
        before = x._version[0]
        v.add_(1.0)
        assert x._version[0] == before + 1


def test_unbind_and_split_gradients_match_pytorch():
    from tests.helpers import check_op, randn

    check_op(lambda lib, x: lib.stack([t * (i + 1) for i, t in enumerate(x.unbind(1))]),
             [randn(2, 3, 4)], atol=1e-6, rtol=1e-6)
    check_op(lambda lib, x: lib.cat([t * (i + 1) for i, t in enumerate(x.split([1, 3], -1))], -1),
             [randn(2, 3, 4, dtype=np.float64)], atol=1e-12, rtol=1e-12)


# -- factory and one_hot argument errors: PyTorch's classes ----------------------------------
@pytest.mark.parametrize("fn", [
    lambda lib: lib.randperm(-1),
    lambda lib: lib.arange(0, float("inf")),
    lambda lib: lib.arange(0, float("nan")),
    lambda lib: lib.tensor(None),
    lambda lib: lib.tensor([None, 1]),
    lambda lib: lib.tensor(["a", "b"]),
    lambda lib: lib.nn.functional.one_hot(lib.tensor([1]), 2.5),
])
def test_bad_factory_arguments_raise_pytorchs_exception_class(fn):
    check_exception(fn)
