"""Pneumonia chest X-ray training system."""

__version__ = "0.1.0"  # the one home of the version: pyproject.toml reads it
