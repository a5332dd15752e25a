"""Collection rules for the whole repository (tests/ and the doctests under kiln/)."""

import importlib.util

# kiln.onnx's backend imports onnx at module level: without the optional extra, don't collect it
collect_ignore = [] if importlib.util.find_spec("onnx") else ["kiln/onnx/backend.py"]
