"""Synthetic dataset generators; importing this package registers every generator."""

from pipeline.data.generators import icu, images, tracks  # noqa: F401
