"""Target registry: a plain dict {name: "module:Class"}, imported lazily.

Importing a target pulls in its runtime (executorch, onnxruntime,
coremltools), so ``get_target`` imports only the one asked for.
"""

from __future__ import annotations

import importlib

from exporter.errors import TargetNotAvailableError, UnknownTargetError

TARGETS: dict[str, str] = {
    "executorch": "targets.executorch:ExecuTorchTarget",
    "ort": "targets.ort:OrtTarget",
    "coreml": "targets.coreml:CoreMLTarget",
}


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
