"""The ONNX Runtime target's two hooks: build the programs into the staging directory, open a session.

``build`` does only what is ORT's; the driver (targets.lifecycle.export) checks the recipe and
``--out``, copies the tokenizer files, runs the export check on what ``build`` wrote (the .ort files,
``Built.check_variant``) and writes artifact.json. The steps:

1. ``torch.onnx.export(dynamo=True)`` of one small graph module per method (targets/ort/graphs.py),
   nodes named after the model module they came from (``--keep-float`` selects by that name);
2. the recipe's quantizer on each model (:data:`QUANTIZERS`), then the metadata (``autoglm.*``) into
   every model's ``metadata_props``;
3. ORT format, the reduced-build operator config and the mobile usability check (ort_format.py);
4. ``genai_config.json`` for onnxruntime-genai (genai.py);
5. the report: quantization counts, ORT-format outcome, usability, sizes, each model's I/O, and what
   onnxruntime-genai runs (``report.genai``, which reads the tokenizer files the driver copied).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.artifact import Artifact
from core.recipes import RecipeName
from targets.ort.files import load_model, model_files, save_model, set_metadata
from targets.ort.genai import GENAI_CONFIG, genai_config, genai_usage
from targets.ort.graphs import export_onnx, graph_io, method_feeds
from targets.ort.ort_format import OPS_CONFIG, USABILITY_TXT, write_ort_files, write_usability
from targets.ort.programs import onnx_programs
from targets.ort.quantize_int4 import INT4_ACCURACY_LEVEL, check_block_size, quantize_nbits
from targets.ort.quantize_int8 import quantize_weights
from targets.ort.session import OrtSession
from targets.ort.spec import SPEC
from targets.ort.static import calibration_feeds, quantize_static_model
from targets.ort.streaming import (STREAM_ABOVE_BYTES, MiniQuantizer, export_streamed, float32_module, float_bytes,
                                   release_pages_after_use)
from targets.spec import BuildJob, Built

Feeds = dict[str, list[dict[str, np.ndarray]]]
# (job, method, raw exported .onnx, final .onnx path, calibration feeds) -> the method's quantization report
Quantizer = Callable[[BuildJob, str, Path, Path, Feeds], dict[str, Any] | None]


def _as_exported(job: BuildJob, method: str, raw: Path, final: Path, feeds: Feeds) -> None:
    """fp32: the exported model as it is (re-saved: external data where large)."""
    save_model(load_model(raw), final)


def _weight_only(job: BuildJob, model: Any) -> tuple[Any, dict[str, Any]]:
    """int8-weight / int4-weight on a loaded model (a whole method, or one streamed node): MatMulNBits blocks of
    --group-size (int4-weight always, int8-weight when a group size is given), else int8 per-channel DQ weights."""
    embeddings = job.spec.scheme.embedding_bits == 8
    if job.recipe.group_size:
        return quantize_nbits(model, job.recipe.group_size, job.recipe.keep_float, int8_embeddings=embeddings,
                              bits=job.spec.scheme.weight_bits)
    return model, quantize_weights(model, gathers=embeddings, keep=job.recipe.keep_float)


def _weight_only_method(job: BuildJob, method: str, raw: Path, final: Path, feeds: Feeds) -> dict[str, Any]:
    model, counts = _weight_only(job, load_model(raw))
    save_model(model, final)
    return counts


def _int8_static(job: BuildJob, method: str, raw: Path, final: Path, feeds: Feeds) -> dict[str, int]:
    quantize_static_model(raw, final, feeds[method], job.work, keep=job.recipe.keep_float,
                          int8_embeddings=job.spec.scheme.embedding_bits == 8,
                          activation_range=job.spec.activation_range(job.recipe))
    return {"calibration_samples": len(feeds[method])}


QUANTIZERS: dict[RecipeName, Quantizer] = {
    RecipeName.FP32: _as_exported,
    RecipeName.INT8_WEIGHT: _weight_only_method,
    RecipeName.INT8_STATIC: _int8_static,
    RecipeName.INT4_WEIGHT: _weight_only_method,
}


# the streamed decoder's quantizers: the same functions on a one-node model (targets/ort/streaming.py);
# int8-static has none (its calibration quantizes the whole loaded model)
def _stream_as_is(job: BuildJob) -> MiniQuantizer:
    return lambda mini: (mini, {})


def _stream_weight_only(job: BuildJob) -> MiniQuantizer:
    def quantize(mini):
        model, counts = _weight_only(job, mini)
        return model, {k: v for k, v in counts.items() if k not in NBITS_SETTINGS}
    return quantize


# quantize_nbits's counts that are settings, not counts (reported once, not summed over the streamed nodes)
NBITS_SETTINGS = ("block_size", "accuracy_level", "bits")

# the methods whose weights stream (all: the 9B's vision encoder alone, 0.6B, took 17 GB through the whole path)
STREAMED_METHODS = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")

STREAM_QUANTIZERS: dict[RecipeName, Callable[[BuildJob], MiniQuantizer]] = {
    RecipeName.FP32: _stream_as_is,
    RecipeName.INT8_WEIGHT: _stream_weight_only,
    RecipeName.INT4_WEIGHT: _stream_weight_only,
}


class OrtTarget:
    """``stream_above``: the text decoder and the token embedding are exported weight by weight
    (targets/ort/streaming.py) when their fp32 weights would exceed this many bytes (and the recipe can
    stream); the other methods, and smaller models, take the whole-model path."""

    spec = SPEC  # reads_stored_weights: each method is traced in fp32 here, one at a time, large ones streamed

    def __init__(self, stream_above: int = STREAM_ABOVE_BYTES):
        self.stream_above = stream_above

    def streams(self, job: BuildJob, method: str) -> bool:
        """Whether ``method`` is exported weight by weight in this job."""
        return (method in STREAMED_METHODS and job.recipe.name in STREAM_QUANTIZERS
                and float_bytes(_traced_module(job.components, method)) > self.stream_above)

    def build(self, job: BuildJob, staging: Path) -> Built:
        """Every method as .onnx (quantized per the recipe) and .ort in ``staging``, plus the ops config, the
        usability log and genai_config.json. Everything the user can get wrong is checked before the first export."""
        config = job.components.config
        methods = list(graph_io(config))
        scheme = job.spec.scheme
        quantize = QUANTIZERS[job.recipe.name]
        if job.recipe.group_size:
            check_block_size(job.recipe.group_size, job.recipe.name.value)
        feeds: Feeds = {}
        if scheme.activations == "static":
            feeds = calibration_feeds(job.calibration, job.components, methods, job.progress)
        meta = dict(job.metadata)
        if job.recipe.group_size:
            meta["group_size"] = job.recipe.group_size
        props = {f"autoglm.{k}": v for k, v in meta.items()}
        steps, done = len(methods) * 2 + 2, 0
        files: dict[str, str] = {}
        quantization: dict[str, Any] = {}
        for m in methods:
            job.progress("onnx export", done, steps)
            final = staging / f"{m}.onnx"
            if self.streams(job, m):
                counts = _export_streamed(job, m, final)
                done += 1
            else:
                raw = job.work / f"{m}.onnx"
                with float32_module(_traced_module(job.components, m)):
                    export_onnx(job.components, m, raw, job.recipe.keep_float)
                done += 1
                job.progress("onnx export", done, steps)
                counts = quantize(job, m, raw, final, feeds)
                raw.unlink()
                Path(str(raw) + ".data").unlink(missing_ok=True)
            if counts is not None:
                quantization[m] = counts
            set_metadata(final, {"autoglm.method": m, **props})
            files[m] = final.name
            done += 1
            gc.collect()  # the previous model's protobuf before the next export (GiBs at 9B widths)
        job.progress("onnx export", done, steps)
        ort_format = write_ort_files(staging, files)
        job.progress("onnx export", done + 1, steps)
        usability = write_usability(staging, files)
        (staging / GENAI_CONFIG).write_text(json.dumps(genai_config(config, files), indent=4) + "\n")
        listed = _listed(staging, files)
        io_ = graph_io(config)
        report = {
            "quantization": quantization,
            "mobile_usability": usability,
            "ort_format": ort_format,
            "onnx_bytes": sum(p.stat().st_size for m in methods for p in model_files(staging / files[m])),
            "ort_bytes": sum((staging / f"{m}.ort").stat().st_size for m in methods if (staging / f"{m}.ort").is_file()),
            "models": {m: {"onnx": files[m], "ort": f"{m}.ort", "inputs": io_[m][0], "outputs": io_[m][1]} for m in methods},
            "ops_config": OPS_CONFIG,
            "genai_config": GENAI_CONFIG,
            "genai": genai_usage(config, job.tokenizer_files),
        }
        job.progress("onnx export", steps, steps)
        every_ort = all((staging / f"{m}.ort").is_file() for m in methods)
        # the export check runs the eager reference next: a mapped 9B's pages leave RSS after each module's use
        release_pages_after_use(job.components.model)
        return Built(files=listed, programs=onnx_programs(staging, methods), report=report, metadata=meta,
                     check_variant="ort" if every_ort else "onnx")

    def open(self, artifact: Artifact, variant: str | None = None) -> OrtSession:
        """The artifact's .onnx files (``variant`` None or "onnx") or its .ort files ("ort": what a phone runs)."""
        return OrtSession(artifact, variant or "onnx")

    def blocks(self, artifact: Artifact, method: str, sample: dict[str, np.ndarray], block_inputs: list[np.ndarray],
               progress: Any = None) -> dict[str, Any]:
        """Blockwise parity's hook: ``method``'s blocks isolated and accumulated (targets/ort/blocks.py), on one
        recorded runner call ``sample`` and the reference's input to each block."""
        from exporter.model.config import ModelConfig
        from targets.ort.blocks import run_blocks

        config = ModelConfig.from_dict(artifact.metadata["model"])
        return run_blocks(artifact, method, method_feeds(method, sample, config), block_inputs, progress)


