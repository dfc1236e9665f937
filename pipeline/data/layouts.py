"""The data section each built-in backbone family expects from its generator's files.

``ftpipe extract --backbone NAME --data PATH`` and ``ftpipe pretrain`` use these so that the
generators' files need no config. One plain dict per family (a ``DataConfig`` as data); a family
adds its entry here. ``path`` is filled in by :func:`layout_for_backbone`.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.errors import ConfigError

# tracks generator columns (pipeline/data/generators/tracks.py)
TRACK_HIT_FIELDS = ["hit_x", "hit_y", "hit_z", "hit_r", "hit_phi", "hit_eta", "hit_layer"]
TRACK_HIT_TRUTH = ["hit_particle"]  # index of the true particle in the event, -1 = noise
TRACK_PARTICLE_FIELDS = ["particle_pt", "particle_eta", "particle_phi", "particle_charge"]

LAYOUTS: dict[str, dict[str, Any]] = {
    "maskformer": {
        "format": "parquet",
        "inputs": TRACK_HIT_FIELDS + TRACK_HIT_TRUTH + TRACK_PARTICLE_FIELDS,
        "targets": ["n_particles"],
        "split": "split",
        "sample_id": "event_id",
        "options": {
            "groups": {
                "hits": TRACK_HIT_FIELDS,  # model input; cached raw as hits/features
                "hit_truth": TRACK_HIT_TRUTH,  # stage-one labels and target matching only
                "particles": TRACK_PARTICLE_FIELDS,  # truth per particle -> targets/<field> per query
            }
        },
    },
    # icu generator (pipeline/data/generators/icu.py): events grouped into sets by set_size
    "setvae": {
        "format": "parquet",
        "inputs": ["variable", "value", "set_time", "set_size"],
        "targets": ["label"],
        "split": "split",
        "sample_id": "patient_id",
        "options": {"groups": {"events": ["variable", "value"], "seq": ["set_time", "set_size"]}},
    },
    # images generator (pipeline/data/generators/images.py)
    "vit": {
        "format": "arrays",
        "inputs": ["images"],
        "targets": ["label"],
        "split": "split",
        "sample_id": "sample_id",
    },
}


def layout_for_backbone(name: str, *, path: str | None) -> dict[str, Any]:
    """A fresh copy of ``name``'s data section with ``path`` set."""
    if name not in LAYOUTS:
        raise ConfigError(
            f"backbone {name!r} has no default data layout (known: {', '.join(sorted(LAYOUTS))}); "
            "pass --config with a data section"
        )
    layout = copy.deepcopy(LAYOUTS[name])
    layout["path"] = path
    return layout
