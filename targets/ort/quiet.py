"""Silencing the exporters and onnxruntime's tools, which print, warn and log at INFO on every call."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

# the loggers the torch.onnx export, onnxruntime's quantizers and its ORT-format converter write to
LOGGERS = ("", "torch.onnx", "torch.export", "onnxscript", "ort_format_model.utils",
           "onnxruntime.quantization.matmul_nbits_quantizer")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' chatter (stdout/stderr prints, warnings, INFO logs); yields what was printed,
    which the ORT-format conversion reads back for its per-model errors."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in LOGGERS]
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
