"""The two hooks of the torchsave test target."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from core.artifact import Artifact
from core.errors import ArtifactError
from core.runner import EagerSession
from targets.spec import BuildJob, Built
from torchsave_target import SPEC

FILE = "components.pt"


class TorchSaveTarget:
    spec = SPEC

    def build(self, job: BuildJob, staging: Path) -> Built:
        job.progress("torchsave", 0, 1)
        comps = copy.deepcopy(job.components)  # its own KV cache, apart from the reference's
        comps.text_decoder.cache.reset()
        torch.save(comps, staging / FILE)
        job.progress("torchsave", 1, 1)
        programs = {m: {"module": type(mod).__name__} for m, mod in comps.methods().items()}
        return Built(files=[FILE], programs=programs, report={"bytes": (staging / FILE).stat().st_size})

    def open(self, artifact: Artifact, variant: str | None = None) -> EagerSession:
        path = artifact.dir / FILE
        if not path.is_file():
            raise ArtifactError(f"{artifact.dir}: no {FILE}")
        session: Any = EagerSession(torch.load(path, weights_only=False))
        session.provenance = "torch.save'd PyTorch modules, eager"
        return session
