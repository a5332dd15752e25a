"""Kiln operations: each module defines its primitives and the public ops built on them."""

from kiln.ops import elementwise, reduce, shape
from kiln.ops import index
from kiln.ops import linalg, conv
from kiln.tensor import install_methods

MODULES = (elementwise, reduce, shape, index, linalg, conv)

for _m in MODULES:
    install_methods(_m.TENSOR_METHODS)
