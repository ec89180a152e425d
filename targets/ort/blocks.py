"""One method's repeated blocks (decoder layers, vision blocks) run from the artifact's own graph, for blockwise parity.

torch.onnx names each node after the module that emitted it (``text.layers.7.mlp.down_proj/MatMul_312``), so the
nodes of block ``i`` are those whose scope is ``<family>.<i>`` or below it. A block's input is the data input of
its first node (the block's first norm reads the residual stream), and its output is the input of the first scoped
node after it that belongs to no block of the family's earlier ones (the next block's first norm, or the final
norm after the last block). Two ways to run them:

* **isolated**: the subgraph from a block's input to its output (``onnx.utils.Extractor``) fed the *reference's*
  input to that block, plus whatever graph inputs the block reads (mask, positions, its past KV): the error that
  block adds on its own;
* **accumulated**: the whole method with every block output added as a graph output, fed the method's own inputs:
  the error as it builds up through the artifact.

Both run the artifact's weights where they are: each extracted graph is handed to onnxruntime as bytes with the
artifact's folder as the place its external data lives (``session.model_external_initializers_file_folder_path``;
onnxruntime refuses external data outside the model's folder, links included), so nothing is copied or written
and a 9B decoder layer opens with only its own weights resident.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import Artifact
from core.components import BLOCK_FAMILIES
from core.errors import BadInputError, RuntimeFailure


def _scope(node: Any) -> str:
    return node.name.rpartition("/")[0]


def _block_of(scope: str, family: str) -> int | None:
    m = re.match(re.escape(family) + r"\.(\d+)(?:\.|$)", scope)
    return int(m.group(1)) if m else None


def block_boundaries(graph: Any, family: str) -> list[tuple[str, str]]:
    """(input tensor, output tensor) of each block of ``family`` in ``graph``, in order."""
    inits = {i.name for i in graph.initializer}
    nodes = list(graph.node)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, n in enumerate(nodes):
        b = _block_of(_scope(n), family)
        if b is not None:
            first.setdefault(b, k)
            last[b] = k
    if not first or sorted(first) != list(range(len(first))):
        raise BadInputError(f"blockwise: the graph has no blocks named {family}.N (found {sorted(first)})")

    def data_input(node: Any) -> str:
        ins = [i for i in node.input if i and i not in inits]
        if not ins:
            raise BadInputError(f"blockwise: {node.name} reads no tensor")
        return ins[0]

    out = []
    n_blocks = len(first)
    for b in range(n_blocks):
        start = data_input(nodes[first[b]])
        if b + 1 < n_blocks:
            end = data_input(nodes[first[b + 1]])
        else:
            after = next((n for n in nodes[last[b] + 1:] if _scope(n) and _block_of(_scope(n), family) is None), None)
            if after is None:
                raise BadInputError(f"blockwise: nothing follows the last {family} block in the graph")
            end = data_input(after)
        out.append((start, end))
    return out


def _session(model: Any, data_dir: Path, what: str):
    """An onnxruntime session of ``model`` (its initializers still external-data references, not loaded) whose
    external data is read from ``data_dir``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdqisint8allowed", "1")  # as targets/ort/session.py opens artifacts
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["NchwcTransformer"])
    except Exception as e:
        raise RuntimeFailure(f"onnxruntime cannot load {what}: {str(e).splitlines()[0]}") from e


def _reached_inputs(graph: Any, producers: dict[str, Any], output: str, stop: str) -> list[str]:
    """The graph inputs ``output`` depends on without passing through ``stop`` (``producers``: tensor -> node)."""
    graph_inputs = {i.name for i in graph.input}
    seen, todo, found = set(), [output], []
    while todo:
        t = todo.pop()
        if t in seen or t == stop or not t:
            continue
        seen.add(t)
        if t in graph_inputs:
            found.append(t)
        elif t in producers:
            todo.extend(producers[t].input)
    return sorted(found)


def run_blocks(artifact: Artifact, method: str, feeds: dict[str, np.ndarray], block_inputs: list[np.ndarray],
               progress=None) -> dict[str, Any]:
    """Each block of ``method`` isolated (fed ``block_inputs[i]``, the reference's input to block i) and
    accumulated (the whole method on ``feeds``); returns {"family", "isolated": [...], "accumulated": [...]}."""
    import onnx
    from onnx import helper
    from onnx.utils import Extractor

    family = BLOCK_FAMILIES.get(method)
    if family is None:
        raise BadInputError(f"blockwise: {method} has no repeated blocks (only {', '.join(BLOCK_FAMILIES)})")
    src = artifact.dir / f"{method}.onnx"
    model = onnx.load(str(src), load_external_data=False)
    bounds = block_boundaries(model.graph, family)
    if len(bounds) != len(block_inputs):
        raise BadInputError(f"blockwise: the artifact's {method} has {len(bounds)} {family} blocks, the reference "
                            f"{len(block_inputs)}")
    isolated, accumulated = [], []
    extractor = Extractor(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    for i, ((start, end), x) in enumerate(zip(bounds, block_inputs)):
        if progress:
            progress(f"blockwise {method}", i, len(bounds) + 1)
        needs = _reached_inputs(model.graph, producers, end, start)
        sub = extractor.extract_model([start, *needs], [end])
        session = _session(sub, artifact.dir, f"{method}'s block {family}.{i}")
        block_feeds = {start: np.ascontiguousarray(x, np.float32), **{k: feeds[k] for k in needs}}
        isolated.append(session.run(None, block_feeds)[0])
        del session, sub
        gc.collect()
    if progress:
        progress(f"blockwise {method}", len(bounds), len(bounds) + 1)
    whole = onnx.load(str(src), load_external_data=False)
    outputs = {o.name for o in whole.graph.output}
    whole.graph.output.extend(helper.make_tensor_value_info(end, onnx.TensorProto.FLOAT, None)
                              for _, end in bounds if end not in outputs)
    session = _session(whole, artifact.dir, f"{method} with its block outputs exposed")
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    accumulated = [values[end] for _, end in bounds]
    del session
    gc.collect()
    if progress:
        progress(f"blockwise {method}", len(bounds) + 1, len(bounds) + 1)
    return {"family": family, "isolated": isolated, "accumulated": accumulated}
