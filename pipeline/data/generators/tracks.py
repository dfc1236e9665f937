"""``tracks``: charged particles on helices in a solenoid field, crossing cylindrical detector layers.

Each event has 1-6 particles from near the origin (vertex spread ~1 mm transverse, ~5 cm along z)
in a uniform field ``B_FIELD`` along z. A particle with transverse momentum pt (GeV) and charge q
moves on a helix of transverse radius R = pt / (0.3 B) (metres, B in tesla), turning clockwise
seen from +z for q > 0. Each barrel layer (a cylinder of radius r_L, |z| < HALF_LENGTH) records
the helix's first crossing; the hit is smeared along the layer (r-phi and z), so its radius is
exactly r_L. Uniform noise hits are added, and the hits of an event are shuffled.

Parquet, one row per event (the maskformer family's ``DATA`` layout reads it):
    event_id (int64), split (train/val/test), n_particles (int32)
    hit_x, hit_y, hit_z, hit_r, hit_phi, hit_eta  list<float32>  (m, m, m, m, rad, asinh(z/r))
    hit_layer     list<int8>    layer number 0..N_LAYERS-1
    hit_particle  list<int16>   index of the true particle in the event, -1 = noise
    particle_pt, particle_eta, particle_phi   list<float32>  (GeV, -, direction at the vertex)
    particle_charge  list<int8>;  particle_vx, particle_vy, particle_vz  list<float32> (vertex, m)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.data.base import SPLIT_NAMES, assign_splits
from pipeline.registry import register_generator

log = logging.getLogger(__name__)

B_FIELD = 2.0  # tesla, along +z
LAYER_RADII = (0.05, 0.09, 0.14, 0.21, 0.30, 0.40, 0.52, 0.66, 0.82, 1.00)  # metres
HALF_LENGTH = 2.5  # metres: barrel layers span |z| < HALF_LENGTH
PT_RANGE = (0.5, 10.0)  # GeV, log-uniform: at 0.5 GeV R = 0.83 m, so low-pt tracks curl visibly
ETA_MAX = 1.5
MAX_PARTICLES = 6  # particles per event: uniform 1..MAX_PARTICLES
NOISE_MEAN = 8.0  # Poisson mean of noise hits per event
SIGMA_RPHI = 50e-6  # metres, hit resolution along the layer
SIGMA_Z = 0.5e-3  # metres
VERTEX_SIGMA = (1e-3, 1e-3, 0.05)  # metres (x, y, z)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test
DEFAULT_N = 2000  # events at demo size
ROW_GROUP_SIZE = 256  # events per Parquet row group


def curvature_radius(pt: np.ndarray | float, *, b_field: float = B_FIELD) -> np.ndarray | float:
    """Transverse helix radius in metres for pt in GeV and B in tesla (R = pt / (0.3 B))."""
    return pt / (0.3 * b_field)


def helix_layer_crossings(
    *, pt: float, phi: float, eta: float, charge: int, vertex: np.ndarray, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First crossing of a helix with each cylinder: (x, y, z) arrays over radii, NaN where none."""
    radius = float(curvature_radius(pt))
    q = float(np.sign(charge))
    vx, vy, vz = (float(v) for v in vertex)
    # centre of the transverse circle: to the right of the motion for q > 0 (F = q v x B, B along +z)
    cx, cy = vx + q * radius * np.sin(phi), vy - q * radius * np.cos(phi)
    c = np.hypot(cx, cy)
    beta = np.arctan2(cy, cx)
    alpha0 = np.arctan2(vy - cy, vx - cx)
    # |c + R (cos a, sin a)| = r  <=>  cos(a - beta) = (r^2 - c^2 - R^2) / (2 R c)
    k = (radii**2 - c**2 - radius**2) / (2.0 * radius * max(c, 1e-12))
    ok = np.abs(k) <= 1.0
    delta = np.arccos(np.clip(k, -1.0, 1.0))
    # turning angle t >= 0 of the two solutions a = beta +- delta; the particle turns by a = a0 - q t
    t1 = np.mod(q * (alpha0 - (beta + delta)), 2 * np.pi)
    t2 = np.mod(q * (alpha0 - (beta - delta)), 2 * np.pi)
    t = np.minimum(t1, t2)
    a = alpha0 - q * t
    x = cx + radius * np.cos(a)
    y = cy + radius * np.sin(a)
    z = vz + radius * t * np.sinh(eta)  # transverse arc length R t times pz / pt
    z = np.where(np.abs(z) < HALF_LENGTH, z, np.nan)
    x, y, z = (np.where(ok & np.isfinite(z), v, np.nan) for v in (x, y, z))
    return x, y, z


