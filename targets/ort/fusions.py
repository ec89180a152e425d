"""Offline fusions on the exported decoder: residual add + RMSNorm as one kernel, q/k/v as one MatMul.

onnxruntime's session optimizer fuses each RMSNorm (``x / sqrt(mean(x^2) + eps) * w``, as the eager
RMSNorm writes it) into ``SimplifiedLayerNormalization`` when the session opens, but never folds the
residual ``Add`` before it in: ``SkipSimplifiedLayerNormalization`` (add, norm, and the sum passed on as the
next residual) is written only by onnxruntime's offline transformer optimizer, which is what
onnxruntime-genai's builder graphs carry. The two fusion passes here are that optimizer's own
(``onnxruntime.transformers.fusion_simplified_layernorm``), run on the graph before the recipe's quantizer:
they touch only the norms and adds (the weights' MatMuls stay as they are, so the streamed 9B export runs
them on its weightless graph too).

Only the adds inside one decoder layer are folded (attention's residual into ``post_attention_layernorm``);
a layer's last residual add and the next layer's first norm stay two kernels, so that every layer still
begins with a node of its own reading the residual stream: blockwise parity (targets/ort/blocks.py) cuts
the graph there. Every fused node is named after the module of the node whose output it took over, as
``name_by_module`` names the rest.

:func:`pack_qkv` then joins each layer's q, k and v projections into one MatMul whose output is
``GroupQueryAttention``'s packed query (key and value inputs left empty: the kernel splits the
``[1, T, (n + 2 kv) * D]`` rows itself), the layout onnxruntime-genai's builder writes: two MatMuls (and
bias Adds) fewer per layer. The weights are
joined along the output axis, so every per-column quantizer here (int8 per channel, int4 and int8 blocks
along K) gives each column the scales it had before, GPTQ's grid included.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from targets.ort.quantize_int8 import kept_float, set_nodes
from targets.ort.quiet import quiet

_LAYER = re.compile(r"\.layers\.(\d+)(?:\.|/|$)")


def _layer(name: str) -> str | None:
    m = _LAYER.search(name)
    return m.group(1) if m else None


def _rename(graph: Any, scope_of: dict[str, str]) -> None:
    """Name nodes the fusions made (no scope) after the scope that produced their first output before."""
    for i, node in enumerate(graph.node):
        if "/" not in node.name and node.output and scope_of.get(node.output[0]):
            node.name = f"{scope_of[node.output[0]]}/{node.op_type}_fused_{i}"


def fuse_norms(model: Any) -> Any:
    """``model`` (a ModelProto) with its RMSNorms as ``SimplifiedLayerNormalization`` and those that follow a
    residual add of the same layer as ``SkipSimplifiedLayerNormalization``; the ModelProto, changed in place."""
    from onnxruntime.transformers.fusion_simplified_layernorm import (FusionSimplifiedLayerNormalization,
                                                                      FusionSkipSimplifiedLayerNormalization)
    from onnxruntime.transformers.onnx_model import OnnxModel

    class WithinLayer(FusionSkipSimplifiedLayerNormalization):
        def __init__(self, model: Any):
            # no symbolic shape inference (shape_infer=False): it fails on the streamed decoder's graph, whose
            # weights are not in it yet, and then no add is fused; it is only needed to find a broadcasting add,
            # and a residual add's two inputs are both [1, T, H]
            super(FusionSkipSimplifiedLayerNormalization, self).__init__(
                model, "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", shape_infer=False)

        def fuse(self, node, input_name_to_nodes, output_name_to_node):
            add = self.model.get_parent(node, 0, output_name_to_node)
            if add is not None and _layer(add.name) is not None and _layer(add.name) == _layer(node.name):
                super().fuse(node, input_name_to_nodes, output_name_to_node)

    scope_of = {o: n.name.rpartition("/")[0] for n in model.graph.node for o in n.output if "/" in n.name}
    with quiet():
        wrapped = OnnxModel(model)
        FusionSimplifiedLayerNormalization(wrapped).apply()
        _rename(wrapped.model.graph, scope_of)
        WithinLayer(wrapped).apply()
        wrapped.prune_graph()
    _rename(wrapped.model.graph, scope_of)
    _sort(wrapped.model.graph)
    return wrapped.model


def _sort(graph: Any) -> None:
    """Nodes in dependency order (the fusions append their nodes at the end). Not onnxruntime's
    ``OnnxModel.topological_sort``: the streamed decoder's graph reads weights that are not in it yet."""
    produced = {o: n for n in graph.node for o in n.output if o}
    done: set[int] = set()
    order: list[Any] = []

    def visit(node: Any) -> None:
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if id(n) in done:
                continue
            if expanded:
                done.add(id(n))
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((produced[i], False) for i in reversed(n.input) if i in produced and id(produced[i]) not in done)

    for node in graph.node:
        visit(node)
    nodes = list(order)
    del graph.node[:]
    graph.node.extend(nodes)


