"""int8-weight: per-channel symmetric int8 weights with float activations, as standard ONNX ops.

Every MatMul/Gemm/Conv weight becomes an int8 initializer feeding ``DequantizeLinear(axis=output
channel)``, and the embedding table an int8 ``Gather`` whose rows are rescaled by a gathered per-row
scale (only the looked-up rows are dequantized). Why not the stock tools: ``quantize_dynamic``
quantizes activations too (W8A8 with ``DynamicQuantizeLinear``/``MatMulInteger``, not weight-only),
and ``MatMulNBitsQuantizer(bits=8)`` emits block-wise ``com.microsoft`` contrib ops (``MatMulNBits``,
``GatherBlockQuantized``) that the NNAPI and Core ML EPs never take and that are block-wise, not
per-channel. Plain ``DequantizeLinear`` runs in every ORT build, mobile included, and ORT's QDQ-aware
EPs see an ordinary DQ -> MatMul pattern. int8-static and int4-weight reuse it for what their own
quantizers leave float (the embedding table; int4's convs).

What onnxruntime 1.32's CPU EP runs (examples/ort_profile.py): it fuses each per-channel ``DequantizeLinear ->
MatMul`` into an 8-bit ``MatMulNBits`` (block 32) at ``session.qdq_matmulnbits_accuracy_level`` 4, its default,
which quantizes activation blocks to int8 on the fly. Levels 0-2 run an unoptimised 8-bit path (SmolLM2 decode
step 12x slower than level 4, round-robin in one process) for the same top-1 and perplexity, and block-wise int8 weights land on the
same kernel with the same error: the per-channel form here is as fast and as accurate as ORT makes int8 weights.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

def kept_float(node_name: str, keep: Iterable[str]) -> bool:
    """Whether a node (named ``module.path/Op_i``) lies inside one of the ``keep`` modules."""
    module = node_name.split("/", 1)[0] if "/" in node_name else ""
    return any(k and (module == k or module.startswith(k + ".")) for k in keep)


def _symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 along ``axis`` (the first or the last): (q, scale).

    Works through the weight in blocks of rows so a multi-GiB table (the 9B
    embedding and lm_head) needs no full-size float temporaries.
    """
    per_row = axis == 0
    if not per_row and axis != w.ndim - 1:
        raise ValueError(f"per-channel axis must be the first or the last, got {axis} of {w.ndim}")
    rows = w.reshape(w.shape[0], -1) if per_row else w.reshape(-1, w.shape[-1])
    step = max(1, (1 << 22) // max(1, rows.shape[1]))
    blocks = range(0, rows.shape[0], step)
    if per_row:
        amax = np.concatenate([np.abs(rows[i : i + step]).max(axis=1) for i in blocks]).astype(np.float32)
    else:
        amax = np.zeros(rows.shape[1], np.float32)
        for i in blocks:
            np.maximum(amax, np.abs(rows[i : i + step]).max(axis=0), out=amax)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.empty(rows.shape, np.int8)
    for i in blocks:
        div = scale[i : i + step, None] if per_row else scale[None, :]
        q[i : i + step] = np.clip(np.rint(rows[i : i + step] / div), -127, 127)
    return q.reshape(w.shape), scale


def set_nodes(g: Any, nodes: list[Any]) -> None:
    """Replace the graph's nodes and drop the initializers no node reads any more."""
    del g.node[:]
    g.node.extend(nodes)
    used = {n for node in g.node for n in node.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)


def quantize_weights(model: Any, matmuls: bool = True, gathers: bool = True, keep: Iterable[str] = ()) -> dict[str, int]:
    """Per-channel symmetric int8 weights with float activations, in place; returns counts.

    MatMul/Gemm/Conv with a constant weight: weight -> int8 initializer +
    DequantizeLinear (axis = output channel). Gather on a constant table
    (an embedding): int8 table, per-row scale gathered alongside, Cast * scale.
    Weights already fed by a DequantizeLinear (a QDQ model) are left alone.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = tuple(keep)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_nodes: dict[int, list[Any]] = {}  # index of the node the new nodes go before
    replaced: dict[str, str] = {}
    drop: set[int] = set()  # original Gathers, replaced by their int8 version
    counts = {"matmul": 0, "gather": 0}

    def skip(node) -> bool:
        return kept_float(node.name, keep)

    for idx, node in enumerate(g.node):
        if skip(node):
            continue
        if matmuls and node.op_type in ("MatMul", "Gemm", "Conv"):
            wi = 1
            name = node.input[wi] if len(node.input) > wi else ""
            if name not in inits:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.dtype != np.float32 or w.ndim < 2:
                continue
            if name not in replaced:
                if node.op_type == "MatMul":
                    axis = w.ndim - 1
                elif node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                else:
                    axis = 0
                # all users must agree on the axis; otherwise leave the weight float
                users = consumers.get(name, [])
                if any(u.op_type != node.op_type for u in users) or any(list(u.input).index(name) != wi for u in users):
                    continue
                q, scale = _symmetric_int8(w, axis)
                qn, sn, zn, out = f"{name}_q8", f"{name}_scale", f"{name}_zero", f"{name}_dq"
                g.initializer.extend([
                    numpy_helper.from_array(q, qn),
                    numpy_helper.from_array(scale, sn),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn),
                ])
                new_nodes.setdefault(idx, []).append(
                    helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=f"{name}_DequantizeLinear", axis=axis)
                )
                replaced[name] = out
                counts["matmul"] += 1
            node.input[wi] = replaced[name]
        elif gathers and node.op_type == "Gather":
            name = node.input[0]
            if name not in inits or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
                continue
            w = numpy_helper.to_array(inits[name])
            if w.dtype != np.float32 or w.ndim != 2:
                continue
            q, scale = _symmetric_int8(w, 0)
            qn, sn = f"{name}_q8", f"{name}_rowscale"
            if qn not in {i.name for i in g.initializer}:
                g.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
            ids, out, base = node.input[1], node.output[0], f"{node.name or name}_q8"
            new_nodes.setdefault(idx, []).extend([
                helper.make_node("Gather", [qn, ids], [f"{base}_rows"], name=f"{base}_Gather", axis=0),
                helper.make_node("Cast", [f"{base}_rows"], [f"{base}_float"], name=f"{base}_Cast", to=TensorProto.FLOAT),
                helper.make_node("Gather", [sn, ids], [f"{base}_scale"], name=f"{base}_GatherScale", axis=0),
                helper.make_node("Unsqueeze", [f"{base}_scale", f"{base}_axes"], [f"{base}_scale2"], name=f"{base}_Unsqueeze"),
                helper.make_node("Mul", [f"{base}_float", f"{base}_scale2"], [out], name=f"{base}_Mul"),
            ])
            g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{base}_axes"))
            drop.add(idx)
            counts["gather"] += 1

    nodes = []
    for idx, node in enumerate(g.node):
        nodes.extend(new_nodes.get(idx, []))
        if idx not in drop:
            nodes.append(node)
    set_nodes(g, nodes)
    return counts
