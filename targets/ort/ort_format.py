"""Mobile: every model in ORT format, the reduced-build operator config, and the mobile usability check.

Every model is converted to ORT format (Fixed optimisation style, ARM target so int8 QDQ stays int8)
with ``required_operators_and_types.config`` for a reduced-size build; a model over the ORT format's
2 GiB flatbuffer limit (fp32 at 9B widths) keeps only its .onnx and the report says so. onnxruntime's
mobile usability check (which ops the NNAPI / Core ML EPs would take) is recorded per model in
``mobile_usability.txt`` and the report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from core.errors import ExportError
from targets.ort.files import model_files
from targets.ort.quiet import quiet

# the ORT format is one flatbuffer: no external data, 2 GiB at most
ORT_FORMAT_LIMIT = 2 << 30
OPS_CONFIG = "required_operators_and_types.config"
USABILITY_TXT = "mobile_usability.txt"


def convert_to_ort(folder: Path) -> str:
    """Every .onnx under ``folder`` -> .ort beside it, plus required_operators_and_types.config.

    Fixed optimisation style (the CPU EP's; NNAPI / Core ML users may prefer
    re-converting with the Runtime style), ARM target: int8 QDQ stays int8.
    A model the converter cannot take is left without .ort (the caller checks).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with quiet() as log:
        convert_onnx_models_to_ort(
            folder,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
            enable_type_reduction=True,
            allow_conversion_failures=True,
        )
    return log.getvalue()


def mobile_usability(path: Path) -> tuple[str, dict[str, Any]]:
    """onnxruntime's mobile usability check on one model: (full log text, short summary)."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
    logger = logging.getLogger(f"autoglm.ort.usability.{path.stem}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with quiet():
            try_eps = usability_checker.analyze_model(path, skip_optimize=False, logger=logger)
    except Exception as e:  # the checker is advisory: record why it could not run
        return f"check failed: {type(e).__name__}: {e}\n", {"checked": False, "error": f"{type(e).__name__}: {e}"}
    text = stream.getvalue()
    summary: dict[str, Any] = {"checked": True, "try_nnapi_or_coreml": bool(try_eps)}
    section = None
    for line in text.splitlines():
        body = line.split(":", 1)[-1].strip()
        low = body.lower()
        if "checking" in low and "nnapi" in low:
            section = "nnapi"
        elif "checking" in low and "coreml" in low:
            section = "coreml_mlprogram" if "mlprogram" in low else "coreml"
        if section and ("partitions" in low or "unsupported ops" in low or "should perform well" in low):
            summary.setdefault(section, []).append(body)
    return text, summary


def write_ort_files(root: Path, files: dict[str, str]) -> dict[str, str]:
    """Convert every model in ``root`` (``files``: method -> .onnx name) to .ort, and write the ops config.

    Returns each method's ORT-format outcome for the report: its .ort, or why a model over the format's
    limit has none. Any other model the converter left without a .ort is an ExportError.
    """
    try:
        with _set_aside(root, [name for name in files.values() if _over_limit(root / name)]):
            log = convert_to_ort(root)
    except Exception as e:
        raise ExportError(f"ORT format conversion of {root} failed: {e}") from e
    ops = root / OPS_CONFIG
    if ops.is_file():  # its header names each model by its staging path: name them by file name
        text = ops.read_text()
        for prefix in {str(root) + os.sep, str(root.resolve()) + os.sep}:
            text = text.replace(prefix, "")
        ops.write_text(text)
    outcome: dict[str, str] = {}
    for m, name in files.items():
        size = sum(p.stat().st_size for p in model_files(root / name))
        if (root / f"{m}.ort").is_file():
            outcome[m] = f"{m}.ort"
        elif size >= ORT_FORMAT_LIMIT:
            outcome[m] = f"not converted: {size / 2**30:.1f} GiB is over the ORT format's 2 GiB limit"
        else:
            why = [ln for ln in log.splitlines() if ln.startswith("Error converting") and f"{m}.onnx" in ln]
            raise ExportError(f"ORT format conversion of {name} failed: {(why or ['no .ort written'])[0]}")
    return outcome


def _over_limit(path: Path) -> bool:
    return sum(p.stat().st_size for p in model_files(path)) >= ORT_FORMAT_LIMIT


@contextlib.contextmanager
def _set_aside(root: Path, names: list[str]):
    """Move models over the ORT format's limit out of ``root`` while the converter runs: it would load each
    (GiBs at 9B, its optimizer's copies on top) only to fail on the flatbuffer's size."""
    aside = root.parent / f".{root.name}.over-ort-limit"
    moved: list[tuple[Path, Path]] = []
    try:
        for name in names:
            for p in model_files(root / name):
                aside.mkdir(exist_ok=True)
                moved.append((p, aside / p.name))
                p.rename(aside / p.name)
        yield
    finally:
        for src, dst in moved:
            dst.rename(src)
        if aside.is_dir():
            aside.rmdir()


def write_usability(root: Path, files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run the mobile usability check on every model; its logs go to mobile_usability.txt (staging paths
    removed), and each method's summary is returned for the report. Models over the ORT format's limit
    (no phone runs them) are not checked: the checker loads and optimizes the whole model in memory."""
    texts, summaries = [], {}
    for m, name in files.items():
        if _over_limit(root / name):
            why = f"not checked: over the ORT format's {ORT_FORMAT_LIMIT >> 30} GiB limit"
            text, summaries[m] = why + "\n", {"checked": False, "error": why}
        else:
            text, summaries[m] = mobile_usability(root / name)
        texts.append(f"=== {name} ===\n{text.replace(str(root) + os.sep, '')}")
    (root / USABILITY_TXT).write_text("\n".join(texts))
    return summaries
