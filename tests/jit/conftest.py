"""tests/jit compile kernels for hundreds of shapes: lift the per-shape kernel budget here, so
that every test runs the native path it means to check (tests of the budget set their own)."""

import pytest


@pytest.fixture(autouse=True)
def _unlimited_shape_kernels(monkeypatch):
    try:
        from kiln.jit import engine
    except ImportError:  # no llvmlite: the tests skip themselves
        return
    monkeypatch.setattr(engine, "SHAPE_KERNELS", 1 << 30)


@pytest.fixture
def jit_on(monkeypatch):
    """Native kernels on (skip when kiln.jit cannot run here), whatever KILN_JIT says."""
    import kiln.jit

    if not kiln.jit.available():
        pytest.skip("kiln.jit is off")
    monkeypatch.setattr(kiln.jit, "_available", True)
