"""Thin entry points, one per worker role: ``python -m workers.<role>``."""
