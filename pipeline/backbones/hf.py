"""A ``class_path`` backbone whose checkpoint is a Hugging Face model folder (see pipeline/extract/hf.py).

A ``transformers`` class is built from the folder's ``config.json`` with no wrapper and no
``init_args``; loading mirrors ``from_pretrained``'s own exceptions (prefix, ignored keys), strictly,
and reports what it dropped. Any other class is the ordinary generic backbone, its init_args taken
from ``config.json`` keys its constructor accepts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.backbones.generic import GenericBackbone, build_generic, import_class, model_input_keys
from pipeline.config import BackboneConfig


def build_from_folder(config: BackboneConfig, *, checkpoint: Any, plan: Any, input_keys: list[str] | None = None,
                      config_dir: Path | None = None) -> GenericBackbone:
    from pipeline.extract import hf

    search = tuple(d for d in (config_dir, Path.cwd()) if d is not None)
    cls = import_class(str(config.class_path), search_dirs=search)
    if not hf.is_transformers_class(cls):  # an ordinary class_path module, its init_args from config.json keys
        return build_generic(config, hparams=checkpoint.hyper_parameters, plan=plan, input_keys=input_keys,
                             config_dir=config_dir)
    init_args = dict(config.init_args)
    module = hf.build_module(cls, folder=Path(checkpoint.path), init_args=init_args)
    backbone = GenericBackbone(module=module, config=config, input_keys=model_input_keys(plan, input_keys),
                               init_args=init_args)
    strip, drop = hf.loading_rules(module, list(checkpoint.state_dict))
    backbone.rules = dataclasses.replace(backbone.rules, strip_prefixes=backbone.rules.strip_prefixes + strip,
                                         drop_patterns=backbone.rules.drop_patterns + drop)
    return backbone
