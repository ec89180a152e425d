"""Numerical parity: an artifact against the PyTorch reference, through the same runner.

Both sides are :class:`core.artifact.Session` objects driven by the shared
host runner on the same held-out inputs (never the calibration set):

1. per method: each segment's input (prompt token ids, pixels, mel) goes
   through ``token_embedding`` / ``vision_encoder`` / ``audio_encoder`` of
   both sessions; the decoder of both sessions is then fed the *reference*
   embeddings of every prompt segment and of the reference's greedy tokens,
   so ``text_decoder`` is judged on identical inputs. Metrics: max abs, mean
   abs, cosine, SQNR (dB), worst over calls.
2. end to end: both runners decode greedily for N steps (tokens compared,
   first diverging position), and the artifact is teacher-forced on the
   reference's prompt + continuation (its own embeddings this time) for
   per-position top-1 agreement.

Every number carries the provenance of the session that produced it (a
Core ML session on Linux is an emulation and says so).

Threshold keys: ``METHOD.METRIC`` (``*`` = every method; metrics ``cosine``,
``sqnr_db`` are minimums, ``max_abs``, ``mean_abs`` maximums) and
``decoder.top1_agreement`` / ``decoder.greedy_match`` (fractions, minimums).
"""

from __future__ import annotations

from core.metrics import aggregate, compare
from exporter.parity.comparison import compare_sessions, evaluate, for_model
from exporter.parity.inputs import Item, read_inputs
from exporter.parity.reports import render_html, render_junit, write_reports
from exporter.parity.run import check, make_report, run_parity, summary_lines
from exporter.parity.thresholds import (
    DECODER_METRICS,
    DEFAULT_THRESHOLDS,
    METRICS_MAX,
    METRICS_MIN,
    REPORT_SCHEMA,
    REPORT_SCHEMA_VERSION,
    thresholds_for,
)

__all__ = [
    "DECODER_METRICS", "DEFAULT_THRESHOLDS", "METRICS_MAX", "METRICS_MIN", "REPORT_SCHEMA", "REPORT_SCHEMA_VERSION",
    "Item", "aggregate", "check", "compare", "compare_sessions", "evaluate", "for_model", "make_report", "read_inputs",
    "render_html", "render_junit", "run_parity", "summary_lines", "thresholds_for", "write_reports",
]
