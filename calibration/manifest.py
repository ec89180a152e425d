"""Calibration / parity manifests: JSONL, one sample per line.

Each line is a JSON object with any mix of ``"text"`` (string), ``"image"``
(path) and ``"audio"`` (path), plus an optional ``"id"``. Paths are relative
to the manifest's folder. Blank lines are skipped.

:func:`read_manifest` validates every line (decoding every image and audio
file with the runner's own preprocessing, so a corrupt file is caught before
any model work) and raises one :class:`~core.errors.ManifestError`
listing every bad line with its number and reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputFileError, ManifestError

KEYS = ("id", "text", "image", "audio")


@dataclass(frozen=True)
class Sample:
    id: str
    text: str
    image: Path | None = None
    audio: Path | None = None

    def to_prompt(self):
        from core.runner import Prompt

        return Prompt(text=self.text, image=self.image, audio=self.audio)


def _check_media(kind: str, path: Path) -> str | None:
    """None when ``path`` decodes as ``kind``; else the reason."""
    from core import preprocess

    if not path.exists():
        return f"{kind} file not found: {path}"
    if not path.is_file():
        return f"{kind} path is not a file: {path}"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{kind} file unreadable: {path}: {e.strerror or e}"
    try:
        if kind == "image":
            preprocess.load_image(path)
        else:
            preprocess.load_audio(path)
    except InputFileError as e:
        return f"corrupt {kind}: {e}"
    return None


def _parse_line(line: str, base: Path, n: int) -> tuple[Sample | None, list[str]]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, [f"invalid JSON: {e.msg} (column {e.colno})"]
    if not isinstance(item, dict):
        return None, [f"expected a JSON object, got {type(item).__name__}"]
    reasons: list[str] = []
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        reasons.append(f"unknown key(s) {', '.join(repr(k) for k in unknown)} (allowed: {', '.join(KEYS)})")
    for key in KEYS:
        if key in item and item[key] is not None and not isinstance(item[key], str):
            reasons.append(f"'{key}' must be a string, got {type(item[key]).__name__}")
    text = item.get("text") if isinstance(item.get("text"), str) else ""
    media: dict[str, Path | None] = {"image": None, "audio": None}
    for kind in ("image", "audio"):
        v = item.get(kind)
        if isinstance(v, str) and v.strip():
            p = Path(v)
            media[kind] = p if p.is_absolute() else base / p
        elif isinstance(v, str):
            reasons.append(f"'{kind}' is an empty path")
    if not (text and text.strip()) and media["image"] is None and media["audio"] is None and not reasons:
        reasons.append("empty sample: no text, image or audio")
    for kind, p in media.items():
        if p is not None:
            why = _check_media(kind, p)
            if why:
                reasons.append(why)
    if reasons:
        return None, reasons
    sid = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else f"line-{n}"
    return Sample(id=sid, text=text, image=media["image"], audio=media["audio"]), []


def read_manifest(path: str | Path) -> list[Sample]:
    """Every sample of a JSONL manifest, or ManifestError listing every bad line (line numbers from 1)."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"manifest {path}: is a directory; give the .jsonl file")
    if not path.is_file():
        raise InputFileError(f"manifest {path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(str(path), [(0, f"cannot read manifest: {e}")]) from e
    base = path.parent
    samples: list[Sample] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        sample, reasons = _parse_line(line, base, n)
        if reasons:
            problems.append((n, "; ".join(reasons)))
            continue
        assert sample is not None
        if sample.id in seen:
            problems.append((n, f"duplicate id '{sample.id}' (first on line {seen[sample.id]})"))
            continue
        seen[sample.id] = n
        samples.append(sample)
    if problems:
        raise ManifestError(str(path), problems)
    if not samples:
        raise ManifestError(str(path), [(0, "manifest has no samples")])
    return samples


def manifest_hash(path: str | Path, samples: list[Sample] | None = None) -> str:
    """sha256 over the manifest bytes and every file it references (content, in order)."""
    path = Path(path)
    samples = read_manifest(path) if samples is None else samples
    h = hashlib.sha256()
    h.update(path.read_bytes())
    for s in samples:
        for p in (s.image, s.audio):
            if p is not None:
                h.update(str(p.name).encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