def _event(rng: np.random.Generator, *, smear: bool) -> dict[str, np.ndarray]:
    radii = np.asarray(LAYER_RADII)
    n_part = int(rng.integers(1, MAX_PARTICLES + 1))
    lo, hi = np.log(PT_RANGE[0]), np.log(PT_RANGE[1])
    pt = np.exp(rng.uniform(lo, hi, n_part))
    eta = rng.uniform(-ETA_MAX, ETA_MAX, n_part)
    phi = rng.uniform(-np.pi, np.pi, n_part)
    charge = rng.choice(np.array([-1, 1]), n_part)
    vertex = rng.normal(0.0, VERTEX_SIGMA, size=(n_part, 3))

    xs, ys, zs, layers, owners = [], [], [], [], []
    for p in range(n_part):
        x, y, z = helix_layer_crossings(pt=pt[p], phi=phi[p], eta=eta[p], charge=charge[p], vertex=vertex[p], radii=radii)
        hit = np.flatnonzero(np.isfinite(z))
        hphi = np.arctan2(y[hit], x[hit])
        hz = z[hit]
        if smear:
            hphi = hphi + rng.normal(0.0, SIGMA_RPHI, len(hit)) / radii[hit]
            hz = hz + rng.normal(0.0, SIGMA_Z, len(hit))
        # smearing moves the hit along the layer surface only, so its radius stays the layer's
        xs.append(radii[hit] * np.cos(hphi))
        ys.append(radii[hit] * np.sin(hphi))
        zs.append(hz)
        layers.append(hit)
        owners.append(np.full(len(hit), p))

    n_noise = int(rng.poisson(NOISE_MEAN))
    nl = rng.integers(0, len(radii), n_noise)
    nphi = rng.uniform(-np.pi, np.pi, n_noise)
    xs.append(radii[nl] * np.cos(nphi))
    ys.append(radii[nl] * np.sin(nphi))
    zs.append(rng.uniform(-HALF_LENGTH, HALF_LENGTH, n_noise))
    layers.append(nl)
    owners.append(np.full(n_noise, -1))

    x, y, z = (np.concatenate(v) for v in (xs, ys, zs))
    layer = np.concatenate(layers)
    owner = np.concatenate(owners)
    order = rng.permutation(len(x))  # no truth leaks through hit order
    x, y, z, layer, owner = x[order], y[order], z[order], layer[order], owner[order]
    r = radii[layer]
    return {
        "hit_x": x.astype(np.float32),
        "hit_y": y.astype(np.float32),
        "hit_z": z.astype(np.float32),
        "hit_r": r.astype(np.float32),
        "hit_phi": np.arctan2(y, x).astype(np.float32),
        "hit_eta": np.arcsinh(z / r).astype(np.float32),
        "hit_layer": layer.astype(np.int8),
        "hit_particle": owner.astype(np.int16),
        "particle_pt": pt.astype(np.float32),
        "particle_eta": eta.astype(np.float32),
        "particle_phi": phi.astype(np.float32),
        "particle_charge": charge.astype(np.int8),
        "particle_vx": vertex[:, 0].astype(np.float32),
        "particle_vy": vertex[:, 1].astype(np.float32),
        "particle_vz": vertex[:, 2].astype(np.float32),
    }


@register_generator("tracks")
def generate_tracks(
    *, out: Path, n: int | None = None, seed: int = 0, smear: bool = True, row_group_size: int = ROW_GROUP_SIZE
) -> Path:
    """Write ``n`` events (default DEFAULT_N) to ``out`` (Parquet); same seed, same file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pipeline.errors import ConfigError

    n = DEFAULT_N if n is None else int(n)
    if n <= 0:
        raise ConfigError(f"--n must be > 0; got {n}")
    rng = np.random.default_rng(seed)
    events = [_event(rng, smear=smear) for _ in tqdm(range(n), desc="tracks", unit="event", disable=n < 5000)]

    split = np.asarray(SPLIT_NAMES, dtype=object)[assign_splits(n, SPLIT_FRACTIONS, rng=rng)]

    columns: dict[str, pa.Array] = {
        "event_id": pa.array(np.arange(n, dtype=np.int64)),
        "split": pa.array(split.tolist(), type=pa.string()),
        "n_particles": pa.array(np.array([len(e["particle_pt"]) for e in events], dtype=np.int32)),
    }
    for name in events[0]:
        values = np.concatenate([e[name] for e in events])
        offsets = np.concatenate([[0], np.cumsum([len(e[name]) for e in events])]).astype(np.int32)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    table = pa.table(columns)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, row_group_size=row_group_size)
    log.info("tracks: %d events, %d hits -> %s", n, len(table.column("hit_x").combine_chunks().flatten()), out)
    return out
