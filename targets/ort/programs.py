"""artifact.json's ``programs``: each method's file and its I/O, read back from the saved .onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from targets.ort.files import load_model


def _value_info(value: Any) -> dict[str, Any]:
    """A graph input/output as {name, dtype (numpy-style), shape}; a symbolic dim keeps its dim_param name."""
    from onnx import helper

    t = value.type.tensor_type
    dims: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:  # an anonymous dim (neither set) is written "?"
            dims.append(d.dim_param or "?")
    return {"name": value.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name, "shape": dims}


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a saved .onnx graph (its weights are not read)."""
    graph = load_model(path, with_data=False).graph
    return {"inputs": [_value_info(v) for v in graph.input], "outputs": [_value_info(v) for v in graph.output]}


def onnx_programs(root: Path, methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """artifact.json's ``programs``: each method's file and its I/O as the saved .onnx declares it.

    Read back from the files, not from the runner's interface: the graphs use
    onnxruntime-genai's names and layouts (``input_ids``, ``position_ids [3,1,T]``,
    ``past_key_values.N.*``), which differ from the runner's. The .ort beside the
    .onnx is the same graph in ORT format (same I/O).
    """
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        entry: dict[str, Any] = {"file": f"{m}.onnx", **onnx_io(root / f"{m}.onnx")}
        if (root / f"{m}.ort").is_file():
            entry["ort_file"] = f"{m}.ort"
        out[m] = entry
    return out
