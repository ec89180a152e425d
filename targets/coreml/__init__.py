"""Core ML target: one ML program (.mlpackage) per method for iOS 18, four recipes.

Build (``CoreMLTarget.build``, driven by :func:`targets.lifecycle.export`), as a list of steps:

1. Convert each method with coremltools (``minimum_deployment_target=iOS18``, compute precision
   FLOAT16; :mod:`targets.coreml.convert`, with the model adapted by :mod:`targets.coreml.adapt`):
   ``token_embedding``, ``vision_encoder`` and ``audio_encoder`` from ``torch.export`` programs;
   ``text_decoder`` from ``torch.jit.trace`` of a decoder whose KV cache is fp16 buffers that become
   Core ML states, converted twice (``prefill``: T in 1..max_seq_len; ``decode``: T = 1).
2. Quantize (recipe), per converted model, before the decoder's functions are combined (the same
   deterministic weights in both, so they still share one copy):

   * ``fp16``: as converted.
   * ``int8-weight``: int8 per output channel for every linear / conv / matmul weight and the
     embedding table (:mod:`targets.coreml.weights`).
   * ``int4-weight``: int4 in blocks of ``--group-size`` input channels (0: per output channel); the
     embedding table, and any weight the block does not tile, int8.
   * ``int8-static``: W8A8; activation ranges measured by running the float ML program over real
     calibration samples in the NumPy interpreter, then coremltools' activation-quantization pass
     before every linear / conv, then the int8 weights (:mod:`targets.coreml.activations`).

   ``Recipe.keep_float`` names model modules whose weights (found by value) stay float.
3. Package (:mod:`targets.coreml.packaging`): the decoder's functions combined into one multifunction
   package (``ct.utils.save_multifunction``, weights deduplicated), metadata into every package,
   deterministic bytes (two exports of the same model are byte-identical), and artifact.json's
   ``programs`` read back from the saved specs.

Open (``CoreMLTarget.open``, :mod:`targets.coreml.session`): on macOS with Core ML the packages run
with ``MLModel.predict``; elsewhere through :mod:`targets.coreml.mil` (a NumPy interpreter of ML
programs), and the session's provenance says so. Every coremltools internal either side relies on
goes through :mod:`targets.coreml.compat`.
"""

from __future__ import annotations

from targets.coreml.spec import SPEC

__all__ = ["SPEC", "load_target"]


def load_target():
    """The Core ML target with its build / open hooks (imports torch and, when used, coremltools).

    Not called ``target``: that name is the ``targets.coreml.target`` submodule once it is imported.
    """
    from targets.coreml.target import CoreMLTarget

    return CoreMLTarget()
