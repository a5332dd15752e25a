"""kiln._malloc: glibc's thresholds are fixed at import unless KILN_MALLOC=system."""

import os
import platform
import subprocess
import sys

import pytest

_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _tuned(env_value):
    env = dict(os.environ)
    env.pop("KILN_MALLOC", None)
    if env_value is not None:
        env["KILN_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", "import kiln._malloc as m; print(m.TUNED)"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
def test_thresholds_set_on_import_and_opt_out():
    assert _tuned(None) == "True"
    assert _tuned("system") == "False"


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
def test_repeated_large_arrays_do_not_fault_pages_back_in():
    code = (
        "import resource, numpy as np, kiln\n"
        "def step():\n"
        "    a = [np.ones(2_500_000, np.float32) for _ in range(4)]\n"
        "    del a\n"
        "for _ in range(3): step()\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    env = {k: v for k, v in os.environ.items() if k != "KILN_MALLOC"}
    faults = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout)
    env["KILN_MALLOC"] = "system"
    system = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout)
    assert faults < system / 10, (faults, system)
