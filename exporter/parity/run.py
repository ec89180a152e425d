"""The entry point: parity of one artifact (reference rebuilt from its recorded source), its report and verdict."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from core.artifact import Progress
from core.errors import BadInputError, ConfigError, ParityFailure
from exporter.parity import blockwise as blocks
from exporter.parity.comparison import compare_sessions, evaluate, for_model, reference_pass
from exporter.parity.inputs import Item, default_inputs, refuse_calibration_set, read_inputs
from exporter.parity.reports import failure_text, fmt, fmt_db, write_reports
from exporter.parity.thresholds import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, thresholds_for


def run_parity(
    artifact_dir: Path,
    inputs: Path | None = None,
    out_dir: Path | None = None,
    thresholds: dict | None = None,
    steps: int = 32,
    progress: Progress | None = None,
    calibration_manifest: Path | None = None,
    blockwise: bool = False,
) -> dict:
    """Parity of one artifact; writes report.json, report.html and junit.xml; returns the report.

    ``calibration_manifest``: the set the artifact was calibrated on (default: the built-in one);
    parity refuses inputs that overlap it. ``blockwise``: also each block of the artifact against the
    reference's (exporter/parity/blockwise.py), in the report's ``blockwise`` section.
    """
    from core.components import build_components
    from exporter.model.config import ModelConfig
    from core.runner import EagerSession, load_tokenizer
    from targets import get_target
    from core.artifact import check_output_dir, read_artifact, verify_artifact

    if steps < 1:
        raise BadInputError(f"--steps {steps}: must be at least 1")
    if not Path(artifact_dir).is_dir():
        from core.errors import ArtifactError

        raise ArtifactError(f"artifact directory not found: {artifact_dir}")
    art = read_artifact(Path(artifact_dir))
    verify_artifact(art)  # parity of a modified file would prove nothing
    config = ModelConfig.from_dict(art.metadata["model"])
    if blockwise:
        blocks.check_supported(art.target)
    limits = thresholds_for(art.recipe, thresholds)
    methods = [m for m, on in (("token_embedding", True), ("vision_encoder", config.vision), ("audio_encoder", config.audio),
                               ("text_decoder", True)) if on]
    for key in (thresholds or {}):
        scope = key.partition(".")[0]
        if scope not in ("*", "decoder", *methods):
            raise ConfigError(f"--threshold '{key}': this artifact has no method '{scope}'; its methods: {', '.join(methods)}")
    out_dir = Path(out_dir) if out_dir else art.dir / "parity"
    check_output_dir(out_dir, marker="report.json", what="a parity report directory")
    inputs = Path(inputs) if inputs else default_inputs()
    items = read_inputs(inputs)
    refuse_calibration_set(items, inputs, calibration_manifest)
    items, input_notes = for_model(items, config)
    tok_path = art.dir / "tokenizer.json"
    if not tok_path.is_file():
        from core.errors import ArtifactError

        raise ArtifactError(f"{art.dir}: no tokenizer.json in the artifact")
    tokenizer = load_tokenizer(config, tok_path)

    # the reference first, then the artifact: at 9B the eager model's working set (the mapped checkpoint
    # pages each layer reads) and the artifact's weights do not fit in memory together
    reference = EagerSession(build_components(reference_model(art, config)))
    reference_provenance = reference.provenance
    refs = reference_pass(reference, config, tokenizer, items, steps, progress)
    if blockwise:
        block_item = blocks.pick_item(items)
        captures = blocks.capture(reference, config, tokenizer, block_item)
    del reference
    gc.collect()
    session = get_target(art.target).open(art)
    artifact_info = {
        "dir": str(art.dir),
        "target": art.target,
        "recipe": art.recipe,
        "model": config.name,
        "files": art.info.get("files", {}),
        "source": art.metadata.get("source"),
        "input_notes": input_notes,
    }
    report = make_report(artifact_info, refs, session, config, tokenizer, items, inputs, limits, steps, progress,
                         reference_provenance=reference_provenance)
    if blockwise:
        del session  # one artifact resident at a time: the block graphs open after the whole program closes
        gc.collect()
        report["blockwise"] = blocks.compare_blocks(get_target(art.target), art, captures, block_item, progress)
    write_reports(report, out_dir)
    return report


def make_report(
    artifact_info: dict[str, Any],
    reference: Any,
    session: Any,
    config: Any,
    tokenizer: Any,
    items: list[Item],
    inputs: Path,
    limits: dict[str, float],
    steps: int = 32,
    progress: Progress | None = None,
    reference_provenance: str | None = None,
) -> dict[str, Any]:
    """Compare ``session`` with ``reference`` (a session, or its :func:`reference_pass`) and assemble the
    versioned report (nothing written)."""
    t0 = time.perf_counter()
    results = compare_sessions(reference, session, config, tokenizer, items, steps=steps, progress=progress)
    checks = evaluate(results, limits)
    failed = [c for c in checks if not c["passed"]]
    provenance = str(getattr(session, "provenance", artifact_info.get("target")))
    emulated = "emulat" in provenance.lower()
    report = {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "artifact": artifact_info,
        "provenance": {
            "artifact": provenance,
            "reference": reference_provenance or reference.provenance,
            "artifact_numbers": "emulated" if emulated else "real runtime",
            "note": (
                f"every artifact-side number below was obtained from: {provenance}"
                + ("; it is an emulation on this host, not the device runtime" if emulated else "")
            ),
        },
        "inputs": {"manifest": str(inputs), "items": len(items), "steps": steps},
        "thresholds": limits,
        "metric_definitions": {
            "max_abs": "max |artifact - reference| over all elements",
            "mean_abs": "mean |artifact - reference|",
            "cosine": "cosine similarity of the flattened outputs (float64)",
            "sqnr_db": "10 log10(sum ref^2 / sum (artifact - ref)^2); null = exact",
            "aggregation": "per method: worst call (max of max_abs, min of cosine and SQNR); mean_abs averaged over elements",
        },
        **results,
        "checks": checks,
        "passed": not failed,
        "failures": [failure_text(c) for c in failed],
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    report["summary"] = _summary(report)
    return report


def reference_model(art: Any, config: Any):
    from exporter.reference import load_reference

    source = art.metadata.get("source")
    if not source:
        from core.errors import ArtifactError

        raise ArtifactError(
            f"{art.dir}: artifact.json has no metadata.source (where the weights came from); re-export it with this version"
        )
    model = load_reference(preset=source.get("preset"), checkpoint=source.get("checkpoint"), layers=source.get("layers"))
    expected = model.config
    if art.metadata.get("compression"):  # compared with the unpruned model: the report shows what pruning costs
        from exporter.compress import compressed_config

        expected = compressed_config(model.config, art.metadata["compression"])
    if expected.to_dict() != config.to_dict():
        from core.errors import ArtifactError

        raise ArtifactError(f"{art.dir}: the reference rebuilt from {source} does not have the artifact's model config")
    return model




def _summary(report: dict[str, Any]) -> str:
    a = report["artifact"]
    head = f"{a['target']}/{a['recipe']}: {'PASS' if report['passed'] else 'FAIL'}"
    if report["failures"]:
        head += " — " + "; ".join(report["failures"])
    return head


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    lines = [report["summary"], f"numbers from: {report['provenance']['artifact']} ({report['provenance']['artifact_numbers']})"]
    for name, m in report["methods"].items():
        lines.append(
            f"  {name:16s} max_abs {fmt(m['max_abs'])}  mean_abs {fmt(m['mean_abs'])}  "
            f"cosine {fmt(m['cosine'], 6)}  sqnr {fmt_db(m['sqnr_db'])}  ({m['calls']} calls)"
        )
    d = report["decoder"]
    lines.append(f"  decoder          top-1 agreement {d['top1_agreement']:.4f}  greedy match {d['greedy_match']:.4f} over {d['steps']} steps")
    if "perplexity_reference" in d:
        lines.append(
            f"  held-out text    perplexity {d['perplexity_reference']:.3f} -> {d['perplexity_artifact']:.3f} "
            f"({100 * d['perplexity_change']:+.2f}%)"
        )
    if "blockwise" in report:
        lines += blocks.lines(report["blockwise"])
    return lines


def check(report: dict) -> None:
    """Raise ParityFailure naming each failed method and metric."""
    if report.get("passed"):
        return
    failed = [c for c in report.get("checks", []) if not c["passed"]]
    a = report.get("artifact", {})
    raise ParityFailure(
        f"parity failed for {a.get('target')}/{a.get('recipe')} ({a.get('dir')}): " + "; ".join(failure_text(c) for c in failed),
        failures=[c["name"] for c in failed],
    )
