"""The artifact directory and the Session protocol: what a target writes and what the runner drives.

A target turns components plus a recipe into an artifact directory (the artifact file(s), the
tokenizer it was built with, and ``artifact.json``: target, recipe, method signatures, metadata,
runtime versions, sha256 of every file), and loads it back as a :class:`Session`.
Everything is written into a temporary sibling directory and moved into place at the end
(:func:`atomic_artifact_dir`): a failed export leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import resource
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from core.errors import ArtifactError, OutputError

ARTIFACT_JSON = "artifact.json"
ARTIFACT_SCHEMA = 1
METHODS = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")

# Progress callback: (stage, done, total). Long work calls it.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:  # pragma: no cover - trivial
    pass


@runtime_checkable
class Session(Protocol):
    """A loaded artifact. Inputs and outputs are NumPy arrays.

    Method inputs (identical names on every target):
      token_embedding(tokens int64 [1,T])                          -> embeds [1,T,H]
      vision_encoder(pixels float32 [1,3,S,S])                     -> image_embeds [1,N,H]
      audio_encoder(mel float32 [1,n_mels,F])                      -> audio_embeds [1,A,H]
      text_decoder(embeds [1,T,H], position_ids int64 [3,T],
                   cache_position int64 [T])                       -> logits [1,T,V]
    The KV cache lives inside the session; ``reset()`` forgets it.
    ``provenance`` says how numbers were obtained (e.g. "ExecuTorch runtime 1.5.1",
    "Core ML program emulated on Linux").
    """

    provenance: str

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


@dataclass
class Artifact:
    dir: Path
    target: str
    recipe: str
    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # the whole artifact.json

    @property
    def metadata(self) -> dict[str, Any]:
        return self.info.get("metadata", {})


# --- artifact directory helpers ------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (an .mlpackage is a directory), sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def file_hashes(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each listed file or directory (directories hash their files in order)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = root / name
        if p.is_dir():
            h = hashlib.sha256()
            size = 0
            for f in tree_files(p):
                h.update(str(f.relative_to(p)).encode())
                h.update(sha256_file(f).encode())
                size += f.stat().st_size
            out[name] = {"sha256": h.hexdigest(), "bytes": size}
        else:
            out[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def check_output_dir(out: Path, option: str = "--out", marker: str = ARTIFACT_JSON,
                     what: str = "an autoglm-export artifact") -> None:
    """Refuse an output directory we must not replace or cannot create, before any work starts.

    Only an empty directory or a previous output of ours (it holds ``marker``) may be replaced;
    anything else is the user's data. The current directory (or one holding it) is never replaced.
    A new directory's nearest existing parent must take a new entry (probed with an empty temp dir).
    """
    out = Path(out)
    if not out.exists():
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{option} {out}: {parent} is a file, not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".autoglm-probe-", dir=parent))
        except OSError as e:
            raise OutputError(f"{option} {out}: cannot create it under {parent}: {e.strerror or e}") from None
        return
    if not out.is_dir():
        raise OutputError(f"{option} {out}: exists and is not a directory")
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise OutputError(f"{option} {out}: is the current directory or contains it; give a new directory name")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise OutputError(
            f"{option} {out}: exists and is not {what} (no {marker}); choose a new directory or remove it yourself"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_siblings(out: Path) -> None:
    """Staging dirs a killed run left beside ``out`` (.NAME.partial-*, .NAME.work-*, .NAME.old-*)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    for kind in ("partial", "work", "old"):
        for p in parent.glob(f".{out.name}.{kind}-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_artifact_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out``; on success it replaces ``out`` atomically.

    ``out`` must be new, empty, or a previous artifact (:func:`check_output_dir`). On any exception the
    temp dir is removed and ``out`` is left as it was. The directory gets the umask's permissions like any
    other output (mkdtemp's are 0700). Staging dirs of a killed earlier run on the same ``out`` are removed.
    """
    out = Path(out)
    check_output_dir(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise OutputError(f"cannot write output directory {out}: {e.strerror or e}") from e
    try:
        yield tmp
        check_output_dir(out)  # nothing of the user's appeared there meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            try:
                os.replace(out, old / "x")
                os.replace(tmp, out)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact_json(root: Path, info: dict[str, Any]) -> None:
    info = dict(info)
    info.setdefault("schema", ARTIFACT_SCHEMA)
    info["files"] = file_hashes(root, list(info.get("files", [])))
    (root / ARTIFACT_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_artifact(path: Path) -> Artifact:
    """Read an artifact directory (or a file inside one) and check its files' hashes exist."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    root = path if path.is_dir() else path.parent
    meta = root / ARTIFACT_JSON
    if not meta.is_file():
        raise ArtifactError(f"{root} is not an artifact directory: no {ARTIFACT_JSON}")
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta}: unreadable artifact description: {e}") from e
    if not isinstance(info, dict):
        raise ArtifactError(f"{meta}: unreadable artifact description: not a JSON object")
    for key in ("target", "recipe", "files", "metadata"):
        if key not in info:
            raise ArtifactError(f"{meta}: missing key '{key}'")
    files = sorted(info["files"])
    for name in files:
        if not (root / name).exists():
            raise ArtifactError(f"{root}: artifact file '{name}' listed in {ARTIFACT_JSON} is missing")
    return Artifact(dir=root, target=info["target"], recipe=info["recipe"], files=files, info=info)


def verify_artifact(art: Artifact) -> None:
    """Before loading: every file's sha256 equals artifact.json's, and the runtimes are the recorded ones.

    A modified or corrupt file is an :class:`ArtifactError` (parity on it would prove nothing); a runtime
    version other than the one the artifact was written with is a warning on the ``autoglm_export`` logger.
    """
    recorded = art.info.get("files", {})
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{art.dir / ARTIFACT_JSON}: 'files' must map file names to their sha256 and size")
    for name, meta in sorted(recorded.items()):
        want = meta.get("sha256") if isinstance(meta, dict) else None
        if not want:
            raise ArtifactError(f"{art.dir / ARTIFACT_JSON}: no sha256 recorded for '{name}'")
        got = file_hashes(art.dir, [name])[name]["sha256"]
        if got != want:
            raise ArtifactError(
                f"{art.dir / name}: sha256 {got[:16]}... does not match artifact.json's {want[:16]}... "
                "(the file was modified or is corrupt); export it again"
            )
    log = logging.getLogger("autoglm_export")
    for package, wrote in sorted((art.info.get("runtime_versions") or {}).items()):
        try:
            have = version(package)
        except PackageNotFoundError:
            continue  # a runtime this session needs and lacks fails to load with its own error; others don't matter
        if have != wrote:
            log.warning(f"{art.dir.name}: written with {package} {wrote}, running with {package} {have}; "
                        "numbers may differ from the export-time check")


# --- measurements every artifact records ----------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_mib() -> dict[str, float]:
    """This process's resident set now, the part of it that is mapped file pages (a checkpoint, a program: the
    kernel can drop them) and its own peak so far (VmRSS, RssFile, VmHWM), in MiB: ru_maxrss would carry a
    parent's peak across fork/exec. Where /proc is missing all fall back to ru_maxrss."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                "file_mib": round(int(status["RssFile"].split()[0]) / 1024, 1),
                "peak_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1)}
    except (OSError, KeyError, ValueError):
        peak = round(peak_rss_mb(), 1)
        return {"rss_mib": peak, "file_mib": 0.0, "peak_mib": peak}


def trim_heap() -> None:
    """Hand the C heap's free memory back to the kernel (glibc's malloc_trim). Freed blocks under malloc's mmap
    threshold, which glibc raises up to 32 MiB as large blocks are freed, stay in the heap and in RSS: a 9B
    method's float32 copy, freed after its export, is mostly such blocks. Call after gc.collect() once a large
    working set is released. A no-op where the C library has no malloc_trim."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def drop_mapped_pages(mm: Any, start: int, stop: int) -> None:
    """Hand the whole pages of a memory mapping inside bytes [start, stop) (page-aligned outward) back to the
    kernel (MADV_DONTNEED): a page read once stays in the process's RSS until then; a read-only or
    never-written mapping simply reads it from the file again. A no-op where the OS lacks MADV_DONTNEED."""
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    last = min(-(-stop // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def runtime_versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in ("torch", *packages):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out
