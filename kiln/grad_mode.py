"""Global autograd switches: no_grad, enable_grad, set_grad_enabled, inference_mode."""

from __future__ import annotations

import functools
import threading


class _State(threading.local):
    """Per thread, as PyTorch's grad mode: a server thread's ``no_grad`` does not switch off
    the training thread's autograd.  A new thread starts with gradients enabled."""

    def __init__(self):
        self.grad_enabled = True
        self.tracer = None  # the active kiln.graph.capture.Tracer while kiln.compile traces


STATE = _State()


def is_grad_enabled() -> bool:
    """True when operations record the autograd graph."""
    return STATE.grad_enabled


class _GradSwitch:
    """Base for context managers that also work as function decorators."""

    mode = True

    def __enter__(self):
        self._prev = STATE.grad_enabled
        STATE.grad_enabled = self.mode

    def __exit__(self, *exc):
        STATE.grad_enabled = self._prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.__class__():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradSwitch):  # noqa: N801 - PyTorch name
    """Context manager (or decorator) in which no autograd graph is recorded.

    >>> import kiln
    >>> x = kiln.ones(2, requires_grad=True)
    >>> with kiln.no_grad():
    ...     (x * 2).requires_grad
    False
    """

    mode = False


class enable_grad(_GradSwitch):  # noqa: N801
    """Context manager (or decorator) that turns graph recording back on."""

    mode = True


class inference_mode(no_grad):  # noqa: N801
    """Same as ``no_grad`` in Kiln (kept for PyTorch compatibility)."""

    def __init__(self, mode: bool = True):
        self.mode = not mode

    def __call__(self, fn):
        if not callable(fn):
            raise TypeError("inference_mode() used as a decorator takes a function")
        return super().__call__(fn)


class set_grad_enabled:  # noqa: N801
    """Turn recording on or off: as a function call, or as a context manager that restores it."""

    def __init__(self, mode: bool):
        self._prev = STATE.grad_enabled
        STATE.grad_enabled = bool(mode)

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        STATE.grad_enabled = self._prev
        return False
