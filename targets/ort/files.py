"""Saving models with or without external data, and the metadata every model carries.

A model with over 1 GiB of weights keeps them in ``<model>.onnx.data`` (protobuf stops at 2 GiB);
onnx is imported inside the functions so the session and spec never pay for it at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# protobuf's hard limit is 2 GiB; leave room for the graph itself
EXTERNAL_DATA_BYTES = 1 << 30


def load_model(path: Path, with_data: bool = True):
    """The ModelProto at ``path``; ``with_data=False`` leaves external weights on disk (I/O, metadata only)."""
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def save_model(model: Any, path: Path) -> None:
    """Save, putting initializers in ``<name>.data`` when the model would pass protobuf's limit."""
    import onnx

    data = Path(str(path) + ".data")
    if data.exists():
        data.unlink()
    size = sum(init.ByteSize() for init in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def model_files(path: Path) -> list[Path]:
    """The .onnx file and its external data file, if any."""
    data = Path(str(path) + ".data")
    return [path] + ([data] if data.exists() else [])


def set_metadata(path: Path, props: dict[str, Any]) -> None:
    """Write ``props`` into metadata_props without touching external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    onnx.save_model(model, str(path))
