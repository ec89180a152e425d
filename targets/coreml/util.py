"""Helpers every stage of the Core ML target uses: silencing coremltools, one-line error causes, and a
directory of its own for coremltools' temporary packages."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from targets.base import quiet as base_quiet


def quiet() -> contextlib.AbstractContextManager[io.StringIO]:
    """Silence coremltools' progress bars, warnings and INFO logs (conversion prints pages of them)."""
    return base_quiet(("", "coremltools", "torch.export"))


def error_cause(e: BaseException) -> str:
    """The last line of an exception's message (its type name when it has none).

    coremltools and torch put context (the op being converted, a traceback-like trail) first and
    the cause last, so the last line is the one a one-line error message should carry.
    """
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


@contextlib.contextmanager
def temp_packages(where: Path) -> Iterator[Callable[[], None]]:
    """coremltools' temporary packages (one per converted or compressed in-memory model, and copies its
    passes make, all kept until the process exits) go under ``where`` while the build runs; yields a
    function that removes all of them, for when no in-memory model is in use any more (after each saved
    package: the 9B's would otherwise fill the disk)."""
    where.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(where)

    def clear() -> None:
        for p in where.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    try:
        yield clear
    finally:
        tempfile.tempdir = before
        clear()
