"""The ExecuTorch target's two hooks: ``build`` writes model.pte into the staging directory, ``open``
runs it in ExecuTorch's Python runtime. Everything else of an export (recipe and --out checks, the
tokenizer files, the export check against eager, artifact.json, the atomic directory) is
targets.lifecycle.export's.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch

from calibration.stats import resolve_method_inputs
from core.artifact import Artifact, memory_mib, trim_heap
from core.errors import ArtifactError, BadInputError, ExportError
from exporter.model.upcast import as_float32, float_bytes, release_pages
from targets.base import method_signatures
from targets.executorch.lower import check_lowering, lower, lowering_report, to_executorch
from targets.executorch.program import (
    check_marker_in_program,
    check_marker_unique,
    constant_methods,
    export_module,
    image_start_row,
    program_modules,
)
from targets.executorch.program_io import read_program_io, user_input_names
from targets.executorch.quantize import piece_quantizer, quantize_method
from targets.executorch.session import ExecuTorchSession
from targets.executorch.spec import PTE, SPEC
from targets.executorch.streaming import STREAM_ABOVE_BYTES, stream_decoder
from targets.spec import BuildJob, Built

KERNELS = ("XNNPACK delegate + portable kernels + ExecuTorch's LLM custom ops (its custom_ops library: "
           "llama::update_cache, llama::custom_sdpa)")
KERNELS_INT8_EMBEDDING = (f"{KERNELS}; int8 embeddings need ExecuTorch's quantized_ops_lib "
                          "(quantized_decomposed::embedding_byte) linked into the app")


class _Steps:
    """The build's progress bar and its per-step wall times (report["timings_s"])."""

    def __init__(self, progress: Callable[[str, int, int], None], total: int, timings: dict[str, float],
                 memory: dict[str, dict[str, float]]):
        self.progress, self.total, self.timings, self.memory, self.done = progress, total, timings, memory, 0
        self.t = time.perf_counter()
        progress("executorch export", 0, total)

    def step(self, n: int = 1) -> None:
        self.done += n
        self.progress("executorch export", self.done, self.total)

    def lap(self, name: str) -> None:
        """Record the time since the last lap as ``name``, and the memory at its end (report["memory_mib"])."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.t, 2)
        self.memory[name] = memory_mib()
        self.t = now


class ExecuTorchTarget:
    """``stream_above``: the text decoder is quantized and lowered piece by piece (targets/executorch/streaming.py)
    when its float32 weights would exceed this many bytes; smaller decoders and the other methods take the
    whole-method path. Every method reads the checkpoint's stored weights (a kept bf16 checkpoint) and is
    copied to float32 on its own as it is exported."""

    spec = SPEC  # reads_stored_weights

    def __init__(self, stream_above: int = STREAM_ABOVE_BYTES):
        self.stream_above = stream_above

    def streams(self, components: Any) -> bool:
        """Whether this model's text decoder is exported piece by piece."""
        return float_bytes(components.text_decoder) > self.stream_above

    def build(self, job: BuildJob, staging: Path) -> Built:
        """Export, quantize (as the recipe's scheme says), lower and emit every method into one model.pte,
        then read the saved program back: its <|begin_of_image|> row and each method's I/O."""
        components, scheme = job.components, job.spec.scheme
        streamed = self.streams(components)
        if streamed and scheme.activations == "static":
            raise ExportError(
                f"{job.recipe.name}: this text decoder ({float_bytes(components.text_decoder) / 2**30:.1f} GiB in "
                f"float32, over {self.stream_above / 2**30:.1f} GiB) is lowered piece by piece, and static "
                "activation calibration needs the whole decoder in one program; use int8-weight or 8da4w"
            )
        report: dict[str, Any] = {"quantization": {}}
        marker = image_start_row(components)
        if marker is not None:
            report["image_marker"] = check_marker_unique(components, marker)
        modules = program_modules(components, marker)
        methods = list(modules)
        report["timings_s"], report["memory_mib"] = {}, {}
        steps = _Steps(job.progress, len(methods) + 3, report["timings_s"], report["memory_mib"])
        recorded = None
        if scheme.activations == "static":  # the calibration calls each method's observers will see
            recorded = resolve_method_inputs(job.calibration, components, job.progress)
            steps.lap("calibration_inputs")
        programs = self._export_methods(job, modules, recorded, report, steps, streamed)
        names = {m: user_input_names(ep) for m, ep in programs.items()}
        steps.lap("quantize_and_export")
        edge = self._lower(job, programs, report)
        del programs
        gc.collect()
        trim_heap()
        steps.step()
        steps.lap("lower_xnnpack")
        pte = staging / PTE
        self._emit(job, edge, pte)
        del edge
        gc.collect()
        trim_heap()
        steps.step()
        steps.lap("emit")
        if marker is not None:
            session = ExecuTorchSession(pte, job.recipe.name)
            report["image_marker"].update(check_marker_in_program(session, components, marker))
            del session
            gc.collect()
            trim_heap()
            report["memory_mib"]["image_marker_checked"] = memory_mib()
        outputs = {m: list(sig["outputs"]) for m, sig in method_signatures(components).items()}
        program_io = read_program_io(pte, {m: (names[m], outputs[m]) for m in methods})
        steps.lap("read_back")
        report["pte_bytes"] = pte.stat().st_size
        report["kernels"] = KERNELS_INT8_EMBEDDING if scheme.embedding_bits == 8 else KERNELS
        steps.step()
        metadata = {**job.metadata, "group_size": job.recipe.group_size if scheme.groupwise else None}
        return Built(files=[PTE], programs=program_io, report=report, metadata=metadata)

    def open(self, artifact: Artifact, variant: str | None = None) -> ExecuTorchSession:
        """The artifact's model.pte in ExecuTorch's Python runtime (one form: no variants)."""
        if variant is not None:
            raise BadInputError(f"an ExecuTorch artifact has one form ({PTE}); there is no '{variant}' variant")
        pte = artifact.dir / PTE
        if not pte.is_file():
            raise ArtifactError(f"{artifact.dir}: no {PTE} in this ExecuTorch artifact")
        return ExecuTorchSession(pte, artifact.recipe)

    @staticmethod
    def _export_methods(job: BuildJob, modules: dict[str, torch.nn.Module], recorded: dict[str, list] | None,
                        report: dict[str, Any], steps: _Steps, streamed: bool) -> dict[str, Any]:
        """Each method torch.exported (quantized first unless the scheme is float); one progress step each.
        A streamed decoder is quantized and lowered piece by piece first, then exported as their composition."""
        components, recipe, scheme = job.components, job.recipe, job.spec.scheme
        programs: dict[str, Any] = {}
        for m, module in modules.items():
            try:
                if m == "text_decoder" and streamed:
                    module.inner, report["quantization"][m] = stream_decoder(
                        module.inner, components.text_decoder, piece_quantizer(components, recipe, scheme), job.progress,
                        spill_dir=job.work)
                    report["streamed_decoder"] = {"pieces": report["quantization"][m].pop("pieces"),
                                                  "why": "float32 weights over stream_above bytes"}
                    programs[m] = export_module(components, m, module)
                elif scheme.quantized:
                    programs[m], report["quantization"][m] = quantize_method(components, m, module, recipe, scheme, recorded)
                else:
                    programs[m] = export_module(components, m, as_float32(module))
            except (ExportError, BadInputError):
                raise
            except Exception as e:
                raise ExportError(f"torch.export of {m} for ExecuTorch ({recipe.name}) failed: {str(e).splitlines()[0]}") from e
            release_pages(module)
            gc.collect()
            trim_heap()
            report["memory_mib"][f"export {m}"] = memory_mib()
            steps.step()
        return programs

    @staticmethod
    def _lower(job: BuildJob, programs: dict[str, Any], report: dict[str, Any]):
        """Lower every method to XNNPACK with the runner's constant methods; report and check what stays outside."""
        try:
            edge = lower(programs, constant_methods(job.components.config, job.metadata), job.progress)
        except Exception as e:
            raise ExportError(f"XNNPACK lowering ({job.recipe.name}) failed: {str(e).splitlines()[0]}") from e
        report["lowering"] = lowering_report(edge, list(programs))
        check_lowering(report["lowering"])
        return edge

    @staticmethod
    def _emit(job: BuildJob, edge: Any, pte: Path) -> None:
        """Emit the ExecuTorch program and write it to ``pte``."""
        try:
            program = to_executorch(edge)
        except Exception as e:
            raise ExportError(f"ExecuTorch program emission ({job.recipe.name}) failed: {str(e).splitlines()[0]}") from e
        with open(pte, "wb") as f:
            program.write_to_file(f)
