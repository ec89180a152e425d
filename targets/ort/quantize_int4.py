"""int4-weight: 4-bit symmetric block-wise MatMul weights (``com.microsoft`` MatMulNBits), the rest int8.

4-bit symmetric weights in blocks of ``Recipe.group_size`` along the input dimension, float
activations at the graph boundary, by onnxruntime's own ``MatMulNBitsQuantizer`` (RTN): every MatMul
with a constant weight becomes a ``MatMulNBits`` (bits=4, ``accuracy_level`` 4, see
:data:`INT4_ACCURACY_LEVEL`). The vision linears come out of the exporter as ``Gemm`` (2-D input,
bias), which the quantizer does not take, so they are rewritten as MatMul + Add first
(:func:`gemm_to_matmul`). What stays: convs (patch embedding, audio front-end; their input channels
rarely tile a block) get int8 per-channel ``DequantizeLinear`` weights, and the embedding table the
int8 ``Gather`` of int8-weight. Why not a 4-bit ``GatherBlockQuantized`` table: onnxruntime 1.32 runs
it from the .onnx, but its ORT-format serialiser has no int4 tensor type ("Unsupported tensor data
type ... Invalid ORT format model" on load), and the .ort is what a phone gets. ``--group-size 0``
(per channel) is refused by the spec (``per_channel_groups=False``): MatMulNBits quantizes in blocks.

int8-weight with ``--group-size N`` takes the same path with ``bits=8`` (8-bit MatMulNBits, blocks of N). Why
offer it: onnxruntime's CPU EP fuses int8-weight's per-channel ``DequantizeLinear -> MatMul`` into an 8-bit
MatMulNBits with block 32 at session creation anyway, and a session built that way holds the int8 weights about
three times over while it is created (examples/ort_session_memory.py, 12 x 4096x4096: the per-channel DQ form 3.17x
the int8 bytes; 8-bit MatMulNBits written directly, block 128: 1.15x, peak 1.23x). The 9B's int8 export check then
peaked at 13.8 GiB instead of an OOM kill at 15.5 GiB (README "Exporting the 9B").
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from core.errors import BadInputError
from targets.ort.quantize_int8 import kept_float, quantize_weights, set_nodes
from targets.ort.quiet import quiet

# MatMulNBits accuracy_level 4: the CPU kernel quantizes each activation block to int8 on the fly and runs
# int8 dot products (MLAS SQNBitGemm CompInt8: ARM64 SDOT/I8MM, x86 AVX2/AVX-VNNI). Measured here on a
# 4096 x 4096 block-32 weight: 2x faster than the fp32-compute levels 0/1 at M = 1 (4.2 vs 8.6-9.1 ms, one
# thread), same cosine vs the float product (0.9964); tiny's decoder on random inputs: cosine 0.9788 vs 0.9790
# at level 1. It is also what ExecuTorch's 8da4w computes (int8 activations x int4 weights). SmolLM2-135M decode
# step (1 token after 64 past, round-robin in one process, loaded host): level 4 2.59x fp32, level 1 1.64x, level 0
# 1.91x; teacher-forced held-out top-1 vs fp32 0.667 / 0.673 / 0.673, perplexity +23.4% / +23.7% / +23.7%: the
# 4-bit rounding, not the int8 activation blocks, sets the accuracy.
INT4_ACCURACY_LEVEL = 4


def check_block_size(block_size: int, recipe: str = "int4-weight") -> None:
    """MatMulNBits takes power-of-two blocks of at least 16; checked before any export work starts."""
    if block_size < 16 or block_size & (block_size - 1):
        raise BadInputError(f"{recipe} on ort: block size {block_size} must be a power of two >= 16 (MatMulNBits)")


def gemm_to_matmul(model: Any, keep: Iterable[str] = ()) -> int:
    """Rewrite ``Gemm(A, B, C)`` with a constant 2-D B as ``MatMul(A, B') + C``, in place; returns the count.

    MatMulNBitsQuantizer takes MatMul only, and the exporter writes a linear on a
    2-D input (the vision encoder's) as Gemm. Only the plain form is rewritten
    (alpha = beta = 1, no transA); a transposed B gets a transposed copy (shared
    by every Gemm that reads it). The new nodes keep the Gemm's module prefix, so
    ``--keep-float`` still selects them; kept-float Gemms are left as they are.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    transposed: dict[str, str] = {}
    nodes, count = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        b = node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "Gemm" or not plain or b not in inits or len(inits[b].dims) != 2 or kept_float(node.name, keep):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            if b not in transposed:
                transposed[b] = f"{b}_T"
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[b]).T), transposed[b]))
            b = transposed[b]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        out = node.output[0]
        mm_out = f"{out}_matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], name=f"{node.name}_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}_Add"))
        count += 1
    set_nodes(g, nodes)
    return count


def quantize_nbits(model: Any, block_size: int, keep: Iterable[str] = (),
                   int8_embeddings: bool = True, bits: int = 4) -> tuple[Any, dict[str, Any]]:
    """``bits``-bit (4 or 8) symmetric block-wise MatMul weights (MatMulNBits) by onnxruntime's quantizer; the rest int8.

    Returns (the quantized model, counts). Convs and any weight MatMul the quantizer
    leaves (none on our graphs) get int8 per-channel DequantizeLinear weights and the
    embedding table (``int8_embeddings``) the int8 Gather, as in int8-weight, so no weight
    silently stays float; ``keep`` nodes stay float throughout.
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    check_block_size(block_size, "int4-weight" if bits == 4 else "int8-weight")
    keep = tuple(keep)
    gemms = gemm_to_matmul(model, keep)
    exclude = [n.name for n in model.graph.node if kept_float(n.name, keep)]
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=bits,
    )
    with quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
        quantizer.process()
    model = quantizer.model.model
    nbits = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    counts = quantize_weights(model, gathers=int8_embeddings, keep=keep)
    return model, {"matmul_nbits": nbits, "gemm_as_matmul": gemms, "int8_matmul_or_conv": counts["matmul"],
                   "int8_gather": counts["gather"], "block_size": block_size, "accuracy_level": INT4_ACCURACY_LEVEL,
                   "bits": bits}
