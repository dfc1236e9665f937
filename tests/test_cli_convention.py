"""One CLI convention: every command takes --json and prints one JSON object; every option has help text;
required options are marked; listings say where they looked."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from cache_fixtures import synthetic_cache
from click.testing import CliRunner

from cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, prefix + (name,))
        else:
            out.append((prefix + (name,), cmd))
    return out


COMMANDS = _commands(main)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_json_and_every_option_help(path, cmd):
    opts = [p for p in cmd.params if isinstance(p, click.Option)]
    assert any("--json" in o.opts for o in opts), f"{' '.join(path)} has no --json"
    assert [o.opts for o in opts if not o.help] == [], f"{' '.join(path)}: options without help text"
    text = CliRunner().invoke(main, [*path, "--help"], terminal_width=200).output
    for o in opts:
        if o.required:
            line = next(line for line in text.splitlines() if o.opts[-1] in line)
            rest = text.split(line, 1)[1].split("\n  -", 1)[0]
            assert "[required]" in line + rest, f"{o.opts} is required but not marked"
        if isinstance(o.default, (int, float, str)) and not isinstance(o.default, bool) and not o.multiple:
            assert f"default: {o.default}]" in " ".join(text.split()), f"{o.opts}: default not shown"


def test_train_head_help_says_when_arch_is_required():
    text = CliRunner().invoke(main, ["train-head", "--help"], terminal_width=200).output
    assert "required unless the --config YAML names it" in " ".join(text.split())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv-caches")
    return root, synthetic_cache(root, task="classify", n=60, seed=3)


def _obj(args: list[str]) -> dict:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert isinstance(out, dict), f"{args}: not one JSON object"
    return out


def test_json_of_cheap_commands_parses(cache, tmp_path):
    root, path = cache
    ls = _obj(["cache", "ls", "--cache-root", str(root), "--json"])
    assert ls["root"] == str(root) and ls["caches"][0]["path"] == str(path)
    key = ls["caches"][0]["key"]
    assert _obj(["cache", "info", key[:8], "--cache-root", str(root), "--json"])["key"] == key
    assert _obj(["cache", "verify", key[:8], "--cache-root", str(root), "--json"]) == \
        {"ref": key[:8], "ok": True, "problems": []}
    heads = _obj(["list", "heads", "--json"])["heads"]
    lgbm = next(h for h in heads if h["name"] == "lightgbm")
    assert lgbm["trainer"] is False and lgbm["params"]["num_leaves"] == 31 and lgbm["tasks"] == ["classify", "regress"]
    mlp2 = next(h for h in heads if h["name"] == "mlp2")
    assert mlp2["trainer"] is True and mlp2["inputs"].startswith("pooled/mean") and "dropout" in mlp2["params"]
    from pipeline.config import TrainConfig  # the listed lr is the one a run without --lr gets

    assert mlp2["lr"] == TrainConfig(arch="mlp2").lr and lgbm["lr"] is None
    assert "maskformer" in _obj(["list", "backbones", "--json"])["backbones"]
    made = _obj(["make-data", "tracks", "--out", str(tmp_path / "t.parquet"), "--n", "20", "--json"])
    assert Path(made["path"]).is_file()
    assert _obj(["cache", "rm", key[:8], "--cache-root", str(root), "--json"]) == {"removed": str(path)}


def test_list_heads_shows_inputs_tasks_and_param_defaults():
    text = CliRunner().invoke(main, ["list", "heads"], terminal_width=200).output
    line = next(line for line in text.splitlines() if line.startswith("weighted-pool"))
    assert "regress per object" in line and "objects/embed, hits/features" in line and "hidden=144" in line
    assert "no (fits itself)" in next(line for line in text.splitlines() if line.startswith("lightgbm"))
