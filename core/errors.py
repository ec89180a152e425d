"""Typed errors raised by library code.

Only ``cli.py`` turns these into exit codes and one-line messages:

* :class:`BadInputError` and subclasses -> exit 2 (bad usage or bad input)
* :class:`ParityFailure` -> exit 1 (a parity threshold failed)
* :class:`ExportError` and subclasses -> exit 3 (an export or runtime failure)

Every message says what was wrong, where (file, line, key, tensor, op) and,
where it helps, what to do about it.
"""

from __future__ import annotations


class AutoglmExportError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 3


class BadInputError(AutoglmExportError):
    """The user gave us something we cannot use (exit code 2)."""

    exit_code = 2


class CheckpointError(BadInputError):
    """A checkpoint directory, file, shard, key or config is missing or unusable."""


class ConfigError(BadInputError):
    """A preset, build config or model config value is invalid."""


class ManifestError(BadInputError):
    """A calibration / parity manifest has bad lines.

    ``problems`` holds ``(line_number, reason)`` pairs, one per bad line.
    """

    def __init__(self, path: str, problems: list[tuple[int, str]]):
        self.path = str(path)
        self.problems = list(problems)
        first = "; ".join(f"line {n}: {why}" for n, why in self.problems[:20])
        more = f" (and {len(self.problems) - 20} more)" if len(self.problems) > 20 else ""
        super().__init__(f"{self.path}: {len(self.problems)} bad line(s): {first}{more}")


class InputFileError(BadInputError):
    """An image, audio or text input file is missing, unreadable or corrupt."""


class UnknownTargetError(BadInputError):
    """An unknown export target was requested."""


class UnknownRecipeError(BadInputError):
    """An unknown or unsupported recipe was requested for a target."""


class TargetNotAvailableError(BadInputError):
    """The target exists in the design but is not available in this build or on this host."""


class ArtifactError(BadInputError):
    """An artifact directory is missing, incomplete or corrupt."""


class OutputError(BadInputError):
    """The output location cannot be written."""


class ExportError(AutoglmExportError):
    """Export, quantization, lowering or conversion failed (exit code 3)."""


class UnsupportedOpError(ExportError):
    """An op has no path on the chosen backend (named in the message)."""


class RuntimeFailure(ExportError):
    """A runtime (ExecuTorch, ONNX Runtime, Core ML interpreter) failed to load or run an artifact."""


class MissingRuntimeError(ExportError):
    """A runtime package needed for this step is not installed or cannot run on this host."""


class ParityFailure(AutoglmExportError):
    """An artifact failed a parity threshold (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, failures: list[str] | None = None):
        self.failures = list(failures or [])
        super().__init__(message)
