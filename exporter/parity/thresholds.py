"""Parity thresholds: the defaults per recipe (core.recipes) and the METHOD.METRIC keys users override."""

from __future__ import annotations

from core.errors import ConfigError
from core.recipes import RECIPES

REPORT_SCHEMA = "autoglm-export/parity-report"
REPORT_SCHEMA_VERSION = 1
METRICS_MIN = ("cosine", "sqnr_db")  # higher is better
METRICS_MAX = ("max_abs", "mean_abs")  # lower is better
DECODER_METRICS = ("top1_agreement", "greedy_match")


# Defaults per recipe: core.recipes (each RecipeDef's parity_thresholds; tiny random weights for the quantized ones)
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {n.value: dict(d.parity_thresholds) for n, d in RECIPES.items()}


def thresholds_for(recipe: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """The recipe's default thresholds with ``overrides`` applied (validated)."""
    out = dict(DEFAULT_THRESHOLDS.get(recipe, {"*.cosine": 0.97}))
    for key, value in (overrides or {}).items():
        _check_threshold_key(key)
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"threshold '{key}': value {value!r} is not a number") from None
    return out


def _check_threshold_key(key: str) -> None:
    scope, _, metric = key.partition(".")
    ok = (scope == "decoder" and metric in DECODER_METRICS) or (
        scope and metric in METRICS_MIN + METRICS_MAX
    )
    if not ok:
        raise ConfigError(
            f"threshold '{key}': expected METHOD.METRIC with METRIC in "
            f"{', '.join(METRICS_MIN + METRICS_MAX)} (METHOD may be '*'), or decoder.top1_agreement / decoder.greedy_match"
        )
