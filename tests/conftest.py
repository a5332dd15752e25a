"""Shared fixtures: seeded randomness and, under tests/ops, a check of every primitive's
shape rule against what its impl really produced."""

import numpy as np
import pytest

import kiln
from kiln.dispatch import OBSERVERS

COLLECTED_OP_MODULES: set = set()


def _check_infer(prim, inputs, attrs, out):
    shapes = [t._data.shape for t in inputs]
    dts = [t._data.dtype for t in inputs]
    shape, dt = prim.infer(shapes, dts, **attrs)
    assert tuple(shape) == out._data.shape and np.dtype(dt) == out._data.dtype, (
        f"{prim.name}: infer gave {shape} {dt}, impl gave {out._data.shape} {out._data.dtype}"
    )


@pytest.fixture(autouse=True)
def _seed():
    kiln.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _infer_check(request):
    if "tests/ops/" not in str(request.fspath).replace("\\", "/"):
        yield
        return
    OBSERVERS.append(_check_infer)
    try:
        yield
    finally:
        OBSERVERS.remove(_check_infer)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "/tests/ops/" in path:
            COLLECTED_OP_MODULES.add(path.rsplit("/", 1)[-1])
    last = [i for i in items if i.get_closest_marker("runs_last")]
    items[:] = [i for i in items if not i.get_closest_marker("runs_last")] + last


def pytest_configure(config):
    config.addinivalue_line("markers", "runs_last: run after every other test")
