"""Running an artifact: the four packages behind the runner's Session interface.

On macOS with Core ML the session runs the packages with ``MLModel.predict`` and ``make_state()``;
elsewhere (Core ML cannot execute on Linux) it runs the same saved packages through
``targets.coreml.mil``, a NumPy interpreter of ML programs, and its provenance says "emulated".
"""

from __future__ import annotations

import platform
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import Artifact
from core.errors import ArtifactError, BadInputError, ExportError, MissingRuntimeError, RuntimeFailure
from targets.coreml import compat
from targets.coreml.spec import DECODER_FUNCTIONS, HIDDEN_OUTPUT, OUTPUT_NAMES, package_name
from targets.coreml.util import error_cause


def execution_note() -> str:
    if core_ml_available():
        return "Core ML predict (macOS)"
    return "Core ML cannot execute on this host: parity runs the saved ML programs in targets.coreml.mil (NumPy)"


def core_ml_available() -> bool:
    """Whether real Core ML prediction is possible here (macOS with coremltools' native library)."""
    return platform.system() == "Darwin" and compat.has_native_core_ml()


def as_int32(x: Any) -> np.ndarray:
    """The packages take tokens and positions as int32 (the runner passes int64)."""
    return np.ascontiguousarray(np.asarray(x), dtype=np.int32)


def decoder_packages(artifact: Artifact) -> list[str]:
    """The decoder's package names in run order: one, or one per chunk (``metadata.decoder_chunks``)."""
    chunks = artifact.metadata.get("decoder_chunks")
    return [c["package"] for c in chunks] if chunks else [package_name("text_decoder")]


class CoreMLSession:
    """The four packages behind the runner's Session interface.

    text_decoder: T > 1 runs the ``prefill`` function, T = 1 ``decode``; both
    read and write the same state (the KV cache), which ``reset()`` replaces. A decoder split
    into chunks runs them in order, each chunk's ``hidden`` output the next one's ``embeds``,
    each with its own state.
    """

    def __init__(self, artifact: Artifact):
        from exporter.model.config import ModelConfig

        self.artifact = artifact
        self.config = ModelConfig.from_dict(artifact.metadata["model"])
        self.max_seq_len = int(artifact.metadata["max_seq_len"])
        self.recipe = artifact.recipe
        self.paths: dict[str, list[Path]] = {}
        # an artifact written before "methods" was renamed "runner_interface" still loads
        for method in artifact.info.get("runner_interface", artifact.info.get("methods", {})):
            names = decoder_packages(artifact) if method == "text_decoder" else [package_name(method)]
            self.paths[method] = [artifact.dir / n for n in names]
            for p in self.paths[method]:
                if not p.is_dir():
                    raise ArtifactError(f"{artifact.dir}: no {p.name} in this Core ML artifact")
        if core_ml_available():
            self.backend: Any = _CoreMLBackend(self.paths)
        else:
            self.backend = _InterpreterBackend(self.paths)
        self.provenance = f"{self.backend.provenance} ({self.recipe})"
        self.reset()

    def reset(self) -> None:
        self.backend.reset()

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        if method not in self.paths:
            raise BadInputError(f"this Core ML artifact has no method '{method}' (it has: {', '.join(self.paths)})")
        if method == "token_embedding":
            feeds = {"tokens": as_int32(inputs["tokens"]).reshape(1, -1)}
            function = None
        elif method in ("vision_encoder", "audio_encoder"):
            name = "pixels" if method == "vision_encoder" else "mel"
            feeds = {name: np.ascontiguousarray(inputs[name], np.float32)}
            function = None
        elif method == "text_decoder":
            embeds = np.ascontiguousarray(inputs["embeds"], np.float32)
            cache_position = as_int32(inputs["cache_position"]).reshape(-1)
            t = embeds.shape[1]
            if t < 1 or cache_position.size != t:
                raise BadInputError(f"text_decoder: embeds has {t} positions but cache_position has {cache_position.size}")
            start = int(cache_position[0])
            if start < 0 or start + t > self.max_seq_len:
                raise RuntimeFailure(
                    f"text_decoder: positions {start}..{start + t - 1} are outside the KV cache (max_seq_len {self.max_seq_len})"
                )
            if not np.array_equal(cache_position, np.arange(start, start + t)):
                raise BadInputError("text_decoder: cache_position must be consecutive positions (the Core ML cache is written as one slice)")
            feeds = {
                "embeds": embeds,
                "position_ids": as_int32(inputs["position_ids"]).reshape(3, t),
                "cache_position": cache_position,
            }
            function = "prefill" if t > 1 else "decode"
        else:
            raise BadInputError(f"unknown method '{method}'")
        out = self.backend.run(method, function, feeds)
        return np.asarray(out[OUTPUT_NAMES[method]], np.float32)


