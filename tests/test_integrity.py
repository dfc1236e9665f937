"""Issue 12: nothing is trained on data that is not there; every mistake a user can fix is one line and exit 2.

Each case asserts the exit code, the single stderr line, and that no cache was completed / no results row added.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import extract_fixtures as fx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache.reader import open_cache
from cache.writer import read_meta
from cli import main
from pipeline import config as cfg
from pipeline.extract.run import run_extract

UNIT_ROWS = 8  # 40 samples -> 5 units of 8 rows; chunk file c/<i>/0 of a dense array is unit i


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _rows(runs: Path) -> list[Path]:
    return sorted((runs / "results").glob("*.parquet")) if (runs / "results").exists() else []


@pytest.fixture()
def made(tmp_path):
    data = fx.make_data(tmp_path / "data.npz")
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "extract.yaml", data=data)
    return data, ckpt, config


def _extract_in_process(config: Path, ckpt: Path, root: Path, **kw):
    conf = cfg.load(cfg.ExtractConfig, yaml_path=config)
    return run_extract(config=conf, checkpoint=ckpt, cache_root=root, progress=False, unit_rows=UNIT_ROWS,
                       config_dir=config.parent, **kw)


@pytest.fixture()
def cache(tmp_path, made):
    data, ckpt, config = made
    res = _extract_in_process(config, ckpt, tmp_path / "cache")
    assert res.status == "complete"
    return res, ckpt, config


def _train(tmp_path: Path, store: Path, *extra: str):
    return _cli("train-head", "--cache", store, "--arch", "linear", "--set", "features=pooled/mean",
                "--runs-dir", tmp_path / "runs", "--device", "cpu", *extra)


# ---------------------------------------------------------------- integrity on every read


def test_missing_chunk_is_an_error_naming_unit_and_array_then_extract_repairs_only_that_unit(tmp_path, cache):
    res, ckpt, config = cache
    (res.path / "pooled/mean/c/1/0").unlink()
    line = _one_line(_train(tmp_path, res.path))
    assert "unit 1 (samples 8-15)" in line and "pooled/mean" in line and "is missing" in line, line
    assert _rows(tmp_path / "runs") == []

    verify = _cli("cache", "verify", res.path)
    assert verify.exit_code == 1 and "pooled/mean chunk file pooled/mean/c/1/0 is missing" in verify.stdout

    again = _extract_in_process(config, ckpt, tmp_path / "cache")
    assert not again.reused and again.status == "complete" and again.samples_run == UNIT_ROWS  # that unit only
    clean = _extract_in_process(config, ckpt, tmp_path / "clean")
    np.testing.assert_array_equal(open_cache(again.path).load_numpy("pooled/mean"),
                                  open_cache(clean.path).load_numpy("pooled/mean"))
    assert _train(tmp_path, res.path).exit_code == 0 and len(_rows(tmp_path / "runs")) == 1


def test_wrong_size_chunk_is_an_error(tmp_path, cache):
    res, _, _ = cache
    chunk = res.path / "objects/seq/c/3/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    r = open_cache(res.path)
    with pytest.raises(Exception) as err:
        r.load_numpy("objects/seq")
    assert "unit 3 (samples 24-31)" in str(err.value) and "objects/seq" in str(err.value) and "bytes, not" in str(err.value)


def test_flipped_byte_fails_the_checksum_on_load_and_extract_verify_repairs_it(tmp_path, cache):
    res, ckpt, config = cache
    chunk = res.path / "pooled/mean/c/2/0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 1  # the lowest mantissa bit of one float16: still finite, silently wrong
    chunk.write_bytes(bytes(raw))
    line = _one_line(_train(tmp_path, res.path))
    assert "unit 2 (samples 16-23)" in line and "pooled/mean does not match its checksum" in line, line
    assert _rows(tmp_path / "runs") == []
    # the opt-out skips only the checksums
    assert _train(tmp_path, res.path, "--trust-cache").exit_code == 0

    cheap = _extract_in_process(config, ckpt, tmp_path / "cache")
    assert cheap.reused  # no data read without --verify: the cheap check cannot see a flipped bit
    out = _cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "cache", "--verify")
    assert out.exit_code == 0 and "extracted" in out.stdout and "reused" not in out.stdout, out.output
    assert open_cache(res.path).load_numpy("pooled/mean").shape == (40, 16)  # checksums hold again


# ---------------------------------------------------------------- non-finite backbone outputs


def test_nan_backbone_output_is_refused_naming_samples_and_tap_or_masked(tmp_path):
    data = tmp_path / "data.npz"
    fx.make_data(data)
    arrays = dict(np.load(data))
    arrays["x"][5, 2, 0] = np.nan
    arrays["sample_id"] = np.arange(100, 140)
    np.savez(data, **arrays)
    ckpt, _ = fx.lightning_checkpoint(tmp_path / "model.ckpt")
    config = fx.write_config(tmp_path / "extract.yaml", data=data)
    config.write_text(config.read_text().replace("  split: split\n", "  split: split\n  sample_id: sample_id\n"))
    root = tmp_path / "cache"
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", root))
    assert "NaN/inf in pooled/mean for 1 sample(s) (sample_id 105)" in line and "--nonfinite mask" in line, line
    assert "complete" not in fx.store_statuses(root)

    out = _cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "masked",
               "--nonfinite", "mask")
    assert out.exit_code == 0, out.output
    store = next((tmp_path / "masked").glob("*.zarr"))
    r = open_cache(store)
    assert r.split_codes[5] == 255 and read_meta(store).extra["masked_samples"] == [105]
    assert np.isfinite(r.load_numpy("pooled/mean")).all() and 5 not in set(r.rows("train")) | set(r.rows("val"))
    assert _cli("train-head", "--cache", store, "--arch", "linear", "--set", "features=pooled/mean",
                "--runs-dir", tmp_path / "runs", "--device", "cpu").exit_code == 0


# ---------------------------------------------------------------- one line for every mistake


def _user_module(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return tmp_path


def _module_config(tmp_path: Path, class_path: str, *, init_args: str = "{}") -> Path:
    data = fx.make_data(tmp_path / "data.npz")
    return fx.write_config(tmp_path / "extract.yaml", data=data, class_path=class_path, init_args=init_args)


def test_class_path_module_importing_a_missing_package_is_one_line(tmp_path, made):
    _, ckpt, _ = made
    _user_module(tmp_path, "needs_pkg_i12", "import not_a_real_package_i12\n")
    config = _module_config(tmp_path, "needs_pkg_i12.Net")
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "cache"))
    assert "backbone.class_path 'needs_pkg_i12.Net': importing module 'needs_pkg_i12' failed" in line
    assert "No module named 'not_a_real_package_i12'" in line and "pip install not_a_real_package_i12" in line
    assert fx.store_statuses(tmp_path / "cache") == []
    verbose = CliRunner().invoke(main, ["-v", "extract", "--checkpoint", str(ckpt), "--config", str(config),
                                        "--cache-root", str(tmp_path / "cache")])
    assert verbose.exit_code == 2 and "Traceback" in verbose.stderr  # the traceback only under -v


def test_any_exception_from_a_users_constructor_is_one_line(tmp_path, made):
    _, ckpt, _ = made
    _user_module(tmp_path, "strict_i12", """
        from dataclasses import dataclass
        import extract_fixtures

        class StrictError(Exception):
            pass

        class Net(extract_fixtures.TinyNet):
            def __init__(self, dim: int = 16, eps: float = 1e-5):
                if not isinstance(eps, float):
                    raise StrictError(f"eps must be a float, got {type(eps).__name__}\\nsecond line of detail")
                super().__init__(dim=dim)
    """)
    config = _module_config(tmp_path, "strict_i12.Net", init_args="{eps: [1]}")
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "cache"))
    assert "backbone.class_path 'strict_i12.Net': Net(dim=..., eps=...) failed: StrictError: eps must be a float" in line
    # YAML 1.2 floats and init_args coerced to the annotation: 1e-12 and '1e-12' both arrive as floats
    for value in ("1e-12", "'1e-12'"):
        config = _module_config(tmp_path, "strict_i12.Net", init_args=f"{{eps: {value}}}")
        out = _cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "ok")
        assert out.exit_code == 0, out.output


def test_corrupt_npz_is_one_line(tmp_path, made):
    data, ckpt, config = made
    raw = bytearray(data.read_bytes())
    x = np.load(data)["x"]
    at = bytes(raw).find(x.tobytes()[:64])
    assert at > 0
    raw[at + 100] ^= 0xFF  # bad CRC-32 of x.npy
    data.write_bytes(bytes(raw))
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "cache"))
    assert "array 'x' cannot be read, the file is corrupted (BadZipFile: Bad CRC-32" in line, line
    assert "complete" not in fx.store_statuses(tmp_path / "cache")


@pytest.mark.parametrize("sets", [["--arch", "mlp2", "--set", "dropout=abc"], ["--arch", "mlp", "--set", "hidden=abc"]])
def test_bad_head_param_values_are_one_line(tmp_path, cache, sets):
    res, _, _ = cache
    line = _one_line(_cli("train-head", "--cache", res.path, *sets, "--set", "features=pooled/mean",
                          "--runs-dir", tmp_path / "runs", "--device", "cpu", "--epochs", "1"))
    assert "abc" in line, line
    assert _rows(tmp_path / "runs") == []


def test_unwritable_cache_root_and_runs_dir_fail_before_any_work(tmp_path, made, cache):
    data, ckpt, config = made
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", blocker / "cache"))
    assert line.startswith(f"error: cache root {blocker / 'cache'} is not writable") and "--cache-root" in line
    res, _, _ = cache
    line = _one_line(_train(tmp_path, res.path, "--runs-dir", blocker / "runs"))
    assert line.startswith(f"error: runs dir {blocker / 'runs'} is not writable") and "--runs-dir" in line
    line = _one_line(_cli("sweep", "--cache", res.path, "--arch", "linear", "--set", "features=pooled/mean",
                          "--runs-dir", blocker / "runs", "--device", "cpu"))
    assert "runs dir" in line and "is not writable" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_runs_dir_fails_before_training(tmp_path, cache):
    res, _, _ = cache
    runs = tmp_path / "ro"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        line = _one_line(_train(tmp_path, res.path, "--runs-dir", runs))
        assert "is not writable (Permission denied)" in line
    finally:
        runs.chmod(0o700)


# ---------------------------------------------------------------- the key covers the code


def test_editing_the_class_path_module_or_a_sibling_it_imports_changes_the_key(tmp_path, made):
    _, ckpt, _ = made
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "helpers_i12.py").write_text("SCALE = 1.0\n")
    (pkg / "model_i12.py").write_text(textwrap.dedent("""
        import extract_fixtures
        import helpers_i12

        class Net(extract_fixtures.TinyNet):
            pass
    """))
    data = fx.make_data(tmp_path / "data.npz")
    config = fx.write_config(pkg / "extract.yaml", data=data, class_path="model_i12.Net")
    root = tmp_path / "cache"

    def key() -> str:
        out = _cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", root, "--json")
        assert out.exit_code == 0, out.output
        return __import__("json").loads(out.stdout.strip().splitlines()[-1])["key"]

    first = key()
    assert key() == first  # unchanged code: reused
    (pkg / "model_i12.py").write_text((pkg / "model_i12.py").read_text() + "\n# forward edited\n")
    second = key()
    (pkg / "helpers_i12.py").write_text("SCALE = 2.0\n")
    third = key()
    assert len({first, second, third}) == 3
    meta = read_meta(next(p for p in root.glob("*.zarr") if read_meta(p).key == third))
    assert meta.key_record["code"]["files"] == ["helpers_i12.py", "model_i12.py"]


def test_checkpoint_overwritten_in_place_with_old_size_and_mtime_is_rehashed(tmp_path):
    from cache.key import checkpoint_digest

    path = tmp_path / "w.ckpt"
    path.write_bytes(b"a" * 4096)
    st = path.stat()
    first = checkpoint_digest(path, memo_dir=tmp_path)
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(b"b" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back, as cp -p / rsync -t do
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    second = checkpoint_digest(path, memo_dir=tmp_path)
    assert first != second == hashlib.sha256(b"b" * 4096).hexdigest()


# ---------------------------------------------------------------- messages that help


def test_checkpoint_errors_never_show_internals_or_the_unsafe_hint(tmp_path, made):
    _, _, config = made
    for name, payload in [("pop.ckpt", b"0" * 16 + b"junk"), ("garbage.pt", os.urandom(64))]:
        ckpt = tmp_path / name
        ckpt.write_bytes(payload)
        line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "c"))
        assert "is not a readable checkpoint" in line or "truncated or corrupted" in line, line
        for bad in ("pop from empty list", "weights_only=False", "weights_only` set to `False`", "Re-running"):
            assert bad not in line, line


def test_unknown_backbone_key_is_named_by_path_with_a_suggestion(tmp_path, made):
    data, ckpt, _ = made
    config = fx.write_config(tmp_path / "typo.yaml", data=data)
    config.write_text(config.read_text().replace("  taps:", "  tapz: {}\n  taps:"))
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "c"))
    assert "unknown key 'backbone.tapz'; did you mean 'taps'?" in line, line


def test_checkpoint_under_another_prefix_suggests_strip_prefixes(tmp_path, made):
    data, _, config = made
    torch.manual_seed(0)
    net = fx.TinyNet()
    ckpt = tmp_path / "bert.pt"
    torch.save({f"bert.{k}": v for k, v in net.state_dict().items()}, ckpt)
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "c"))
    assert "names differ only by the leading 'bert.': add `strip_prefixes: ['bert.']`" in line, line
    fixed = fx.write_config(tmp_path / "fixed.yaml", data=data, extra="  strip_prefixes: [bert.]\n")
    assert _cli("extract", "--checkpoint", ckpt, "--config", fixed, "--cache-root", tmp_path / "c").exit_code == 0


def test_set_lr_means_the_same_in_train_head_as_in_sweep(tmp_path, cache):
    import yaml

    res, _, _ = cache
    out = _train(tmp_path, res.path, "--set", "lr=1e-2", "--set", "epochs=2", "--json")
    assert out.exit_code == 0, out.output
    run_dir = Path(__import__("json").loads(out.stdout.strip().splitlines()[-1])["run_dir"])
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert train["lr"] == 0.01 and train["epochs"] == 2 and "lr" not in train["params"]
    line = _one_line(_train(tmp_path, res.path, "--set", "lr=1e-2", "--lr", "1e-3"))
    assert "--set lr=... and --lr both given" in line


def test_yaml_numbers_are_numbers_everywhere(tmp_path):
    from pipeline.config import parse_axis
    from pipeline.train.sweep_spec import sweep_spec_from_cli

    assert cfg.yaml_load("eps: 1e-12")["eps"] == 1e-12 and cfg.yaml_load("n: 12")["n"] == 12
    assert cfg.parse_set_options(["eps=1e-12"]) == {"eps": 1e-12}
    assert parse_axis("1e-3,3e-4") == (1e-3, 3e-4)
    spec = tmp_path / "s.yaml"
    spec.write_text("grid: {arch: [linear]}\ntrain: {lr: 3e-4, weight_decay: 1e-5}\n")
    s = sweep_spec_from_cli(config_path=str(spec), arch=None, sets=(), seeds=None, epochs=None, target=None,
                            task=None, device=None)
    assert s.train == {"lr": 3e-4, "weight_decay": 1e-5}
    head = tmp_path / "h.yaml"
    head.write_text("arch: linear\nlr: 1e-2\n")
    assert cfg.load(cfg.TrainConfig, yaml_path=head).lr == 1e-2


# ---------------------------------------------------------------- concurrency and leftovers


def _sweep_child(store: str, runs: str) -> None:
    from pipeline.train.sweep import run_sweep
    from pipeline.train.sweep_spec import sweep_spec_from_cli

    spec = sweep_spec_from_cli(config_path=None, arch="linear,mlp2", sets=("features=pooled/mean", "lr=1e-2,3e-3"),
                               seeds=1, epochs=2, target=None, task=None, device="cpu")
    run_sweep(cache_refs=[store], cache_root=None, spec=spec, runs_dir=Path(runs), strategy="in-turn")


def test_two_concurrent_sweeps_into_one_runs_dir_both_finish_and_record_each_run_once(tmp_path, cache):
    import multiprocessing as mp

    import pyarrow.parquet as pq

    res, _, _ = cache
    ctx = mp.get_context("fork")  # no second interpreter start-up: both race from the first moment
    procs = [ctx.Process(target=_sweep_child, args=(str(res.path), str(tmp_path / "runs"))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [pq.read_table(f).to_pylist()[0] for f in _rows(tmp_path / "runs")]
    configs = [(r["config_id"], r["seed"]) for r in rows]
    assert len(configs) == 4 and len(set(configs)) == 4  # 2 heads x 2 lr, each recorded exactly once
    run_dirs = [d for d in (tmp_path / "runs").iterdir() if d.is_dir() and d.name not in ("results", "sweeps", ".locks")]
    assert sorted(d.name for d in run_dirs) == sorted(r["run_id"] for r in rows)


def test_resume_removes_temporary_files_of_killed_writes(tmp_path, made):
    _, ckpt, config = made
    res = _extract_in_process(config, ckpt, tmp_path / "cache")
    store = res.path
    # what a SIGKILL between mkstemp and rename leaves: a temporary chunk and a temporary commit record
    (store / "pooled/mean/c/1/.0.x1y2z3").write_bytes(b"\0" * 100)
    (store / "_ftpipe/units/.000001.json.abc.tmp").write_text("{")
    (store / "_ftpipe/units/000001.json").unlink()  # and unit 1 not committed
    from cache.writer import update_meta

    update_meta(store, status="writing")
    again = _extract_in_process(config, ckpt, tmp_path / "cache")
    assert again.status == "complete" and again.samples_run == UNIT_ROWS
    assert [p for p in store.rglob(".*")] == []


def test_an_exception_in_the_users_forward_is_one_line(tmp_path, made):
    _, ckpt, _ = made
    _user_module(tmp_path, "broken_forward_i12", """
        import extract_fixtures

        class Net(extract_fixtures.TinyNet):
            def forward(self, x):
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (10x6 and 7x16)")
    """)
    config = _module_config(tmp_path, "broken_forward_i12.Net")
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--config", config, "--cache-root", tmp_path / "cache"))
    assert "backbone.class_path 'broken_forward_i12.Net': forward(x (2, 5, 6)) failed: RuntimeError: mat1" in line, line
    assert "complete" not in fx.store_statuses(tmp_path / "cache")


def test_corrupt_parquet_is_one_line(tmp_path):
    from pipeline.data import generate

    data = generate(kind="tracks", out=tmp_path / "tracks.parquet", n=20, seed=0)
    raw = bytearray(data.read_bytes())
    raw[-6] ^= 0xFF  # the footer length: the file no longer parses
    data.write_bytes(bytes(raw))
    ckpt = tmp_path / "some.ckpt"
    ckpt.write_bytes(b"x")
    line = _one_line(_cli("extract", "--checkpoint", ckpt, "--backbone", "maskformer", "--data", data,
                          "--cache-root", tmp_path / "cache"))
    assert "the Parquet data cannot be read, a file is damaged or not Parquet" in line and "tracks.parquet" in line, line
