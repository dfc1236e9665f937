"""A built-in family's code version is part of the cache key: changed outputs never reuse an old cache."""

from __future__ import annotations

import dataclasses

from cache.key import make_key
from pipeline import config as cfg
from pipeline.extract.run import key_record
from pipeline.registry import BACKBONES


def _key() -> str:
    config = cfg.build(cfg.ExtractConfig, {"backbone": {"name": "maskformer"}, "data": {"path": "x.parquet"}})
    return make_key(key_record(config=config, checkpoint_digest="c" * 64, data_fingerprint="d" * 64))


def test_family_version_changes_the_key(monkeypatch):
    import pipeline.backbones.maskformer as module

    family = BACKBONES.get("maskformer")
    assert family.version == module.FAMILY_VERSION  # the record carries the file's constant
    before = _key()
    assert _key() == before  # stable
    # the record is frozen: a family bumps its version by editing FAMILY_VERSION, which builds a new record
    monkeypatch.setitem(BACKBONES._entries, "maskformer", dataclasses.replace(family, version=family.version + 1))
    assert _key() != before


def test_class_path_backbones_have_no_family_version():
    config = cfg.build(cfg.ExtractConfig, {"backbone": {"class_path": "m.Net", "taps": {"pooled/x": "enc"}},
                                           "data": {"path": "x.npz"}})
    assert key_record(config=config, checkpoint_digest="c" * 64, data_fingerprint="d" * 64)["family_version"] is None
