"""The Core ML target's two hooks: ``build`` (convert, quantize, combine, finalize the packages) and
``open`` (a session on an artifact). Everything else of an export is targets.lifecycle's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from core.artifact import Artifact
from core.errors import ArtifactError, BadInputError, ExportError
from core.recipes import RecipeName
from targets.coreml import spec as coreml_spec
from targets.coreml.activations import calibration_samples, quantize_activations_int8
from targets.coreml.convert import convert_decoder, convert_method
from targets.coreml.packaging import (
    coreml_programs,
    combine_decoder,
    finalize_package,
    package_bytes,
    save_model,
    weight_bytes,
)
from targets.coreml.session import CoreMLSession, execution_note
from targets.coreml.spec import (
    COMPUTE_PRECISION,
    DECODER_FUNCTIONS,
    DEFAULT_DECODER_FUNCTION,
    DEPLOYMENT_TARGET,
    SPEC,
    decoder_package_names,
    package_name,
    plan_decoder_chunks,
)
from targets.coreml.weights import kept_arrays, quantize_weights_int4, quantize_weights_int8
from targets.coreml.util import temp_packages
from targets.spec import BuildJob, Built


def decoder_chunks(components: Any) -> list[tuple[int, int]]:
    """The decoder's layer ranges, one per package (``spec.plan_decoder_chunks`` on its fp16 weight bytes)."""
    text = components.model.text

    def fp16_bytes(*modules: Any) -> int:
        seen: dict[int, int] = {}
        for m in modules:
            for p in m.parameters():
                seen[id(p)] = 2 * p.numel()
        return sum(seen.values())

    return plan_decoder_chunks([fp16_bytes(layer) for layer in text.layers], fp16_bytes(text.norm, text.lm_head),
                               coreml_spec.DECODER_CHUNK_BYTES)


