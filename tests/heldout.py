"""Helpers shared by the tests: a small slice of the built-in held-out set, and cosine measures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def heldout_subset(dest: Path, kinds=("text", "image", "audio", "image+audio")) -> Path:
    """A few items of the built-in held-out set (one per kind), absolute paths: keeps the suite fast."""
    from core.dataset import heldout_manifest

    src = heldout_manifest()
    picked = {}
    for line in src.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        kind = "+".join(k for k in ("image", "audio") if d.get(k)) or "text"
        if kind in kinds and kind not in picked:
            picked[kind] = {k: (str(src.parent / v) if k in ("image", "audio") else v) for k, v in d.items()}
    dest.write_text("".join(json.dumps(picked[k]) + "\n" for k in kinds if k in picked))
    return dest


def calibration_subset(dest: Path, per_kind: dict[str, int] | None = None) -> Path:
    """The first few items of each kind of the built-in calibration set (default: 8 text prompts, 2 with an image,
    2 with a recording, 1 with both), absolute paths: the statistics a test of tiny needs, at a fraction of the cost
    of the whole set."""
    from core.dataset import calibration_manifest

    want = per_kind if per_kind is not None else {"text": 8, "image": 2, "audio": 2, "image+audio": 1}
    src = calibration_manifest()
    taken: dict[str, int] = {}
    lines = []
    for line in src.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        kind = "+".join(k for k in ("image", "audio") if d.get(k)) or "text"
        if taken.get(kind, 0) < want.get(kind, 0):
            taken[kind] = taken.get(kind, 0) + 1
            lines.append(json.dumps({k: (str(src.parent / v) if k in ("image", "audio") else v) for k, v in d.items()}))
    dest.write_text("".join(line + "\n" for line in lines))
    return dest


def cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def row_cos(a: np.ndarray, b: np.ndarray) -> float:
    """The worst cosine over matching rows (e.g. decoder positions)."""
    return min(cos(x, y) for x, y in zip(a, b))
