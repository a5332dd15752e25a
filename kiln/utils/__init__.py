"""Utilities with PyTorch's layout: ``kiln.utils.data`` (datasets, samplers, DataLoader)."""

from kiln.utils import data

__all__ = ["data"]
