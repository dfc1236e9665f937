"""Backbone families; importing this package registers every family."""

from pipeline.backbones import (
    generic,  # noqa: F401  (class_path backbones; registered as "generic")
    maskformer,  # noqa: F401
    setvae,  # noqa: F401
    vit,  # noqa: F401
)
