"""Synthetic dataset generators; importing this package registers every generator."""

from pipeline.data.generators import tracks  # noqa: F401
