"""Backbone families; importing this package registers every family."""

from pipeline.backbones import generic  # noqa: F401  (class_path backbones; registered as "generic")
from pipeline.backbones import setvae  # noqa: F401
from pipeline.backbones import vit  # noqa: F401
from pipeline.backbones import maskformer  # noqa: F401
