"""The saved packages: the decoder's two functions combined, metadata, deterministic bytes, and the
``programs`` entry of artifact.json read back from what was saved.

Determinism: each package's ``model.mlmodel`` is re-serialised with deterministic protobuf output,
without coremltools' conversion-date entry, and Manifest.json gets identifiers derived from the item
paths (uuid5), so two exports of the same model are byte-identical. Metadata: ``artifact_metadata``
goes into every package's user-defined metadata (prefix ``autoglm.``, values as JSON text).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from targets.coreml import compat
from targets.coreml.spec import DEFAULT_DECODER_FUNCTION
from targets.coreml.util import quiet

METADATA_PREFIX = "autoglm."
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def save_model(mlmodel: Any, path: Path) -> None:
    with quiet():
        mlmodel.save(str(path))


def combine_decoder(prefill: Path, decode: Path, dest: Path) -> None:
    """One multifunction package (``prefill``, ``decode``; default ``decode``), weights deduplicated.

    Both are converted from the same deterministic fp16 weights (quantized the same way), so
    ``save_multifunction`` keeps one copy of each weight blob for the two functions.
    """
    import coremltools as ct

    compat.lean_const_deduplication()
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(prefill), src_function_name="main", target_function_name="prefill")
    desc.add_function(str(decode), src_function_name="main", target_function_name="decode")
    desc.default_function_name = DEFAULT_DECODER_FUNCTION
    with quiet():
        ct.utils.save_multifunction(desc, str(dest))


def finalize_package(path: Path, metadata: dict[str, Any], method: str) -> None:
    """User-defined metadata in, deterministic bytes out (spec serialisation and Manifest.json ids)."""
    _write_metadata(path, metadata, method)
    _stable_manifest_ids(path)


def _write_metadata(path: Path, metadata: dict[str, Any], method: str) -> None:
    """The package's user-defined metadata (``autoglm.*``, JSON text), version and description; the spec
    re-serialised deterministically, without coremltools' conversion date."""
    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = compat.model_pb2().Model()
    spec.ParseFromString(spec_path.read_bytes())
    user = spec.description.metadata.userDefined
    if CONVERSION_DATE_KEY in user:  # today's date: two builds on different days would differ
        del user[CONVERSION_DATE_KEY]
    user[f"{METADATA_PREFIX}method"] = method
    for key, value in metadata.items():
        user[f"{METADATA_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    spec.description.metadata.versionString = str(metadata.get("package_version", ""))
    spec.description.metadata.shortDescription = f"autoglm-export {method} ({metadata.get('model_name', '')}, {metadata.get('recipe', '')})"
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    spec_path.chmod(0o644)


def _stable_manifest_ids(path: Path) -> None:
    """Manifest.json's item identifiers (random UUIDs from coremltools) derived from each item's path."""
    manifest_path = path / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest.get("itemInfoEntries", {})
    renamed, new_entries = {}, {}
    for old_id, entry in entries.items():
        new_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"autoglm-export:{entry.get('path', old_id)}")).upper()
        renamed[old_id] = new_id
        new_entries[new_id] = entry
    manifest["itemInfoEntries"] = dict(sorted(new_entries.items()))
    if manifest.get("rootModelIdentifier") in renamed:
        manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def read_spec(path: Path) -> Any:
    """The saved Model spec of a package (works on Linux)."""
    spec = compat.model_pb2().Model()
    spec.ParseFromString((Path(path) / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    return spec


# numpy-style names of Core ML feature (ArrayFeatureType) and ML program (MIL DataType) element types
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "FLOAT64": "float64", "INT32": "int32",
           "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT64": "int64", "BOOL": "bool"}


def _array_shape(array: Any) -> list[int | str]:
    """A multiArray feature's shape: fixed dims as ints, a RangeDim as "lower..upper" (upper "" when unbounded).

    Core ML keeps no names for flexible dims (ct.RangeDim's symbol is not saved), only their bounds;
    an enumerated-shapes dim that varies is written "a|b|c".
    """
    shape: list[int | str] = [int(d) for d in array.shape]
    which = array.WhichOneof("ShapeFlexibility")
    if which == "shapeRange":
        for i, r in enumerate(array.shapeRange.sizeRanges):
            lo, hi = int(r.lowerBound), int(r.upperBound)
            if lo != hi:
                shape[i] = f"{lo}..{hi if hi >= 0 else ''}"
            else:
                shape[i] = lo
    elif which == "enumeratedShapes":
        options = [list(s.shape) for s in array.enumeratedShapes.shapes]
        shape = [vals[0] if len(set(vals)) == 1 else "|".join(str(v) for v in sorted(set(vals))) for vals in zip(*options)]
        shape = [int(d) if not isinstance(d, str) else d for d in shape]
    return shape


def _feature(feature: Any, mil_type: Any = None) -> dict[str, Any]:
    """A feature description as {name, dtype, shape}. ``mil_type``: the ML program's type for it, read when the
    description leaves the shape out (coremltools writes none for outputs): unknown dims there are "?"."""
    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else getattr(feature.type, kind)
    if kind not in ("multiArrayType", "stateType"):
        return {"name": feature.name, "dtype": kind, "shape": []}
    dtype = _DTYPES.get(compat.feature_types_pb2().ArrayFeatureType.ArrayDataType.Name(array.dataType), "")
    shape = _array_shape(array)
    if not shape and mil_type is not None:
        t = mil_type.tensorType
        shape = [int(d.constant.size) if d.WhichOneof("dimension") == "constant" else "?" for d in t.dimensions]
        if not dtype:
            dtype = _DTYPES.get(compat.mil_pb2().DataType.Name(t.dataType), "")
    return {"name": feature.name, "dtype": dtype, "shape": shape}


def _mil_output_types(spec: Any, function: str) -> dict[str, Any]:
    """Output name -> its ValueType in the ML program's ``function``."""
    fn = spec.mlProgram.functions.get(function)
    if fn is None:
        return {}
    block = fn.block_specializations[fn.opset]
    outs = set(block.outputs)
    return {o.name: o.type for op in block.operations for o in op.outputs if o.name in outs}


def _function_io(description: Any, spec: Any, function: str) -> dict[str, list[dict[str, Any]]]:
    mil = _mil_output_types(spec, function)
    return {
        "inputs": [_feature(f) for f in description.input],
        "outputs": [_feature(f, mil.get(f.name)) for f in description.output],
        "states": [_feature(f) for f in description.state],
    }


def package_program(path: Path) -> dict[str, Any]:
    """One saved package's I/O as its spec declares it: inputs, outputs and states (the KV cache).

    A multifunction package (the decoder: ``prefill`` and ``decode``) lists each function under
    ``functions``; its top-level inputs/outputs/states are the default function's (what
    ``MLModel(path)`` loads).
    """
    import coremltools as ct

    with quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    d = spec.description
    entry: dict[str, Any] = {"file": Path(path).name}
    if len(d.functions):
        functions = {f.name: _function_io(f, spec, f.name) for f in d.functions}
        entry["default_function"] = d.defaultFunctionName
        entry.update(functions[d.defaultFunctionName])
        entry["functions"] = functions
    else:
        entry.update(_function_io(d, spec, "main"))
    return entry


def coreml_programs(root: Path, files: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """artifact.json's ``programs``: each method's package and its I/O read back from the saved spec; a
    decoder split over several packages lists each chunk's under ``chunks``, run in that order.

    The runner's interface (``runner_interface``) differs: tokens and positions are int32 here, the
    decoder is two functions sharing its states, and flexible lengths are ranges.
    """
    programs = {}
    for method, names in files.items():
        entries = [package_program(root / n) for n in names]
        programs[method] = entries[0] if len(entries) == 1 else {"chunks": entries}
    return programs


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (Path(path) / "Data" / "com.apple.CoreML" / "weights").rglob("*") if p.is_file())