def _traced_module(components: Any, method: str) -> Any:
    """The model module ``method``'s graph reads its weights from (what is upcast while it is traced)."""
    if method == "text_decoder":
        return components.model.text
    return components.methods()[method]


def _export_streamed(job: BuildJob, method: str, final: Path) -> dict[str, Any]:
    """``method`` through targets/ort/streaming.py; its report counts as the whole path's, plus how."""
    def progress(done: int, total: int) -> None:
        job.progress(f"onnx stream {method}", done, total)

    counts: dict[str, Any] = export_streamed(job.components, method, final, STREAM_QUANTIZERS[job.recipe.name](job), progress,
                                             keep=job.recipe.keep_float)
    if job.recipe.group_size:
        counts.update(block_size=job.recipe.group_size, accuracy_level=INT4_ACCURACY_LEVEL,
                      bits=job.spec.scheme.weight_bits)
    counts["streamed"] = True
    return counts


def _listed(root: Path, files: dict[str, str]) -> list[str]:
    """artifact.json's files, in the order they have always been listed: per method its .onnx, external data
    and .ort, then the ops config, the usability log and genai_config.json (the driver adds the tokenizer's)."""
    listed: list[str] = []
    for m, name in files.items():
        listed += [p.name for p in model_files(root / name)]
        if (root / f"{m}.ort").is_file():
            listed.append(f"{m}.ort")
    return listed + [OPS_CONFIG, USABILITY_TXT, GENAI_CONFIG]
