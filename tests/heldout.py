"""A small slice of the built-in held-out set, shared by the parity and build tests."""

from __future__ import annotations

import json
from pathlib import Path


def heldout_subset(dest: Path, kinds=("text", "image", "audio", "image+audio")) -> Path:
    """A few items of the built-in held-out set (one per kind), absolute paths: keeps the suite fast."""
    from calibration.dataset import heldout_manifest

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
