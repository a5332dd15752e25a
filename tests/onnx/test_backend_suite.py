"""The ONNX backend test suite (shipped with the onnx package) run against Kiln.

Every node test of the operators in ``kiln.onnx.coverage.CLAIMED`` runs and must pass, with the
model tests of the simple / pytorch-operator / pytorch-converted sets made only of claimed ops.
The "real" model tests (which download models) are not run.
"""

import re
import warnings

import pytest

pytest.importorskip("onnx")

import onnx.backend.test  # noqa: E402

from kiln.onnx.backend import KilnBackend  # noqa: E402
from kiln.onnx.coverage import (  # noqa: E402
    CLAIMED,
    RUNNER_BUGS,
    node_tests,
    run_case,
    suite_tests,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the onnx test-case generators warn about their own data
    _names = suite_tests()
    _backend_test = onnx.backend.test.BackendTest(KilnBackend, __name__)
    _backend_test.include("^(" + "|".join(re.escape(n) for n in _names) + ")_cpu$")
    globals().update(_backend_test.test_cases)


@pytest.mark.parametrize("name", sorted(RUNNER_BUGS))
def test_node_tests_the_onnx_runner_cannot_compare(name):
    (case,) = [c for n, op, c in node_tests() if n == name and op in CLAIMED]
    run_case(case)


def test_every_claimed_op_has_node_tests():
    ops = {op for _, op, _ in node_tests()}
    assert set(CLAIMED) <= ops, sorted(set(CLAIMED) - ops)
    assert len(_names) > 500
