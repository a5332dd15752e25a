"""Every registered primitive has a backward rule (or says why not) and was checked against
PyTorch by the op tests of this session."""

import os

import pytest

from kiln.ops.registry import REGISTRY
from tests.conftest import COLLECTED_OP_MODULES
from tests.helpers import FORWARD_CHECKED, GRAD_CHECKED

OPS_DIR = os.path.join(os.path.dirname(__file__), "ops")


def test_every_primitive_has_a_backward_rule_or_a_reason():
    missing = [n for n, p in REGISTRY.items() if p.vjp is None and not p.no_grad_reason]
    assert not missing, f"primitives with no VJP and no 'not differentiable' mark: {missing}"


@pytest.mark.runs_last
def test_every_primitive_was_checked_against_torch():
    modules = {f for f in os.listdir(OPS_DIR) if f.startswith("test_") and f.endswith(".py")}
    if not modules <= COLLECTED_OP_MODULES:
        pytest.skip("runs only together with the whole tests/ops suite")
    unchecked = sorted(set(REGISTRY) - FORWARD_CHECKED)
    assert not unchecked, f"primitives no op test compared with PyTorch: {unchecked}"
    no_grad_check = sorted(n for n, p in REGISTRY.items() if p.vjp and n not in GRAD_CHECKED)
    assert not no_grad_check, f"primitives whose gradient no test checked: {no_grad_check}"
