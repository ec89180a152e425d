"""Silencing the exporters and onnxruntime's tools, which print, warn and log at INFO on every call."""

from __future__ import annotations

import contextlib
import io

from targets.base import quiet as base_quiet

# the loggers the torch.onnx export, onnxruntime's quantizers and its ORT-format converter write to
LOGGERS = ("", "torch.onnx", "torch.export", "onnxscript", "ort_format_model.utils",
           "onnxruntime.quantization.matmul_nbits_quantizer")


def quiet() -> contextlib.AbstractContextManager[io.StringIO]:
    """Silence the exporters' chatter (stdout/stderr prints, warnings, INFO logs); yields what was printed,
    which the ORT-format conversion reads back for its per-model errors."""
    return base_quiet(LOGGERS)
