"""Two helpers every stage of the Core ML target uses: silencing coremltools, and one-line error causes."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence coremltools' progress bars, warnings and INFO logs (conversion prints pages of them)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("", "coremltools", "torch.export")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield buf
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def error_cause(e: BaseException) -> str:
    """The last line of an exception's message (its type name when it has none).

    coremltools and torch put context (the op being converted, a traceback-like trail) first and
    the cause last, so the last line is the one a one-line error message should carry.
    """
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
