"""Backbone families; importing this package registers every family."""

from pipeline.backbones import generic  # noqa: F401  (class_path backbones; registered as "generic")
