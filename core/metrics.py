"""How two tensors are compared: the numbers parity, the export check and the sensitivity search report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """max abs, mean abs, cosine and SQNR (dB) of ``out`` against ``ref`` (flattened, float64)."""
    ref = np.asarray(ref, np.float64).ravel()
    out = np.asarray(out, np.float64).ravel()
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference has {ref.size} values, artifact {out.size}")
    diff = out - ref
    noise = float(np.dot(diff, diff))
    signal = float(np.dot(ref, ref))
    denom = math.sqrt(signal) * math.sqrt(float(np.dot(out, out)))
    cosine = float(np.dot(ref, out) / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
    if not np.all(np.isfinite(out)):
        return {"max_abs": None, "mean_abs": None, "cosine": None, "sqnr_db": None, "finite": False}
    return {
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "cosine": cosine,
        # None = exact (infinite SQNR); JSON has no infinity
        "sqnr_db": 10.0 * math.log10(max(signal, 1e-300) / noise) if noise > 0 else None,
        "finite": True,
    }


def relative_l2(m: dict[str, Any]) -> float | None:
    """|artifact - reference| / |reference| of a :func:`compare` result, from its SQNR (None if not finite)."""
    if not m["finite"]:
        return None
    return 0.0 if m["sqnr_db"] is None else 10.0 ** (-m["sqnr_db"] / 20.0)


def aggregate(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst case over calls (mean abs averaged weighted by size)."""
    if any(not c["finite"] for c in calls):
        return {"max_abs": None, "mean_abs": None, "cosine": None, "sqnr_db": None, "finite": False}
    n = sum(c["n"] for c in calls)
    sq = [c["sqnr_db"] for c in calls if c["sqnr_db"] is not None]
    return {
        "max_abs": max(c["max_abs"] for c in calls),
        "mean_abs": sum(c["mean_abs"] * c["n"] for c in calls) / max(n, 1),
        "cosine": min(c["cosine"] for c in calls),
        "sqnr_db": min(sq) if sq else None,
        "finite": True,
    }
