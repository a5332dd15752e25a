"""Keep freed array memory in the process instead of returning it to the OS after every step.

glibc's malloc adapts its mmap and trim thresholds as a program runs; with a training step's
mix of array sizes it keeps handing megabytes back to the kernel and faulting them in again
(13,000 page faults and about a quarter of the time of an eager gpt step).  Fixing both
thresholds keeps the pages, as PyTorch's and TensorFlow's caching allocators do: arrays up to
32 MB come from the heap, and up to 256 MB of free heap stay mapped.  The peak resident size of
a step does not change; only its repetition does.  ``KILN_MALLOC=system`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20


def tune() -> bool:
    """Set the thresholds once; True when they were set (glibc on Linux, not opted out)."""
    if os.environ.get("KILN_MALLOC", "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


TUNED = tune()
