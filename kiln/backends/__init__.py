"""Executors for graphs: the reference interpreter (the oracle) and the generated-code executor."""
