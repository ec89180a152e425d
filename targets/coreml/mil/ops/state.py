"""State ops (values in env are the caller's state arrays; read copies, write updates in place)."""

from __future__ import annotations

import numpy as np

from targets.coreml.mil.ops.base import register


@register("read_state")
def _read_state(a, n):
    x = a["input"]
    return x if x.dtype == np.float16 else np.array(x, copy=True)  # fp16 is copied to float32 by the output cast


@register("write_state")
def _write_state(a, n):
    a["input"][...] = np.asarray(a["data"]).astype(a["input"].dtype)
    return ()


@register("coreml_update_state")
def _coreml_update_state(a, n):
    a["state"][...] = np.asarray(a["value"]).astype(a["state"].dtype)
    return np.asarray(a["value"])
