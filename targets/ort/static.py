"""int8-static: QDQ by onnxruntime.quantization, calibrated on each method's recorded inputs.

``quant_pre_process`` (shape inference + optimisation), then ``quantize_static`` with per-channel
symmetric int8 weights and int8 activations calibrated by a ``CalibrationDataReader`` per method over
real samples (each method's inputs recorded by the reference runner over the calibration set; never
random tensors), on the inputs of the weight MatMuls only (outputs, attention's activation x
activation MatMuls and keep-float layers stay float: see :func:`float_inputs_for`). Embedding tables
stay float under ORT static by default, so they are then quantized as in int8-weight.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from calibration.stats import resolve_method_inputs, spread
from core.artifact import Progress
from core.errors import BadInputError
from targets.ort.files import EXTERNAL_DATA_BYTES, load_model, model_files, save_model
from targets.ort.graphs import method_feeds
from targets.ort.quantize_int8 import kept_float, quantize_weights
from targets.ort.quiet import quiet

# calibration samples per method; the decoder's are the most expensive to replay
MAX_CALIB_SAMPLES = 64


def calibration_feeds(calibration: Any | None, components: Any, methods: list[str],
                      progress: Progress) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each method's calibration samples as graph feeds (at most :data:`MAX_CALIB_SAMPLES`, spread over the set).

    ``calibration`` None records the built-in set through the reference runner. A method without samples is
    refused here, before any graph is exported.
    """
    recorded = resolve_method_inputs(calibration, components, progress)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    for m in methods:
        samples = spread(list(recorded.get(m, [])), MAX_CALIB_SAMPLES)
        if not samples:
            raise BadInputError(f"int8-static: the calibration data has no samples for method '{m}'")
        feeds[m] = [method_feeds(m, s, components.config) for s in samples]
    return feeds


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def activation_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes neither of whose inputs is a constant (an initializer or a Constant's output)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def float_inputs_for(model: Any, names: set[str]) -> None:
    """The ``names`` nodes read their activations in float again.

    onnxruntime's QDQ quantizer quantizes a tensor once and points every consumer at the
    DequantizeLinear output, excluded nodes included: a kept-float v_proj whose input the
    quantized q_proj shares would otherwise run on int8-rounded activations.
    """
    prod = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, name in enumerate(node.input):
            dq = prod.get(name)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]


def quantize_static_model(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], work: Path, keep: Iterable[str] = (),
                          int8_embeddings: bool = True) -> None:
    """The exported model at ``src`` as a QDQ model at ``dst``, calibrated on ``feeds`` (scratch files in ``work``).

    ``int8_embeddings``: the embedding table (which ORT's static quantizer leaves float) gets int8-weight's
    int8 Gather afterwards.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = work / f"{src.stem}.pre.onnx"
    large = sum(p.stat().st_size for p in model_files(src)) > EXTERNAL_DATA_BYTES
    ext = {"save_as_external_data": large, "all_tensors_to_one_file": True,
           "external_data_location": pre.name + ".data" if large else None}
    # (in the work dir: when onnxruntime's symbolic shape inference gives up it saves its partial
    # model as sym_shape_infer_temp.onnx + <uuid>.data into the current directory)
    src, pre = src.resolve(), pre.resolve()
    with quiet(), contextlib.chdir(work):
        try:
            quant_pre_process(str(src), str(pre), **ext)
        except Exception:
            # onnxruntime's symbolic shape inference gives up on some graphs (tiny's decoder: "Incomplete
            # symbolic shape inference"); ONNX shape inference + ORT optimisation still run
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, **ext)
    model = load_model(pre, with_data=False)
    keep = tuple(keep)
    exclude = [n.name for n in model.graph.node if kept_float(n.name, keep)]
    # the layers' MatMuls (a weight initializer on one side) are W8A8; attention's activation x activation
    # MatMuls (q.k^T, probs.v) stay float, as in ExecuTorch's int8-static and in the sensitivity simulation
    exclude += activation_matmuls(model)
    qdq = work / f"{src.stem}.qdq.onnx"
    with quiet():
        quantize_static(
            str(pre),
            str(qdq),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            # int8 inputs, float outputs: as Core ML's int8-static and the sensitivity simulation
            # (XNNPACK's int8 linear, ExecuTorch's, also quantizes its output)
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]},
        )
    model = load_model(qdq)
    float_inputs_for(model, set(exclude))
    if int8_embeddings:
        quantize_weights(model, matmuls=False, gathers=True, keep=keep)
    save_model(model, dst)
