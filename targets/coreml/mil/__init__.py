"""A NumPy interpreter of Core ML ML programs (MIL), for parity on hosts without Core ML.

Core ML executes only on macOS. To measure a saved ``.mlpackage`` honestly on
Linux this module reads the package as Core ML would (``model.mlmodel``: the
MIL program proto; ``weights/weight.bin``: the MIL blob file; function states)
and executes the program op by op with NumPy. Every number it yields is
labelled :data:`PROVENANCE`.

fp16 emulation: a value whose type in the program is fp16 is held as a float32
array whose values are exactly representable in fp16; every op computes in
float32 from those and rounds its output to fp16 (``np.float16``) when the
program types that output fp16. ``cast`` converts dtypes. Program outputs and
states are returned in their declared dtypes (fp16 states stay ``np.float16``).

Load (``MILProgram.load``) parses the proto once, decodes every weight blob
once, folds every op whose inputs are all constant (``const``, ``constexpr_*``
and any pure op on constants) and compiles the remaining ops of each function
into a flat list of steps; an op type the interpreter does not implement
fails the load with :class:`~core.errors.UnsupportedOpError` naming it.
``run`` then walks the compiled steps only.

Usage::

    prog = MILProgram.load("text_decoder.mlpackage")
    state = prog.new_state("decode")          # {name: np.float16 zeros}
    out = prog.run({"embeds": ..., ...}, function="decode", state=state)

Layout: :mod:`.program` reads the saved package (:class:`MILProgram`), :mod:`.values` its types, weight
blobs and constants, :mod:`.compile` folds constants and compiles each function into steps
(:mod:`.graph`), :mod:`.interpreter` runs them, and :mod:`.ops` implements the op types by family
(semantics from coremltools' MIL op definitions, ``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``).
The protobuf messages are reached through :mod:`targets.coreml.compat`.
"""

from __future__ import annotations

from targets.coreml.mil.ops import SUPPORTED_OPS
from targets.coreml.mil.program import MILProgram

PROVENANCE = "Core ML program emulated on Linux (NumPy MIL interpreter)"

__all__ = ["MILProgram", "PROVENANCE", "SUPPORTED_OPS"]
