"""Graph mode: the IR, capture by tracing, optimization passes and ``kiln.compile``."""
