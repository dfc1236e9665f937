"""Array data reader: .npz and folders of .npy; split handling never invents a silent split."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import open_data
from pipeline.errors import DataError


def _arrays(n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(n, 3, 2)),  # float64 on purpose: collate gives float32
        "mask": np.ones((n, 3), dtype=bool),
        "y": rng.normal(size=(n, 2)),
        "split": np.array([0, 1, 2] * (n // 3)),
        "ids": np.arange(100, 100 + n),
    }


def _cfg(path, **kw) -> DataConfig:
    base = dict(format="arrays", path=str(path), inputs=["x", "mask"], targets=["y"], split="split", sample_id="ids")
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("layout", ["npz", "npy_dir"])
def test_plan_and_batches(tmp_path, layout):
    arrays = _arrays()
    if layout == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, **arrays)
    else:
        path = tmp_path / "d"
        path.mkdir()
        for k, v in arrays.items():
            np.save(path / f"{k}.npy", v)
    source = open_data(config=_cfg(path))
    plan = source.plan()
    assert plan.n_samples == 12
    assert plan.sample_id.tolist() == list(range(100, 112))
    assert plan.split.tolist() == arrays["split"].tolist()
    assert plan.targets["y"].dtype == np.float32 and plan.targets["y"].shape == (12, 2)
    assert plan.ragged_lengths == {}
    ds = source.dataset()
    batch = source.collate([ds[i] for i in range(4)])
    assert batch["x"].dtype.is_floating_point and str(batch["x"].dtype) == "torch.float32"
    assert tuple(batch["x"].shape) == (4, 3, 2) and str(batch["mask"].dtype) == "torch.bool"
    np.testing.assert_allclose(batch["x"].numpy(), arrays["x"][:4].astype(np.float32))


def test_fingerprint_follows_content_not_path(tmp_path):
    a = _arrays()
    np.savez(tmp_path / "a.npz", **a)
    (tmp_path / "moved").mkdir()
    np.savez(tmp_path / "moved" / "b.npz", **a)
    fa = open_data(config=_cfg(tmp_path / "a.npz")).plan().fingerprint
    assert fa == open_data(config=_cfg(tmp_path / "moved" / "b.npz")).plan().fingerprint
    a["x"][0, 0, 0] += 1
    np.savez(tmp_path / "a.npz", **a)
    assert open_data(config=_cfg(tmp_path / "a.npz")).plan().fingerprint != fa


def test_missing_split_needs_explicit_ratios(tmp_path):
    a = _arrays()
    del a["split"]
    np.savez(tmp_path / "d.npz", **a)
    with pytest.raises(DataError, match="--split-ratios"):
        open_data(config=_cfg(tmp_path / "d.npz")).plan()
    with pytest.raises(DataError, match="--split-ratios"):
        open_data(config=_cfg(tmp_path / "d.npz", split=None)).plan()
    plan = open_data(config=_cfg(tmp_path / "d.npz"), split_ratios=[0.5, 0.25, 0.25], split_seed=1).plan()
    assert np.bincount(plan.split, minlength=3).tolist() == [6, 3, 3]
    again = open_data(config=_cfg(tmp_path / "d.npz"), split_ratios=[0.5, 0.25, 0.25], split_seed=1).plan()
    assert plan.split.tolist() == again.split.tolist()


def test_ratios_with_a_split_array_is_an_error(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays())
    with pytest.raises(DataError, match="own split"):
        open_data(config=_cfg(tmp_path / "d.npz"), split_ratios=[0.8, 0.1, 0.1]).plan()


def test_bad_inputs_name_the_problem(tmp_path):
    a = _arrays()
    np.savez(tmp_path / "d.npz", **a)
    with pytest.raises(DataError, match="no input array 'z'.*it has: ids, mask, split, x, y"):
        open_data(config=_cfg(tmp_path / "d.npz", inputs=["z"])).plan()
    a["y"] = a["y"][:5]
    np.savez(tmp_path / "e.npz", **a)
    with pytest.raises(DataError, match="target 'y'"):
        open_data(config=_cfg(tmp_path / "e.npz")).plan()
    a = _arrays()
    a["ids"][1] = a["ids"][0]
    np.savez(tmp_path / "f.npz", **a)
    with pytest.raises(DataError, match="duplicate"):
        open_data(config=_cfg(tmp_path / "f.npz")).plan()
    a = _arrays()
    a["split"] = np.array(["train", "valid", "test"] * 4)
    np.savez(tmp_path / "g.npz", **a)
    with pytest.raises(DataError, match="valid"):
        open_data(config=_cfg(tmp_path / "g.npz")).plan()
    (tmp_path / "h.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_data(config=_cfg(tmp_path / "h.npz")).plan()
