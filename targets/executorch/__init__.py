"""ExecuTorch target: one multi-method .pte lowered to XNNPACK.

The program holds the four methods (token_embedding, vision_encoder,
audio_encoder, text_decoder) plus constant metadata methods, in the layout
ExecuTorch's stock ``MultimodalRunner`` (the C++ runner apps ship) expects:
``text_decoder(embeds [1,T,H], cache_position [T]) -> logits [1,T,V]``,
``vision_encoder(pixels)``, ``audio_encoder(mel)``, each input segment
prefilled by its own call.

GLM's 3-D M-RoPE positions cannot come from that caller, so they are
``text_decoder``'s own state (mutable buffers no other method touches: the
stock runner's C++ ``Module`` gives each method its own memory, so state
shared across methods would never arrive there). The decoder recognises an
image prefill by what the stock runner does pass it: the text segment before
an image ends with ``<|begin_of_image|>`` (``image_start_id``), whose
embedding row the decoder holds as a constant; a call whose last row matches
it (relative L2 within ``MARKER_TOL``, which also admits the int8 byte-quantized
embedding) marks the next call, and a marked call of exactly ``image_tokens``
rows is the image grid. It gets positions (t, h, w) = (p, p + row, p + col);
any other call gets text positions (p + i on all three axes). The rope offset
then advances by the grid side after an image, by T after text; a call at
cache position 0 starts afresh. This is exactly the host runner's position
rule (core/runner.py), so our runner drives the same .pte the same way and
the ``position_ids`` it computes are not needed.
The KV cache lives in mutable buffers ([1, max_seq_len, kv_heads, head_dim]) written in place by
ExecuTorch's LLM custom op ``llama::update_cache``; attention is ``llama::custom_sdpa`` (llm_decoder:
the decoder rebuilt on those ops with the model's own weights, every other op in a form XNNPACK takes,
so each layer lowers to one XNNPACK subgraph).

Recipes (what each quantizes is its QuantScheme in spec.py):
  fp32         XNNPACK fp32.
  int8-weight  int8 per-channel weights (torchao Int8DynamicActivationIntxWeightConfig,
               XNNPACK qd8-f32-qc8w kernels: activations are quantized per token at run
               time). XNNPACK's weight-only int8 path in executorch 1.5.1 returns wrong
               numbers (STACK.md), so it is not offered.
  8da4w        int4 weights in groups (group_size), dynamic int8 activations.
  int8-static  PT2E with the XNNPACK quantizer: static per-tensor int8 activations
               (observers fed with real calibration samples through the reference
               runner), per-channel int8 weights.
Every int8 recipe stores the embedding table as int8 rows (ExecuTorch's
``quantized_decomposed::embedding_byte``) and honours ``Recipe.keep_float``.
The lowering report fails the build when a linear or matmul is left on the
portable (non-XNNPACK) path.

Modules: spec (SPEC; no runtime imports), program (the exported modules, the
image marker), llm_decoder (text_decoder on the custom ops), quantize, lower
(XNNPACK, emission), program_io (the saved program's I/O and partitions),
session (the runtime), target (the build / open hooks).
"""

from targets.executorch.spec import SPEC

__all__ = ["SPEC", "target"]


def load_target():
    """The target with its build / open hooks (imports torch and, when used, ExecuTorch)."""
    from targets.executorch.target import ExecuTorchTarget

    return ExecuTorchTarget()
