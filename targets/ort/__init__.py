"""ONNX Runtime mobile target: one .onnx and one .ort per method, a genai_config.json, four recipes.

Modules, in the order an export runs through them (``OrtTarget.build``, targets/ort/target.py):

* ``spec``: SPEC, the recipes with their schemes and export gates (no runtime import);
* ``graphs``: the graph module exported per method (``torch.onnx.export(dynamo=True)``), its I/O names
  (onnxruntime-genai's), and the feeds that map the runner's inputs onto them;
* ``files``: saving with or without external data (over 1 GiB of weights), ``metadata_props``;
* ``quantize_int8`` (int8-weight: int8 ``DequantizeLinear`` weights, int8 embedding rows),
  ``static`` (int8-static: QDQ calibrated on recorded inputs), ``quantize_int4`` (int4-weight, and int8-weight
  with --group-size: ``MatMulNBits``);
* ``ort_format``: ORT format, ``required_operators_and_types.config``, ``mobile_usability.txt``;
* ``genai``: ``genai_config.json`` (qwen2_5_vl layout), the named tensors an app hands
  onnxruntime-genai (:func:`targets.ort.genai.genai_inputs`), ``report.genai``;
* ``programs``: artifact.json's ``programs`` read back from the saved .onnx;
* ``session``: ``OrtSession``, one onnxruntime CPU session per method (.onnx or .ort).

The driver (targets.lifecycle.export) does the rest of an export: recipe and ``--out`` checks, the
tokenizer files, the export check on the .ort files, artifact.json, the atomic directory.
"""

from targets.ort.spec import SPEC

__all__ = ["SPEC", "load_target"]


def load_target():
    """The target with its build/open hooks (imports torch, onnx and onnxruntime)."""
    from targets.ort.target import OrtTarget

    return OrtTarget()