def _run_decoder(chunks: list[Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder's chunks in order (``chunks``: callables feeds -> outputs): each one's hidden states are
    the next one's ``embeds``; the last one's outputs (logits) are the decoder's."""
    out: dict[str, np.ndarray] = {}
    for run in chunks:
        out = run(feeds)
        if HIDDEN_OUTPUT in out:
            feeds = {**feeds, "embeds": np.asarray(out[HIDDEN_OUTPUT], np.float32)}
    return out


class _InterpreterBackend:
    def __init__(self, paths: dict[str, list[Path]]):
        try:
            from targets.coreml.mil import PROVENANCE, MILProgram
        except ImportError as e:
            raise MissingRuntimeError(
                "Core ML does not execute on this host and targets.coreml.mil is not available to emulate it"
            ) from e
        # parity reports tell emulated numbers from real ones by this word
        self.provenance = PROVENANCE if "emulat" in PROVENANCE.lower() else f"{PROVENANCE}, emulating Core ML"
        self.programs: dict[str, list[Any]] = {}
        for method, ps in paths.items():
            self.programs[method] = []
            for p in ps:
                try:
                    self.programs[method].append(MILProgram.load(p))
                except Exception as e:
                    raise RuntimeFailure(f"cannot load {p} into the ML program interpreter: {error_cause(e)}") from e
        self.states: list[dict[str, np.ndarray]] = []

    def reset(self) -> None:
        self.states = [prog.new_state(DECODER_FUNCTIONS[0]) for prog in self.programs.get("text_decoder", [])]

    def run(self, method: str, function: str | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        progs = self.programs[method]
        fn = function or _default_function(progs[0])
        try:
            if method == "text_decoder":
                return _run_decoder([partial(prog.run, function=fn, state=state)
                                     for prog, state in zip(progs, self.states)], feeds)
            return progs[0].run(feeds, function=fn)
        except (BadInputError, ExportError):
            raise
        except Exception as e:
            raise RuntimeFailure(f"ML program interpreter failed running {method} ({fn}): {error_cause(e)}") from e


def _default_function(prog: Any) -> str:
    functions = list(prog.functions)
    return "main" if "main" in functions else functions[0]


class _CoreMLBackend:
    """Real Core ML (macOS): one MLModel per method, one per decoder function (and chunk), one state per
    decoder package, shared by its two functions."""

    def __init__(self, paths: dict[str, list[Path]]):
        import coremltools as ct

        self.provenance = f"Core ML predict on macOS {platform.mac_ver()[0]} (coremltools {ct.__version__})"
        self.models: dict[str, list[Any]] = {}
        try:
            for method, ps in paths.items():
                for p in ps:
                    if method == "text_decoder":
                        for fn in DECODER_FUNCTIONS:
                            self.models.setdefault(f"{method}.{fn}", []).append(ct.models.MLModel(str(p), function_name=fn))
                    else:
                        self.models[method] = [ct.models.MLModel(str(p))]
        except Exception as e:
            raise RuntimeFailure(f"Core ML cannot load {p}: {error_cause(e)}") from e
        self.states: list[Any] = []

    def reset(self) -> None:
        # any function: they share the state
        self.states = [model.make_state() for model in self.models.get(f"text_decoder.{DECODER_FUNCTIONS[0]}", [])]

    def run(self, method: str, function: str | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = f"{method}.{function}" if function else method
        try:
            if method == "text_decoder":
                return _run_decoder([partial(model.predict, state=state)
                                     for model, state in zip(self.models[key], self.states)], feeds)
            return self.models[key][0].predict(feeds)
        except Exception as e:
            raise RuntimeFailure(f"Core ML failed running {key}: {error_cause(e)}") from e
