"""The Core ML target's two hooks: ``build`` (convert, quantize, combine, finalize the packages) and
``open`` (a session on an artifact). Everything else of an export is targets.lifecycle's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.artifact import Artifact
from core.errors import ArtifactError, BadInputError
from core.recipes import RecipeName
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
    package_name,
)
from targets.coreml.weights import kept_arrays, quantize_weights_int4, quantize_weights_int8
from targets.spec import BuildJob, Built


class CoreMLTarget:
    spec = SPEC

    def build(self, job: BuildJob, staging: Path) -> Built:
        """One package per method into ``staging``: each converted, quantized per the recipe, the decoder's
        two functions combined into one package, then metadata and deterministic bytes (packaging)."""
        t0 = time.perf_counter()
        components, recipe = job.components, job.recipe
        methods = list(components.methods())
        samples: dict[str, list[dict[str, Any]]] = {}
        if recipe.name == RecipeName.INT8_STATIC:
            samples = calibration_samples(job.calibration, components, methods, job.progress)
        keep_prints = kept_arrays(components.model, recipe.keep_float) if recipe.is_quantized else set()
        meta = {**job.metadata, "deployment_target": DEPLOYMENT_TARGET}
        if recipe.name == RecipeName.INT4_WEIGHT:
            meta["group_size"] = recipe.group_size
        report: dict[str, Any] = {"quantization": {}, "convert_s": {}, "packages": {}}
        steps = len(methods)
        for i, method in enumerate(methods):
            job.progress("coreml convert", i, steps)
            m0 = time.perf_counter()
            dest = staging / package_name(method)
            if method == "text_decoder":
                report["packages"][method] = self._build_decoder(job, keep_prints, samples, dest, report["quantization"])
            else:
                mlmodel = convert_method(components, method)
                mlmodel, report["quantization"][method] = self._quantize(job, mlmodel, keep_prints, samples, method, "main")
                save_model(mlmodel, dest)
                del mlmodel
                report["packages"][method] = {"weight_bytes": weight_bytes(dest)}
            finalize_package(dest, meta, method)
            report["packages"][method]["bytes"] = package_bytes(dest)
            report["convert_s"][method] = round(time.perf_counter() - m0, 2)
        job.progress("coreml convert", steps, steps)
        report["total_bytes"] = sum(report["packages"][m]["bytes"] for m in methods)
        report["convert_wall_s"] = round(time.perf_counter() - t0, 2)
        report.update(deployment_target=DEPLOYMENT_TARGET, compute_precision=COMPUTE_PRECISION,
                      execution_on_this_host=execution_note())
        return Built(files=[package_name(m) for m in methods], programs=coreml_programs(staging, methods),
                     report=report, metadata=meta)

    def _build_decoder(self, job: BuildJob, keep_prints: set[tuple], samples: dict[str, list[dict[str, Any]]],
                       dest: Path, quantization: dict[str, Any]) -> dict[str, Any]:
        """text_decoder: ``prefill`` and ``decode`` converted and quantized apart (same deterministic weights,
        so the combined package keeps one copy), then saved as one multifunction package at ``dest``."""
        method = "text_decoder"
        parts = {}
        for function in DECODER_FUNCTIONS:
            mlmodel = convert_decoder(job.components, function)
            mlmodel, quantization[f"{method}.{function}"] = self._quantize(job, mlmodel, keep_prints, samples, method, function)
            parts[function] = job.work / f"{method}.{function}.mlpackage"
            save_model(mlmodel, parts[function])
            del mlmodel
        combine_decoder(parts["prefill"], parts["decode"], dest)
        return {
            "functions": list(DECODER_FUNCTIONS),
            "default_function": DEFAULT_DECODER_FUNCTION,
            "weight_bytes": weight_bytes(dest),
            "weight_bytes_per_function": {f: weight_bytes(p) for f, p in parts.items()},
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
