"""The built-in calibration and held-out sets, shipped as package data in ``calibration/data``.

Core (not calibration) because the tiny tokenizer is trained on these texts and every target's export
check prompts with the held-out sample; the files stay in the calibration package.

Both are real and redistributable (``calibration/data/SOURCES.md`` lists every
file, its origin and licence) and disjoint: parity never sees a calibration
file, source photo, recording or prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import InputFileError

DATA_DIR = Path(__file__).resolve().parent.parent / "calibration" / "data"


def _shipped(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise InputFileError(
            f"{path}: built-in data file missing (package data not installed; reinstall autoglm-export)"
        )
    return path


def calibration_manifest() -> Path:
    """The shipped calibration manifest (JSONL; media paths relative to its folder)."""
    return _shipped("calib.jsonl")


def heldout_manifest() -> Path:
    """The shipped held-out manifest used for parity (never for calibration)."""
    return _shipped("heldout.jsonl")


def tokenizer_corpus() -> Path:
    """Extra English the tiny tokenizer is trained on, besides the manifests' prompts."""
    return _shipped("tokenizer_corpus.txt")


def sample_inputs() -> dict[str, Any]:
    """One held-out image, one held-out audio file and one held-out prompt (for examples and tests).

    Returns ``{"image": Path, "audio": Path, "prompt": str}``; the three come
    from the first held-out sample that has both an image and audio.
    """
    manifest = heldout_manifest()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if item.get("image") and item.get("audio"):
            return {
                "image": manifest.parent / item["image"],
                "audio": manifest.parent / item["audio"],
                "prompt": item["text"],
            }
    raise InputFileError(f"{manifest}: no held-out sample has both an image and audio")
