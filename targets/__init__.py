"""Target registry: a plain dict {name: "module:Class"}, imported lazily.

Importing a target pulls in its runtime (executorch, onnxruntime,
coremltools), so ``get_target`` imports only the one asked for.
"""

from __future__ import annotations

import importlib

from core.errors import TargetNotAvailableError, UnknownTargetError

TARGETS: dict[str, str] = {
    "executorch": "targets.executorch:ExecuTorchTarget",
    "ort": "targets.ort:OrtTarget",
    "coreml": "targets.coreml:CoreMLTarget",
}

# the recipes each target offers, without importing its runtime (the CLI's --help and choices);
# tests/test_cli.py checks it against each target's own RECIPES
RECIPES_BY_TARGET: dict[str, tuple[str, ...]] = {
    "executorch": ("fp32", "int8-weight", "8da4w", "int8-static"),
    "ort": ("fp32", "int8-weight", "int8-static", "int4-weight"),
    "coreml": ("fp16", "int8-weight", "int8-static", "int4-weight"),
}


def recipes_help() -> str:
    return "; ".join(f"{t}: {', '.join(r)}" for t, r in RECIPES_BY_TARGET.items())


def get_target(name: str):
    """Return an instance of the target called ``name``."""
    try:
        spec = TARGETS[name]
    except KeyError:
        raise UnknownTargetError(f"unknown target '{name}'; known targets: {', '.join(TARGETS)}") from None
    module_name, cls_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise TargetNotAvailableError(f"target '{name}' is not available yet in this build") from None
        raise TargetNotAvailableError(f"target '{name}' needs the package '{e.name}', which is not installed") from e
    return getattr(module, cls_name)()
