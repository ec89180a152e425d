"""The target registry: {name: package}. Registering a target is one line here (or, for a target kept
outside this package, one entry in $AUTOGLM_EXPORT_TARGETS).

Each package exposes ``SPEC`` (a :class:`targets.spec.TargetSpec`, importable without the runtime: the
CLI's choices and every check before model work read it) and ``load_target()`` (imports the runtime
and returns the object with the ``build`` / ``open`` hooks; not named ``target``, which would clash with
the package's ``target`` submodule once imported). Only the target asked for is imported.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from core.errors import TargetNotAvailableError, UnknownTargetError

TARGETS: dict[str, str] = {
    "executorch": "targets.executorch",
    "ort": "targets.ort",
    "coreml": "targets.coreml",
}


# targets kept outside this package: AUTOGLM_EXPORT_TARGETS="name=package[,name=package...]" (each package
# importable, with SPEC and load_target()); read on every lookup, so subprocesses (bench) see them too
ENV = "AUTOGLM_EXPORT_TARGETS"


def registry() -> dict[str, str]:
    """TARGETS plus the targets named in $AUTOGLM_EXPORT_TARGETS."""
    extra: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in os.environ.get(ENV, "").split(","))):
        name, sep, package = item.partition("=")
        if not sep or not name.strip() or not package.strip():
            raise UnknownTargetError(f"${ENV}: '{item}' is not NAME=PACKAGE")
        extra[name.strip()] = package.strip()
    return {**TARGETS, **extra}


def target_names() -> list[str]:
    return list(registry())


def _package(name: str) -> ModuleType:
    known = registry()
    try:
        module_name = known[name]
    except KeyError:
        raise UnknownTargetError(f"unknown target '{name}'; known targets: {', '.join(known)}") from None
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise TargetNotAvailableError(f"target '{name}': its package '{module_name}' is not importable") from None
        raise


def target_spec(name: str):
    """The :class:`targets.spec.TargetSpec` of target ``name`` (its runtime is not imported)."""
    return _package(name).SPEC


def get_target(name: str):
    """The target called ``name``, its runtime imported."""
    package = _package(name)
    try:
        return package.load_target()
    except ModuleNotFoundError as e:
        raise TargetNotAvailableError(f"target '{name}' needs the package '{e.name}', which is not installed") from e


def recipes_help() -> str:
    return "; ".join(f"{t}: {', '.join(target_spec(t).recipe_names)}" for t in target_names())
