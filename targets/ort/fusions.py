"""onnxruntime's own offline fusions on the exported decoder: residual add + RMSNorm as one kernel.

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
"""

from __future__ import annotations

import re
from typing import Any

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
