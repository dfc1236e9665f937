"""The tracks generator: deterministic by seed, and physically sane (helices in a solenoid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.generators import tracks
from pipeline.registry import GENERATORS


def _table(path: Path) -> dict[str, list]:
    t = pq.read_table(path)
    return {k: t.column(k).to_pylist() for k in t.column_names}


def _circle_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle: centre x, centre y, radius."""
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    d, e, f = np.linalg.lstsq(a, -(x**2 + y**2), rcond=None)[0]
    cx, cy = -d / 2, -e / 2
    return cx, cy, float(np.sqrt(cx**2 + cy**2 - f))


def _particles(t: dict[str, list]):
    """Yield (event, particle, hit arrays, truth) for every particle with at least 3 hits."""
    for ev in range(len(t["event_id"])):
        owner = np.asarray(t["hit_particle"][ev])
        x, y, z = (np.asarray(t[c][ev], dtype=np.float64) for c in ("hit_x", "hit_y", "hit_z"))
        layer = np.asarray(t["hit_layer"][ev])
        for p in range(t["n_particles"][ev]):
            sel = owner == p
            if sel.sum() < 3:
                continue
            order = np.argsort(layer[sel])
            truth = {k: t[f"particle_{k}"][ev][p] for k in ("pt", "eta", "phi", "charge", "vx", "vy", "vz")}
            yield x[sel][order], y[sel][order], z[sel][order], truth


def test_registered_and_deterministic(tmp_path: Path):
    assert GENERATORS.get("tracks") is tracks.generate_tracks
    a = tracks.generate_tracks(out=tmp_path / "a.parquet", n=40, seed=3)
    b = GENERATORS.get("tracks")(out=tmp_path / "b.parquet", n=40, seed=3)
    c = tracks.generate_tracks(out=tmp_path / "c.parquet", n=40, seed=4)
    assert a.read_bytes() == b.read_bytes()
    ta, tc = _table(a), _table(c)
    assert ta["hit_x"] != tc["hit_x"] and ta["particle_pt"] != tc["particle_pt"]


def test_columns_splits_and_truth_indices(tmp_path: Path):
    t = _table(tracks.generate_tracks(out=tmp_path / "t.parquet", n=200, seed=0))
    assert t["event_id"] == list(range(200))
    counts = {s: t["split"].count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    for ev in range(200):
        n_hits = len(t["hit_x"][ev])
        assert all(len(t[c][ev]) == n_hits for c in ("hit_y", "hit_z", "hit_r", "hit_phi", "hit_eta", "hit_layer", "hit_particle"))
        n_p = t["n_particles"][ev]
        assert 1 <= n_p <= tracks.MAX_PARTICLES and len(t["particle_pt"][ev]) == n_p
        owner = np.asarray(t["hit_particle"][ev])
        assert owner.min() >= -1 and owner.max() < n_p
        assert set(t["particle_charge"][ev]) <= {-1, 1}
        pt = np.asarray(t["particle_pt"][ev])
        assert (pt >= tracks.PT_RANGE[0] - 1e-6).all() and (pt <= tracks.PT_RANGE[1] + 1e-5).all()
    assert sum((np.asarray(o) == -1).sum() for o in t["hit_particle"]) > 0  # there is noise


def test_hits_lie_on_their_layers(tmp_path: Path):
    t = _table(tracks.generate_tracks(out=tmp_path / "t.parquet", n=100, seed=1))
    radii = np.asarray(tracks.LAYER_RADII)
    x, y, z, r, phi, eta = (np.concatenate([np.asarray(v, np.float64) for v in t[c]])
                            for c in ("hit_x", "hit_y", "hit_z", "hit_r", "hit_phi", "hit_eta"))
    layer = np.concatenate(t["hit_layer"])
    np.testing.assert_allclose(np.hypot(x, y), radii[layer], rtol=1e-6)
    np.testing.assert_allclose(r, radii[layer], rtol=1e-7)
    np.testing.assert_allclose(np.cos(phi - np.arctan2(y, x)), 1.0, atol=1e-6)
    np.testing.assert_allclose(eta, np.arcsinh(z / r), atol=1e-5)
    assert (np.abs(z) < tracks.HALF_LENGTH).all()


def test_helix_geometry_without_smearing(tmp_path: Path):
    """Curvature radius = pt / (0.3 B), turning direction = -charge, z linear in arc length (slope sinh eta)."""
    t = _table(tracks.generate_tracks(out=tmp_path / "t.parquet", n=60, seed=2, smear=False))
    checked = 0
    for x, y, z, truth in _particles(t):
        vx, vy = truth["vx"], truth["vy"]
        _, _, radius = _circle_fit(np.append(x, vx), np.append(y, vy))
        expected = truth["pt"] / (0.3 * tracks.B_FIELD)
        assert radius == pytest.approx(expected, rel=2e-3), truth
        # turning sense from the vertex, first and last hits: clockwise (negative cross) for q > 0
        cross = (x[0] - vx) * (y[-1] - y[0]) - (y[0] - vy) * (x[-1] - x[0])
        assert np.sign(cross) == -truth["charge"], truth
        # z advances by (transverse arc length) * sinh(eta)
        chord = np.hypot(x - vx, y - vy)
        arc = 2 * expected * np.arcsin(np.clip(chord / (2 * expected), -1, 1))
        np.testing.assert_allclose(z - truth["vz"], arc * np.sinh(truth["eta"]), atol=2e-5)
        checked += 1
    assert checked > 100


def test_curvature_survives_smearing_and_low_pt_curls(tmp_path: Path):
    t = _table(tracks.generate_tracks(out=tmp_path / "t.parquet", n=150, seed=3))
    rel, sagitta = [], []
    for x, y, z, truth in _particles(t):
        _, _, radius = _circle_fit(np.append(x, truth["vx"]), np.append(y, truth["vy"]))
        expected = truth["pt"] / (0.3 * tracks.B_FIELD)
        rel.append(abs(radius / expected - 1))
        if truth["pt"] < 1.0 and len(x) == len(tracks.LAYER_RADII):
            # low-pt tracks bend visibly: the outer hit sits centimetres off the straight line
            d = np.array([x[-1] - truth["vx"], y[-1] - truth["vy"]])
            mid = np.array([x[len(x) // 2] - truth["vx"], y[len(x) // 2] - truth["vy"]])
            sagitta.append(abs(d[0] * mid[1] - d[1] * mid[0]) / np.linalg.norm(d))
    assert np.median(rel) < 0.02
    assert sagitta and min(sagitta) > 0.02


def test_default_size_and_bad_n(tmp_path: Path):
    from pipeline.data import generate
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--n"):
        generate(kind="tracks", out=tmp_path / "x.parquet", n=0, seed=0)
    assert tracks.DEFAULT_N >= 1000
