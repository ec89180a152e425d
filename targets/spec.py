"""What a target is: a spec it declares, and two hooks (build the programs, open a session).

A target is one package under ``targets/`` holding:

* ``SPEC``: a :class:`TargetSpec` (importing it must not import the runtime: ``--help`` and the
  checks before any model work read it), and
* ``load_target()``: imports the runtime and returns an object with :class:`Target`'s two hooks.

Everything else of an export (recipe and ``--out`` checks, timing, the tokenizer files, metadata,
the export-time check against eager, artifact.json, the atomic directory) is done once, for every
target, by :func:`targets.lifecycle.export`. Registering a target is one line in
``targets.TARGETS``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TYPE_CHECKING

from core.artifact import Artifact, Progress, Session
from core.errors import BadInputError, UnknownRecipeError
from core.recipes import ALL_RECIPES, QuantScheme, Recipe, RecipeName, WeightGrid

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components


@dataclass(frozen=True)
class Gate:
    """The export-time check's bound on each method against eager, on a held-out sample:
    cosine at least ``floor_cosine`` and, where set, relative L2 at most ``max_relative_l2``."""

    floor_cosine: float
    max_relative_l2: float | None = None


@dataclass(frozen=True)
class RecipeSpec:
    """One recipe as a target implements it."""

    recipe: RecipeName
    scheme: QuantScheme  # what it quantizes; the sensitivity simulation reads the same object
    gate: Gate
    per_channel_groups: bool = True  # a grouped recipe accepts --group-size 0 (per output channel)
    # a per-channel recipe that this target also quantizes in blocks when --group-size N is given
    blocks_on_request: bool = False
    # the integer grid this target's quantizer puts a linear's weights on, for the recipe as given (its group size);
    # None: not one that weights rounded beforehand survive (--gptq is refused)
    weight_grid: Callable[[Recipe], WeightGrid] | None = None
    # GPTQ rounding (onto weight_grid) unless the user says --no-gptq: set where the drift table on a trained model
    # (README "Calibration algorithms", SmolLM2-135M) measured it better than round-to-nearest on this target.
    # Skipped, and recorded, where the model is too large for it (calibration.gptq rounds a whole-model copy)
    gptq_default: bool = False
    # static recipes: the activation-range algorithms this target's quantizer offers (--activation-range), its
    # default first; empty where the recipe calibrates no activation ranges
    activation_ranges: tuple[str, ...] = ()

    def activation_range(self, recipe: Recipe) -> str | None:
        """The algorithm this build sets activation ranges with (the recipe's, else the default), or None."""
        return recipe.activation_range or (self.activation_ranges[0] if self.activation_ranges else None)

    def takes_group_size(self, recipe: Recipe) -> bool:
        return recipe.grouped or self.blocks_on_request


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    recipes: tuple[RecipeSpec, ...]
    runtime_packages: tuple[str, ...]  # recorded in artifact.json's runtime_versions (torch is always)
    # files a build does not write byte for byte the same twice: (glob, why); the build manifest's
    # reproducible hash leaves them out
    nondeterministic_files: tuple[tuple[str, str], ...] = ()
    # what the app links or passes to run it, for the README and `info`
    notes: tuple[str, ...] = field(default_factory=tuple)
    # the build reads the checkpoint's stored (bf16) weights itself, upcasting one method or weight at a time, so
    # the application must not make a whole-model fp32 copy first (the 9B: 41 GB)
    reads_stored_weights: bool = False

    @property
    def recipe_names(self) -> tuple[str, ...]:
        return tuple(r.recipe.value for r in self.recipes)

    def recipe(self, name: str) -> RecipeSpec:
        """The spec of recipe ``name``; UnknownRecipeError naming what this target offers."""
        for r in self.recipes:
            if r.recipe == name:
                return r
        known = "" if name in ALL_RECIPES else f" (known recipes: {', '.join(ALL_RECIPES)})"
        raise UnknownRecipeError(
            f"recipe '{name}' is not supported by target '{self.name}'; it supports: {', '.join(self.recipe_names)}{known}"
        )

    def check(self, recipe: Recipe) -> RecipeSpec:
        """``recipe`` as this target can build it (recipe offered, group size available)."""
        spec = self.recipe(recipe.name)
        if recipe.activation_range is not None and recipe.activation_range not in spec.activation_ranges:
            if not spec.activation_ranges:
                raise BadInputError(f"--activation-range applies to static recipes (int8-static); '{recipe.name}' on "
                                    f"{self.name} calibrates no activation ranges")
            raise BadInputError(f"--activation-range {recipe.activation_range}: {recipe.name} on {self.name} offers "
                                f"{', '.join(spec.activation_ranges)} (default {spec.activation_ranges[0]})")
        if recipe.grouped and recipe.group_size == 0 and not spec.per_channel_groups:
            raise BadInputError(
                f"{recipe.name} on {self.name} quantizes in blocks: --group-size 0 (per channel) is not available; "
                "use a power of two >= 16 such as 32"
            )
        return spec

    def nondeterministic(self, file: str) -> str | None:
        """Why ``file`` is not reproducible, or None."""
        return next((why for pat, why in self.nondeterministic_files if fnmatch.fnmatch(file, pat)), None)


@dataclass
class BuildJob:
    """What the driver hands a target's ``build`` hook."""

    components: Components  # core.components.Components
    recipe: Recipe
    spec: RecipeSpec
    metadata: dict[str, Any]  # targets.base.artifact_metadata: what a program embeds in its own format
    calibration: Any | None  # calibration.stats.CalibrationData (or recorded method inputs); None = built-in set
    work: Path  # scratch directory beside the output, removed afterwards
    tokenizer_files: list[str]  # already copied into the staging directory by the driver
    progress: Progress


@dataclass
class Built:
    """What ``build`` wrote into the staging directory."""

    files: list[str]  # the program files (the driver adds the tokenizer files)
    programs: dict[str, Any]  # each method's inputs/outputs read back from the saved program(s)
    report: dict[str, Any]  # target-specific (quantization, lowering, sizes, timings, ...)
    metadata: dict[str, Any] | None = None  # artifact.json metadata, where the target extended job.metadata
    check_variant: str | None = None  # the form of the artifact the export check opens (ORT: "ort")


class Target(Protocol):
    spec: TargetSpec

    def build(self, job: BuildJob, staging: Path) -> Built: ...

    def open(self, artifact: Artifact, variant: str | None = None) -> Session: ...

    # optional: ``blocks(artifact, method, sample, block_inputs, progress) -> {"family", "isolated", "accumulated"}``,
    # each block of a method run from the program itself (blockwise parity; exporter/parity/blockwise.py). Only
    # targets whose programs expose a block's tensors have it (ONNX Runtime).
