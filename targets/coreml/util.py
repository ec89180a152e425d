"""Two helpers every stage of the Core ML target uses: silencing coremltools, and one-line error causes."""

from __future__ import annotations

import contextlib
import io

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