def _projection(name: str, producer: dict[str, Any]) -> tuple[Any, Any] | None:
    """(MatMul, bias Add or None) where ``name`` is a linear's output (``x @ W`` or ``x @ W + b``), else None."""
    node = producer.get(name)
    if node is not None and node.op_type == "Add":
        inputs = [producer.get(i) for i in node.input]
        mm = next((n for n in inputs if n is not None and n.op_type == "MatMul"), None)
        return (mm, node) if mm is not None and len(node.input) == 2 else None
    return (node, None) if node is not None and node.op_type == "MatMul" else None


def pack_qkv(model: Any, keep: Iterable[str] = (), external: dict[str, tuple[int, ...]] | None = None) -> dict[str, list[str]]:
    """Each GroupQueryAttention fed by three linears of one input (q, k, v: MatMul with a 2-D constant weight,
    all with a bias Add or none) takes their outputs as one packed query from a single MatMul; in place.

    The joined weight ``<layer>.self_attn.qkv_proj.weight`` is ``[K, Nq + Nk + Nv]``. ``external``: the
    shapes of weights that are not in the graph (the streamed decoder's); those are joined by the caller
    from the returned ``{joined name: [q, k, v weight names]}`` (in-graph weights are joined here). A layer
    with any of the three in ``keep`` (--keep-float module names) stays as it was.
    """
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    external = external or {}
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(inits[name].dims) if name in inits else (tuple(external[name]) if name in external else None)

    joins: dict[str, list[str]] = {}
    dropped: set[int] = set()
    stale: set[str] = set()
    for gqa in [n for n in g.node if n.op_type == "GroupQueryAttention"]:
        if len(gqa.input) < 3 or not gqa.input[1] or not gqa.input[2]:
            continue
        branches = [_projection(x, producer) for x in gqa.input[:3]]
        if any(b is None for b in branches):
            continue
        mms = [mm for mm, _ in branches]
        adds = [add for _, add in branches]
        weights = [mm.input[1] for mm in mms]
        shapes = [shape(w) for w in weights]
        if (len({mm.input[0] for mm in mms}) != 1 or any(s is None or len(s) != 2 for s in shapes)
                or len({s[0] for s in shapes}) != 1 or len(set(weights)) != 3
                or any(uses.get(w, 0) != 1 for w in weights) or any(kept_float(mm.name, keep) for mm in mms)
                or any(uses.get(mm.output[0], 0) != 1 for mm in mms)
                or len({a is None for a in adds}) != 1 or len({w in external for w in weights}) != 1):
            continue
        biases = []
        if adds[0] is not None:
            biases = [next((i for i in a.input if i != mm.output[0]), "") for a, mm in zip(adds, mms)]
            if (any(b not in inits or len(inits[b].dims) != 1 or uses.get(b, 0) != 1 for b in biases)
                    or any(uses.get(a.output[0], 0) != 1 for a in adds)):
                continue
        scope = mms[0].name.split("/")[0]
        packed = (scope.rpartition(".")[0] + ".qkv_proj") if "." in scope else f"qkv_proj_{len(joins)}"
        name = f"{packed}.weight"
        joins[name] = weights
        if weights[0] not in external:
            joined = np.concatenate([numpy_helper.to_array(inits[w]) for w in weights], axis=1)
            g.initializer.append(numpy_helper.from_array(joined, name))
        mms[0].input[1] = name
        if biases:
            g.initializer.append(numpy_helper.from_array(
                np.concatenate([numpy_helper.to_array(inits[b]) for b in biases]), f"{packed}.bias"))
            adds[0].input[list(adds[0].input).index(biases[0])] = f"{packed}.bias"
        for node in [mms[0]] + ([adds[0]] if biases else []):
            node.name = node.name.replace(scope, packed, 1)
            stale.add(node.output[0])
        for node in mms[1:] + [a for a in adds[1:] if a is not None]:
            dropped.add(id(node))
            stale.update(node.output)
        gqa.input[1] = gqa.input[2] = ""
    if joins:
        set_nodes(g, [n for n in g.node if id(n) not in dropped])
        # the q output's recorded shape no longer holds; k's and v's outputs are gone
        infos = [v for v in g.value_info if v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(infos)
    return joins


def fuse_decoder(model: Any, keep: Iterable[str] = (), external: dict[str, tuple[int, ...]] | None = None
                 ) -> tuple[Any, dict[str, list[str]]]:
    """The decoder's fusions, in the one order the whole and the streamed export share: :func:`fuse_norms`,
    then :func:`pack_qkv` (``keep``, ``external``: as it takes them). (the model, pack_qkv's joins)."""
    model = fuse_norms(model)
    return model, pack_qkv(model, keep, external)
