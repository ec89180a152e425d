"""Lowering the exported methods to XNNPACK, the lowering report, and emission of the program.

The lowering report counts, per method, the XNNPACK subgraphs and the ops left on the portable path;
an export fails when a linear, matmul or convolution is among the latter (it would run on the slow
portable kernels).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from core.errors import ExportError
from targets.executorch.program import STATE

# ops that must never run outside XNNPACK (substring match on the edge op name)
MUST_DELEGATE = ("linear", ".mm.", "bmm", "addmm", "matmul", "convolution")


def lower(programs: Any, constants: dict[str, Any] | None = None,
          progress: Callable[[str, int, int], None] | None = None):
    """Every method (one ExportedProgram, or a dict of them) lowered together to one edge program manager
    (XNNPACK partitioner), with the runner's constant methods. ``progress`` (stage, done, total) hears of the
    edge passes (one unit) and then of each XNNPACK partition as XNNPACK compiles it.

    ExecuTorch's partitioner memoizes ``executorch.exir.backend.utils.is_same_node`` in an unbounded
    ``lru_cache`` keyed by fx nodes: every lowered graph's nodes stay alive with the real tensors in their
    ``meta["val"]`` (the quantized weights) until the process ends. On a 2-layer cut of the 9B that held
    825 MiB of int8 weights after the build; it is emptied after each lowering.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.exir.backend.utils import is_same_node

    try:
        with partition_progress(progress):
            return to_edge_transform_and_lower(
                programs,
                partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
                constant_methods=constants,
            )
    finally:
        is_same_node.cache_clear()


LOWERING_STAGE = "xnnpack lowering"


@contextmanager
def partition_progress(progress: Callable[[str, int, int], None] | None) -> Iterator[None]:
    """While it is open, ExecuTorch's XNNPACK backend reports to ``progress``: one unit when the edge passes and
    the partitioner are done (the first half of a lowering), then one per partition compiled. ExecuTorch has no
    progress hook of its own, so its two class attributes are wrapped and put back on exit."""
    if progress is None:
        yield
        return
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    state = {"done": 0, "total": 1}
    progress(LOWERING_STAGE, 0, 1)
    multimethod, preprocess = XnnpackBackend.preprocess_multimethod, XnnpackBackend.preprocess
    own = {k: XnnpackBackend.__dict__[k] for k in ("preprocess_multimethod", "preprocess") if k in XnnpackBackend.__dict__}

    def preprocess_all(cls, method_to_programs, method_to_specs):
        state["done"], state["total"] = 1, 1 + sum(len(v) for v in method_to_programs.values())
        progress(LOWERING_STAGE, 1, state["total"])
        return multimethod(method_to_programs, method_to_specs)

    def preprocess_one(*args, **kwargs):
        result = preprocess(*args, **kwargs)
        state["done"] = min(state["done"] + 1, state["total"])
        progress(LOWERING_STAGE, state["done"], state["total"])
        return result

    XnnpackBackend.preprocess_multimethod = classmethod(preprocess_all)
    XnnpackBackend.preprocess = staticmethod(preprocess_one)
    try:
        yield
    finally:
        for k in ("preprocess_multimethod", "preprocess"):
            if k in own:
                setattr(XnnpackBackend, k, own[k])
            else:
                delattr(XnnpackBackend, k)
        if state["done"] < state["total"]:  # nothing to compile, or a failure: the bar is closed either way
            progress(LOWERING_STAGE, state["total"], state["total"])


def lowering_report(edge: Any, methods: list[str]) -> dict[str, Any]:
    """Per method: nodes delegated to XNNPACK vs left on the portable path, by op."""
    report: dict[str, Any] = {}
    for m in methods:
        graph = edge.exported_program(m).graph
        left: Counter[str] = Counter()
        delegates = 0
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target))
            if "executorch_call_delegate" in name:
                delegates += 1
            elif name != "getitem":
                left[name.split(":")[0]] += 1
        report[m] = {"xnnpack_subgraphs": delegates, "not_delegated": dict(sorted(left.items()))}
    return report


def check_lowering(report: dict[str, Any]) -> None:
    """ExportError naming every MUST_DELEGATE op the lowering left on the portable path."""
    for m, r in report.items():
        bad = [op for op in r["not_delegated"] if any(k in f".{op}." for k in MUST_DELEGATE)]
        if bad:
            raise ExportError(
                f"{m}: {', '.join(op + ' x' + str(r['not_delegated'][op]) for op in bad)} not delegated to XNNPACK "
                "(would run on the slow portable kernels)"
            )


def to_executorch(edge: Any):
    """Emit the program. The decoder's state (KV cache, rope offset, image flag) starts as its initial
    values (InitializedMutableBufferPass) and lives in memory id 2 (share_mutable_buffers), apart from
    the activation arena that the Python runtime shares between methods."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    return edge.to_executorch(
        ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass([STATE])],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
