"""How 0..255 pixels become a model's input: one definition for the workstation (convert-model's --data) and the
device (bench-model's --input), so that accuracy is measured on what the model was converted for.

convert-model records its choice in each artifact's manifest (`preprocessing`: scale, mean, std); bench-model reads it
from the manifest beside the artifact (`--scale auto`) and scales integer --input arrays the same way. Float arrays
are taken as already preprocessed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sepconv.deploy.errors import InvalidOptionError

SCALES = {"unit": (1 / 255.0, 0.0), "symmetric": (2 / 255.0, -1.0), "raw": (1.0, 0.0)}
AUTO = "auto"
NO_MANIFEST = "default (no manifest)"  # the source of a --scale auto that found no manifest to follow


def check_scale(scale: str) -> None:
    if scale not in SCALES and scale != AUTO:
        raise InvalidOptionError(f"Unrecognized scale={scale!r}. Supported scales are: {sorted(SCALES) + [AUTO]}")


def from_pixels(x: np.ndarray, preprocessing: dict) -> np.ndarray:
    """`x` as the model's input: integer pixels scaled (and normalised by mean / std if given); floats unchanged."""
    if not np.issubdtype(np.asarray(x).dtype, np.integer):
        return np.asarray(x, dtype=np.float32)
    factor, offset = SCALES[preprocessing.get("scale") or "unit"]
    x = np.asarray(x, dtype=np.float32) * factor + offset
    if preprocessing.get("mean") is not None:
        x = x - np.asarray(preprocessing["mean"], dtype=np.float32)
    if preprocessing.get("std") is not None:
        x = x / np.asarray(preprocessing["std"], dtype=np.float32)
    return x.astype(np.float32)


def preprocessing_for(artifact, scale: str = AUTO) -> dict:
    """{scale, mean, std, source}: `scale` as given, or with 'auto' what the artifact's manifest says ('unit' when
    there is none)."""
    check_scale(scale)
    if scale != AUTO:
        return {"scale": scale, "mean": None, "std": None, "source": "--scale"}
    manifest = Path(artifact).with_name(Path(artifact).name + ".json")
    try:
        recorded = json.loads(manifest.read_text()).get("preprocessing") if manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("scale") in SCALES:
        return {"scale": recorded["scale"], "mean": recorded.get("mean"), "std": recorded.get("std"),
                "source": f"manifest {manifest.name}"}
    return {"scale": "unit", "mean": None, "std": None, "source": NO_MANIFEST}


def guessed(preprocessing: dict, x) -> bool:
    """Integer pixels scaled by the default, no manifest saying how the model takes them: a guess that a model
    which rescales itself (or expects [-1, 1]) turns into a wrong accuracy, so the caller says it."""
    return preprocessing.get("source") == NO_MANIFEST and np.issubdtype(np.asarray(x).dtype, np.integer)
