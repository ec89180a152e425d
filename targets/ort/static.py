"""int8-static: QDQ by onnxruntime.quantization, calibrated on each method's recorded inputs.

``quant_pre_process`` (shape inference + optimisation), then ``quantize_static`` with per-channel
symmetric int8 weights and asymmetric uint8 activations calibrated by a ``CalibrationDataReader`` per
method over real samples (each method's inputs recorded by the reference runner over the calibration
set; never random tensors), on the inputs of the weight MatMuls only (outputs, attention's activation x
activation MatMuls and keep-float layers stay float: see :func:`float_inputs_for`). Embedding tables
stay float under ORT static by default, so they are then quantized as in int8-weight.

Why uint8 activations: onnxruntime's CPU EP fuses each ``Q -> DQ(activation), DQ(weight) -> MatMul`` into
``MatMulIntegerToFloat`` (an integer GEMM with a float output) whatever the activation type, but with int8
activations and ``session.qdqisint8allowed`` on (the target's session and the ARM-targeted .ort
conversion set it) the x86 kernel it lands on is MLAS's S8S8 path, measured 9.6 ms against 0.25 ms for
U8S8 on a 576 x 1536 MatMul at M = 1 (fp32: 1.4 ms): SmolLM2's int8-static decoded at 0.2x its own fp32.
uint8 activations x int8 weights is the form every MLAS platform runs on its fast integer kernels
(x86 VNNI / AVX2, ARM64 UDOT/SDOT), and asymmetric uint8 spends its 256 levels on the calibrated range
instead of mirroring it around zero. (On x86 without VNNI, AVX2's U8S8 can saturate int16 sums: that
is onnxruntime's ``reduce_range`` case; phones and VNNI machines are not affected.)

The activation ranges come from ``ACTIVATION_RANGES`` (onnxruntime's ``CalibrationMethod``), MinMax by
default: see :data:`ACTIVATION_RANGE` for what was measured.
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
from targets.ort.spec import ACTIVATION_RANGE_NAMES

# calibration samples per method; the decoder's are the most expensive to replay
MAX_CALIB_SAMPLES = 64

# the op types whose inputs int8-static quantizes
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")

# activation range method -> (onnxruntime CalibrationMethod member, its extra options). Percentile clips at
# the 99.999th percentile of a 2048-bin histogram; Entropy picks the KL-divergence-minimising clip of a
# 128-bin histogram; Distribution (meant for float8) keeps the histogram's full span.
ACTIVATION_RANGES: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    "percentile": ("Percentile", {"CalibPercentile": 99.999, "CalibTensorRangeSymmetric": False, "CalibStridedMinMax": 1}),
    "entropy": ("Entropy", {"CalibTensorRangeSymmetric": False, "CalibStridedMinMax": 1}),
    "distribution": ("Distribution", {"CalibStridedMinMax": 1}),
}  # (CalibStridedMinMax 1: one sample per collect_data, see _Reader)
# The default (the spec's first name), read at call time. SmolLM2-135M decoder, 64 calibration samples, teacher-forced on the held-out
# texts (162 tokens) vs the fp32 decoder: top-1 / perplexity delta / mean logits cosine: minmax 0.549 / +56% / 0.821,
# entropy 0.617 / +77% / 0.788, percentile 0.593 / +101% / 0.766 (int8 symmetric minmax, before uint8: 0.475 /
# +121% / 0.682). MinMax keeps the outlier channels the perplexity depends on; see the README's "ONNX Runtime kernels".
ACTIVATION_RANGE = ACTIVATION_RANGE_NAMES[0]


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
    """onnxruntime.quantization CalibrationDataReader over recorded feeds.

    ``__len__`` and ``set_range`` let quantize_static walk the samples in strides (``CalibStridedMinMax``): the
    histogram calibrators stack every sample's activations of one collect_data call into one array, which
    fails on samples of different lengths, so they are given one sample per call.
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])


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


def calibration_method(name: str | None) -> tuple[Any, dict[str, Any]]:
    """onnxruntime's CalibrationMethod and extra options for an activation range name (None: the default)."""
    from onnxruntime.quantization import CalibrationMethod

    name = ACTIVATION_RANGE if name is None else name
    if name not in ACTIVATION_RANGES:
        raise BadInputError(f"int8-static on ort: unknown activation range '{name}' (choose from {', '.join(ACTIVATION_RANGES)})")
    member, options = ACTIVATION_RANGES[name]
    return getattr(CalibrationMethod, member), dict(options)


def quantize_static_model(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], work: Path, keep: Iterable[str] = (),
                          int8_embeddings: bool = True, activation_range: str | None = None) -> None:
    """The exported model at ``src`` as a QDQ model at ``dst``, calibrated on ``feeds`` (scratch files in ``work``).

    ``int8_embeddings``: the embedding table (which ORT's static quantizer leaves float) gets int8-weight's
    int8 Gather afterwards. ``activation_range``: a key of :data:`ACTIVATION_RANGES` (None: :data:`ACTIVATION_RANGE`).
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
    method, range_options = calibration_method(activation_range)
    model = load_model(pre, with_data=False)
    keep = tuple(keep)
    exclude = [n.name for n in model.graph.node if kept_float(n.name, keep)]
    # the layers' MatMuls (a weight initializer on one side) are W8A8; attention's activation x activation
    # MatMuls (q.k^T, probs.v: the vision tower's; the decoder's attention is one GroupQueryAttention, never
    # quantized) stay float, as in ExecuTorch's int8-static and in the sensitivity simulation
    exclude += activation_matmuls(model)
    if not any(n.op_type in QUANTIZED_OPS and n.name not in exclude for n in model.graph.node):
        # nothing to calibrate (the token embedding): onnxruntime's histogram calibrators raise on an empty
        # histogram where MinMax passes the model through
        method, range_options = calibration_method("minmax")
    qdq = work / f"{src.stem}.qdq.onnx"
    with quiet():
        quantize_static(
            str(pre),
            str(qdq),
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            calibrate_method=method,
            # uint8 activations (asymmetric) x int8 weights: the U8S8 integer GEMM (see the module docstring)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            # integer inputs, float outputs (MatMulIntegerToFloat): as Core ML's int8-static and the
            # sensitivity simulation (XNNPACK's int8 linear, ExecuTorch's, also quantizes its output)
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS), **range_options},
        )
    model = load_model(qdq)
    float_inputs_for(model, set(exclude))
    if int8_embeddings:
        quantize_weights(model, matmuls=False, gathers=True, keep=keep)
    save_model(model, dst)
