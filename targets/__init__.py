"""The target registry: {name: package}. Registering a target is one line here.

Each package exposes ``SPEC`` (a :class:`targets.spec.TargetSpec`, importable without the runtime: the
CLI's choices and every check before model work read it) and ``target()`` (imports the runtime and
returns the object with the ``build`` / ``open`` hooks). Only the target asked for is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from core.errors import TargetNotAvailableError, UnknownTargetError

TARGETS: dict[str, str] = {
    "executorch": "targets.executorch",
    "ort": "targets.ort",
    "coreml": "targets.coreml",
}


def target_names() -> list[str]:
    return list(TARGETS)


def _package(name: str) -> ModuleType:
    try:
        module_name = TARGETS[name]
    except KeyError:
        raise UnknownTargetError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}") from None
    return importlib.import_module(module_name)


def target_spec(name: str):
    """The :class:`targets.spec.TargetSpec` of target ``name`` (its runtime is not imported)."""
    return _package(name).SPEC


def get_target(name: str):
    """The target called ``name``, its runtime imported."""
    package = _package(name)
    try:
        return package.target()
    except ModuleNotFoundError as e:
        raise TargetNotAvailableError(f"target '{name}' needs the package '{e.name}', which is not installed") from e


def recipes_help() -> str:
    return "; ".join(f"{t}: {', '.join(target_spec(t).recipe_names)}" for t in TARGETS)