class CoreMLTarget:
    spec = SPEC

    def build(self, job: BuildJob, staging: Path) -> Built:
        """One package per method into ``staging`` (the decoder: one per chunk when it is split): each
        converted, quantized per the recipe, the decoder's two functions combined into one package, then
        metadata and deterministic bytes (packaging)."""
        t0 = time.perf_counter()
        components, recipe = job.components, job.recipe
        methods = list(components.methods())
        chunks = decoder_chunks(components) if "text_decoder" in methods else []
        split = len(chunks) > 1
        if split and recipe.name == RecipeName.INT8_STATIC:
            raise ExportError(
                f"int8-static on Core ML needs the whole decoder in one package; this one is split into {len(chunks)} "
                f"chunks (its fp16 weights pass {coreml_spec.DECODER_CHUNK_BYTES >> 30} GiB): use int8-weight or int4-weight"
            )
        samples: dict[str, list[dict[str, Any]]] = {}
        if recipe.name == RecipeName.INT8_STATIC:
            samples = calibration_samples(job.calibration, components, methods, job.progress)
        keep_prints = kept_arrays(components.model, recipe.keep_float) if recipe.is_quantized else set()
        meta = {**job.metadata, "deployment_target": DEPLOYMENT_TARGET}
        if recipe.name == RecipeName.INT4_WEIGHT:
            meta["group_size"] = recipe.group_size
        files = {m: [package_name(m)] for m in methods}
        if chunks:
            files["text_decoder"] = decoder_package_names(chunks)
            meta["decoder_chunks"] = [{"package": f, "layers": list(c)} for f, c in zip(files["text_decoder"], chunks)]
        report: dict[str, Any] = {"quantization": {}, "packages": {}}
        convert_s = dict.fromkeys(methods, 0.0)
        # (method, package, the decoder chunk's layers), one per package, built in this order
        packages = [(m, f, c) for m in methods for f, c in zip(files[m], chunks if m == "text_decoder" else [None])]
        entries: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        with temp_packages(job.work / "coremltools-tmp") as clear_temp:
            for done, (method, name, layers) in enumerate(packages):
                job.progress("coreml convert", done, len(packages))
                m0 = time.perf_counter()
                dest = staging / name
                if method == "text_decoder":
                    entry = self._build_decoder(job, keep_prints, samples, dest, report["quantization"],
                                                layers if split else None)
                    if split:
                        entry = {"package": name, "layers": list(layers), **entry}
                else:
                    mlmodel = convert_method(components, method)
                    mlmodel, report["quantization"][method] = self._quantize(job, mlmodel, keep_prints, samples, method, "main")
                    save_model(mlmodel, dest)
                    del mlmodel
                    entry = {"weight_bytes": weight_bytes(dest)}
                finalize_package(dest, meta, method)
                entry["bytes"] = package_bytes(dest)
                entries[method].append(entry)
                convert_s[method] += time.perf_counter() - m0
                clear_temp()  # no in-memory model is in use any more
        for method, es in entries.items():
            report["packages"][method] = es[0] if len(es) == 1 else {
                "chunks": es, "bytes": sum(e["bytes"] for e in es), "weight_bytes": sum(e["weight_bytes"] for e in es)}
        report["convert_s"] = {m: round(t, 2) for m, t in convert_s.items()}
        job.progress("coreml convert", len(packages), len(packages))
        report["total_bytes"] = sum(report["packages"][m]["bytes"] for m in methods)
        report["convert_wall_s"] = round(time.perf_counter() - t0, 2)
        report.update(deployment_target=DEPLOYMENT_TARGET, compute_precision=COMPUTE_PRECISION,
                      execution_on_this_host=execution_note())
        return Built(files=[f for m in methods for f in files[m]], programs=coreml_programs(staging, files),
                     report=report, metadata=meta)

    def _build_decoder(self, job: BuildJob, keep_prints: set[tuple], samples: dict[str, list[dict[str, Any]]],
                       dest: Path, quantization: dict[str, Any], layers: tuple[int, int] | None) -> dict[str, Any]:
        """text_decoder (or the chunk ``layers`` of it): ``prefill`` and ``decode`` converted and quantized apart
        (same deterministic weights, so the combined package keeps one copy), then saved as one multifunction
        package at ``dest``."""
        method = "text_decoder"
        key = method if layers is None else f"{method}[{layers[0]}:{layers[1]}]"
        parts = {}
        for function in DECODER_FUNCTIONS:
            mlmodel = convert_decoder(job.components, function, layers)
            mlmodel, quantization[f"{key}.{function}"] = self._quantize(job, mlmodel, keep_prints, samples, method, function)
            parts[function] = job.work / f"{dest.stem}.{function}.mlpackage"
            save_model(mlmodel, parts[function])
            del mlmodel
        combine_decoder(parts["prefill"], parts["decode"], dest)
        per_function = {f: weight_bytes(p) for f, p in parts.items()}
        for p in parts.values():  # the combined package holds their weights once
            shutil.rmtree(p, ignore_errors=True)
        return {
            "functions": list(DECODER_FUNCTIONS),
            "default_function": DEFAULT_DECODER_FUNCTION,
            "weight_bytes": weight_bytes(dest),
            "weight_bytes_per_function": per_function,
        }

    def _quantize(self, job: BuildJob, mlmodel: Any, keep_prints: set[tuple], samples: dict[str, list[dict[str, Any]]],
                  method: str, function: str) -> tuple[Any, dict[str, Any]]:
        """``mlmodel`` as the recipe stores it, and what was quantized."""
        name = job.recipe.name
        if name == RecipeName.FP16:
            return mlmodel, {}
        if name == RecipeName.INT4_WEIGHT:
            return quantize_weights_int4(mlmodel, keep_prints, job.recipe.group_size)
        report: dict[str, Any] = {}
        if name == RecipeName.INT8_STATIC:
            mlmodel, areport = quantize_activations_int8(mlmodel, keep_prints, samples[method], method, function, job.work)
            report.update(areport)
        mlmodel, wreport = quantize_weights_int8(mlmodel, keep_prints)
        report.update(wreport)
        return mlmodel, report

    def open(self, artifact: Artifact, variant: str | None = None) -> CoreMLSession:
        """A session on ``artifact``'s packages (Core ML on macOS, else the NumPy interpreter)."""
        if artifact.target != SPEC.name:
            raise ArtifactError(f"{artifact.dir}: a '{artifact.target}' artifact, not a Core ML one")
        if variant is not None:
            raise BadInputError(f"a Core ML artifact has one form; there is no variant '{variant}'")
        return CoreMLSession(artifact)
