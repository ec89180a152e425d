"""The ops the interpreter implements, by family; importing this package registers them all.

Op semantics follow coremltools' MIL op definitions (``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``).
"""

from __future__ import annotations

from targets.coreml.mil.ops import elementwise, gather, layout, linalg, norm, quant, reduce, state
from targets.coreml.mil.ops.base import OPS

# the families: importing each registers its ops in OPS
FAMILIES = (elementwise, reduce, linalg, norm, layout, gather, quant, state)

STATE_OPS = {"read_state", "write_state", "coreml_update_state"}
# ops that only move or pick values (input dtype = output dtype): an fp16 output needs no re-rounding
MOVES_VALUES = {"reshape", "transpose", "squeeze", "expand_dims", "slice_by_index", "slice_by_size", "slice_update",
                "concat", "stack", "split", "tile", "gather", "gather_along_axis", "gather_nd", "select", "read_state",
                "identity", "reverse", "flatten2d", "maximum", "minimum", "relu"}
TUPLE_PARAMS = {("concat", "values"), ("stack", "values"), ("einsum", "values"), ("reshape_like", "ref_tensors"),
                ("while_loop", "loop_vars")}

SUPPORTED_OPS: frozenset[str] = frozenset(OPS) | {"const", "cond", "while_loop"}
