"""Kiln operations: each module defines its primitives and the public ops built on them."""

from kiln.ops import elementwise, reduce, shape
from kiln.tensor import install_methods

MODULES = (elementwise, reduce, shape)

for _m in MODULES:
    install_methods(_m.TENSOR_METHODS)
