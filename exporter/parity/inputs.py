"""The held-out inputs parity runs on (a manifest; never the calibration set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BadInputError, InputFileError


@dataclass
class Item:
    text: str
    image: Path | None = None
    audio: Path | None = None

    def label(self) -> str:
        parts = [repr(self.text[:40])]
        if self.image:
            parts.append(f"image={self.image.name}")
        if self.audio:
            parts.append(f"audio={self.audio.name}")
        return " ".join(parts)


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def read_inputs(path: Path) -> list[Item]:
    """Held-out items from a manifest, read by calibration.manifest.read_manifest (every bad line reported;
    media paths resolved against the manifest's folder, once)."""
    from calibration.manifest import read_manifest

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"parity inputs {path}: file not found")
    entries = read_manifest(path)
    entries = getattr(entries, "entries", entries)

    def media(v: Any) -> Path | None:
        return Path(v) if v else None

    items = [Item(text=str(_field(e, "text") or ""), image=media(_field(e, "image")), audio=media(_field(e, "audio")))
             for e in entries]
    if not items:
        raise BadInputError(f"parity inputs {path}: no items")
    return items


def default_inputs() -> Path:
    from core.dataset import heldout_manifest

    return Path(heldout_manifest())


def refuse_calibration_set(items: list[Item], inputs: Path, calib: Path | None = None) -> None:
    """Parity never runs on the calibration set."""
    if calib is None:
        from core.dataset import calibration_manifest

        calib = Path(calibration_manifest())
    if calib.resolve() == Path(inputs).resolve():
        raise BadInputError(f"parity inputs {inputs}: this is the calibration manifest; use a held-out set")
    calib_items = {(i.text, str(i.image and i.image.resolve()), str(i.audio and i.audio.resolve())) for i in read_inputs(calib)}
    for i in items:
        if (i.text, str(i.image and i.image.resolve()), str(i.audio and i.audio.resolve())) in calib_items:
            raise BadInputError(f"parity inputs {inputs}: item {i.label()} is in the calibration set")
