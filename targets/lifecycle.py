"""The one export lifecycle every target goes through (the ``export`` command and ``build`` both call it).

1. the recipe is checked against the target's spec and ``out`` against the user's data, before any work;
2. a staging directory beside ``out`` receives the tokenizer files, then the target's ``build`` hook
   writes its program(s) (scratch files go to a work directory that is removed afterwards);
3. the held-out sample goes through eager, then the target's ``open`` hook loads what was written and
   the export-time check compares every method against those eager outputs (:func:`targets.base.export_gate`); a program below its recipe's
   gate raises, and nothing is written;
4. artifact.json (files with their sha256, the runner interface, the programs as saved, metadata with
   the weights' source and any compression, runtime versions, timings, the target's report) is written
   last, and the staging directory replaces ``out`` atomically.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

from core.artifact import (
    Artifact,
    Progress,
    atomic_artifact_dir,
    check_output_dir,
    memory_mib,
    no_progress,
    peak_rss_mb,
    read_artifact,
    runtime_versions,
    trim_heap,
    write_artifact_json,
)
from core.errors import MissingRuntimeError
from core.recipes import Recipe
from targets.base import artifact_metadata, copy_tokenizer_files, export_gate, held_out_reference, method_signatures
from targets.spec import BuildJob, Gate, Target

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components


def export(
    target: Target,
    components: Components,
    recipe: Recipe,
    out: str | Path,
    calibration: Any | None = None,
    progress: Progress = no_progress,
    source: dict[str, Any] | None = None,
    compression: dict[str, Any] | None = None,
    check_floor: float | None = None,
) -> Artifact:
    """Export ``components`` with ``recipe`` through ``target`` into ``out`` (atomic). Returns the Artifact.

    ``check_floor`` replaces the recipe's gate by this cosine floor alone (no relative-L2 ceiling): the user
    accepts that much drift (e.g. a 4-bit model); artifact.json records the floor the program passed."""
    spec = target.spec
    rspec = spec.check(recipe)
    gate = rspec.gate if check_floor is None else Gate(check_floor, None)
    out = Path(out)
    check_output_dir(out)
    t0 = time.perf_counter()
    config = components.config
    metadata = artifact_metadata(config, recipe)
    with atomic_artifact_dir(out) as root, tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=root.parent) as work:
        tokenizer_files = copy_tokenizer_files(config, root)
        job = BuildJob(components=components, recipe=recipe, spec=rspec, metadata=dict(metadata),
                       calibration=calibration, work=Path(work), tokenizer_files=tokenizer_files, progress=progress)
        built = target.build(job, root)
        gc.collect()
        trim_heap()  # what the build freed leaves the heap before the check opens the program beside the eager pass
        meta = dict(built.metadata if built.metadata is not None else metadata)
        activation_range = rspec.activation_range(recipe)  # --activation-range, or the target's default
        if activation_range:
            meta["activation_range"] = activation_range
        if source is not None:
            meta["source"] = source  # parity rebuilds the reference from it
        if compression:
            meta["compression"] = compression  # and undoes nothing: it compares against the uncompressed model
        files = [*built.files, *tokenizer_files]
        report = dict(built.report)
        if not tokenizer_files:
            report["tokenizer"] = f"none: model '{config.name}' names no tokenizer.json"
        interface = method_signatures(components)
        draft = Artifact(dir=root, target=spec.name, recipe=recipe.name, files=files,
                         info={"target": spec.name, "recipe": recipe.name, "metadata": meta, "runner_interface": interface})
        progress(f"{spec.name} check", 0, 1)
        t = time.perf_counter()
        # where the memory went, phase by phase (resident at the end of each, and the process's peak so far)
        memory = {"built": memory_mib()}
        # eager first, then the program: at 9B the two working sets do not fit in memory together
        reference = held_out_reference(components)
        memory["eager_reference"] = memory_mib()
        try:
            session = target.open(draft, built.check_variant)
        except MissingRuntimeError as e:  # no runtime (nor emulation) on this host: said, not hidden
            check: dict[str, Any] = {"measured": False, "why": str(e)}
        else:
            memory["program_opened"] = memory_mib()
            check = export_gate(spec.name, recipe, session, reference, gate)
            memory["checked"] = memory_mib()
            del session
            if check_floor is not None:
                check["floor_set_by_user"] = {"floor_cosine": check_floor, "recipe_default": {
                    "floor_cosine": rspec.gate.floor_cosine, "max_relative_l2": rspec.gate.max_relative_l2}}
        check["wall_s"] = round(time.perf_counter() - t, 2)
        report["export_check"] = check
        progress(f"{spec.name} check", 1, 1)
        info = {
            "target": spec.name,
            "recipe": recipe.name,
            "files": files,
            "runner_interface": interface,
            "programs": built.programs,
            "metadata": meta,
            "runtime_versions": runtime_versions(*spec.runtime_packages),
            "export": {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                       "memory_mib": memory},
            "report": report,
        }
        write_artifact_json(root, info)
    return read_artifact(out)
