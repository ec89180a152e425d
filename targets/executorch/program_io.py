"""Each method's inputs and outputs as the saved .pte declares them (artifact.json's "programs").

Read back from the written file through the runtime, not from the export's intentions: what an app
must feed is what the program's method metadata says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ExportError

# c10::ScalarType codes (what MethodMeta's TensorInfo.dtype() returns) -> numpy-style names
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                7: "float64", 11: "bool", 15: "bfloat16"}


def user_input_names(ep: Any) -> list[str]:
    """The exported program's user inputs, by name (the .pte keeps positions only)."""
    from torch.export.graph_signature import InputKind

    return [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]


def _tensors(get: Any, labels: list[str]) -> list[dict[str, Any]]:
    """name, dtype and sizes of tensors 0..len(labels)-1 as ``get(i)`` (a TensorInfo getter) reads them."""
    return [{"name": n, "dtype": SCALAR_TYPES.get(int(t.dtype()), str(t.dtype())), "shape": [int(d) for d in t.sizes()]}
            for n, t in zip(labels, (get(i) for i in range(len(labels))))]


def read_program_io(pte: Path, names: dict[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
    """Each method's inputs and outputs as the ExecuTorch runtime reads them from the saved .pte.

    dtype and sizes come from the program's method metadata; a dynamic dimension reads as the upper
    bound the program was planned for (e.g. max_seq_len for T), which is what the runtime enforces.
    ``names`` gives (input names, output names) per method: the exported program's input names, the
    runner interface's output names (the .pte stores neither).
    """
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte)
    out: dict[str, Any] = {}
    for m, (ins, outs) in names.items():
        meta = program.metadata(m)
        if meta.num_inputs() != len(ins) or meta.num_outputs() != len(outs):
            raise ExportError(
                f"{pte.name} method {m} takes {meta.num_inputs()} inputs and returns {meta.num_outputs()} outputs; "
                f"the export expected {ins} -> {outs}"
            )
        out[m] = {"file": pte.name, "inputs": _tensors(meta.input_tensor_meta, ins),
                  "outputs": _tensors(meta.output_tensor_meta, outs)}
    return out


def read_partitions(pte: Path) -> dict[str, dict[str, Any]]:
    """Per method of the saved .pte: its delegate calls by backend and its portable kernel calls by op.

    Read from the program's own instruction chains (what the runtime will execute, in order), so it
    works on any .pte, also one exported before the lowering report existed. Only the flatbuffer head
    is parsed: constant and delegate segments are not read.
    """
    from collections import Counter

    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header
    from executorch.exir.schema import DelegateCall, KernelCall

    with open(pte, "rb") as f:
        head = f.read(64)
        header = _get_extended_header(head)
        f.seek(0)
        data = f.read(header.program_size) if header is not None else f.read()
    program = _flatbuffer_to_program(data)
    out: dict[str, dict[str, Any]] = {}
    for plan in program.execution_plan:
        delegates: Counter[str] = Counter()
        kernels: Counter[str] = Counter()
        for chain in plan.chains:
            for ins in chain.instructions:
                arg = ins.instr_args
                if isinstance(arg, DelegateCall):
                    delegates[plan.delegates[arg.delegate_index].id] += 1
                elif isinstance(arg, KernelCall):
                    op = plan.operators[arg.op_index]
                    kernels[op.name + (f".{op.overload}" if op.overload else "")] += 1
        out[plan.name] = {"delegate_calls": dict(delegates), "kernel_calls": dict(sorted(kernels.items()))}
    return out
