"""Conversion: each method of the model to a Core ML ML program (an in-memory ``MLModel``, not yet saved).

* ``token_embedding`` (tokens int32 ``[1, T]``, T a RangeDim), ``vision_encoder`` and ``audio_encoder``
  (fixed shapes) from ``torch.export`` programs of fp16 copies (``run_decompositions({})`` first:
  coremltools rejects the training dialect);
* ``text_decoder`` from ``torch.jit.trace`` of :class:`~targets.coreml.adapt.CoreMLDecoder`, twice:
  ``prefill`` (T a RangeDim 1..max_seq_len) and ``decode`` (T = 1), the KV cache as Core ML states
  (``ct.StateType``). torch.export fails on the cache write's data-dependent slice start (STACK.md).

Every program targets iOS 18 with compute precision FLOAT16; float inputs and outputs are float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.errors import ExportError
from targets.coreml import compat
from targets.coreml.adapt import CoreMLDecoder, TableRope, fp16_args, fp16_copy
from targets.coreml.spec import HIDDEN_OUTPUT, OUTPUT_NAMES
from targets.coreml.util import error_cause, quiet


def _register_converters() -> None:
    """torch.export's ``alias`` (a view, left by run_decompositions in the audio encoder) is a no-op; the
    FLOAT16 pass's overflow test scans large constants in slices (compat.lean_fp16_overflow_check)."""
    compat.alias_torch_op("alias", "clone")
    compat.lean_fp16_overflow_check()


def convert_method(components: Any, method: str) -> Any:
    """token_embedding / vision_encoder / audio_encoder -> ct.models.MLModel (not yet saved).

    From ``torch.export`` of an fp16 copy of the method (``run_decompositions({})``
    first); the package's float inputs and outputs are float32.
    """
    import coremltools as ct

    _register_converters()
    try:
        with torch.no_grad(), quiet():
            module = fp16_copy(components.methods()[method])
            example = fp16_args(components.example_inputs(method))
            ep = torch.export.export(module, example, dynamic_shapes=components.dynamic_shapes(method), strict=False)
            ep = ep.run_decompositions({})
            del module
            if method == "token_embedding":
                seq = ct.RangeDim(1, components.config.shape.max_seq_len, default=4)
                inputs = [ct.TensorType("tokens", shape=(1, seq), dtype=np.int32)]
            else:
                name = components.input_names(method)[0]
                inputs = [ct.TensorType(name, shape=tuple(example[0].shape), dtype=np.float32)]
            return ct.convert(
                ep,
                inputs=inputs,
                outputs=[ct.TensorType(OUTPUT_NAMES[method], dtype=np.float32)],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
            )
    except Exception as e:  # coremltools raises many types
        raise ExportError(f"Core ML conversion of {method} failed: {error_cause(e)}") from e


def convert_decoder(components: Any, function: str, layers: tuple[int, int] | None = None) -> Any:
    """text_decoder's ``prefill`` (T in 1..max_seq_len) or ``decode`` (T = 1) function -> MLModel.

    ``layers``: one chunk ``[start, stop)`` of a decoder split over several packages (see
    ``spec.plan_decoder_chunks``); it outputs ``hidden`` unless it holds the last layer (then ``logits``).
    """
    import coremltools as ct

    _register_converters()
    num_layers = components.config.text.num_layers
    first, stop = layers or (0, num_layers)
    head = stop == num_layers
    # the decoder's residual stream is where trained weights put massive activations
    decoder = fp16_copy(CoreMLDecoder(components, first, stop, head), safe_rmsnorm=True)
    decoder.rope = TableRope(components.model.text.rope, decoder.max_seq_len).to(torch.float16)
    cfg = components.config
    h = cfg.text.hidden_size
    t = 4 if function == "prefill" else 1
    pos = torch.arange(t, dtype=torch.int32)
    example = (torch.zeros(1, t, h, dtype=torch.float16), pos.expand(3, t).contiguous(), pos)
    seq: Any = ct.RangeDim(1, decoder.max_seq_len, default=t) if function == "prefill" else 1
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
        for name, shape in decoder.state_shapes().items()
    ]
    try:
        with torch.no_grad(), quiet():
            traced = torch.jit.trace(decoder, example)
            return ct.convert(
                traced,
                inputs=[
                    ct.TensorType("embeds", shape=(1, seq, h), dtype=np.float32),
                    ct.TensorType("position_ids", shape=(3, seq), dtype=np.int32),
                    ct.TensorType("cache_position", shape=(seq,), dtype=np.int32),
                ],
                outputs=[ct.TensorType("logits" if head else HIDDEN_OUTPUT, dtype=np.float32)],
                states=states,
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
            )
    except Exception as e:
        what = f"layers {first}..{stop - 1}, " if layers else ""
        raise ExportError(f"Core ML conversion of text_decoder ({what}{function}) failed: {error_cause(e)}") from e
