"""The ONNX Runtime target's spec: its recipes with what each quantizes and its export gate.

Imported by ``--help`` and by every check before model work, so nothing here imports onnx,
onnxruntime or torch.
"""

from __future__ import annotations

from core.recipes import FLOAT32, QuantScheme, RecipeName, WeightGrid
from targets.spec import Gate, RecipeSpec, TargetSpec

# int8-static's --activation-range names, the default first (MinMax: the measurements at
# targets/ort/static.ACTIVATION_RANGES, which maps each name to onnxruntime's CalibrationMethod)
ACTIVATION_RANGE_NAMES = ("minmax", "percentile", "entropy", "distribution")

GENAI_PACKAGE = "onnxruntime-genai"

# Export check (targets.base.export_gate), run on the files a phone gets (.ort, or .onnx where a model is over
# the ORT format's limit): per-method cosine floor and relative-L2 ceiling vs eager on a held-out sample.
# int4-weight on tiny's random weights (held-out sample): decoder cosine 0.9875 / 0.982 / 0.979 / 0.974 and relative
# L2 0.16 / 0.19 / 0.21 / 0.23 at block 16 / 32 / 64 / 128, the other methods >= 0.997; with the MatMulNBits scales
# flattened to their mean or the nibbles of each byte swapped the decoder falls to cosine ~0.0 (L2 1.4) and the audio
# encoder to 0.68-0.74
RECIPES = (
    # as torch.onnx exports it
    RecipeSpec(RecipeName.FP32, FLOAT32, Gate(0.99999, 1e-3)),
    # int8 per-channel DequantizeLinear weights of every MatMul/Gemm/Conv, float activations, int8 embedding rows
    # (the CPU EP fuses DQ -> MatMul into an 8-bit MatMulNBits that quantizes activation blocks on the fly);
    # --group-size N: 8-bit MatMulNBits in blocks of N written directly (a contrib op; the session holds ~1.1x the
    # int8 bytes at block 128 instead of the DQ form's ~3x while it is created: targets/ort/quantize_int4.py)
    RecipeSpec(RecipeName.INT8_WEIGHT, QuantScheme(weight_bits=8, embedding_bits=8), Gate(0.99, 0.15),
               blocks_on_request=True,
               weight_grid=lambda r: WeightGrid(8, r.group_size, full_range=True) if r.group_size else WeightGrid(8)),
    # QDQ: int8 per-channel weights and calibrated uint8 per-tensor inputs on the weight MatMuls (float outputs:
    # onnxruntime's CPU EP runs them as U8S8 MatMulIntegerToFloat), then the embedding table as in int8-weight
    # (ORT's static quantizer leaves Gather tables float)
    RecipeSpec(RecipeName.INT8_STATIC, QuantScheme(weight_bits=8, activations="static", embedding_bits=8),
               Gate(0.95, 0.35), weight_grid=lambda r: WeightGrid(8), activation_ranges=ACTIVATION_RANGE_NAMES),
    # MatMulNBits: 4-bit blocks of --group-size inputs, float activations at the graph boundary; convs and the
    # embedding table int8 as in int8-weight. Block-wise only: --group-size 0 (per channel) is refused
    RecipeSpec(RecipeName.INT4_WEIGHT, QuantScheme(weight_bits=4, groupwise=True, embedding_bits=8), Gate(0.96, 0.3),
               per_channel_groups=False, weight_grid=lambda r: WeightGrid(4, r.group_size, full_range=True),
               # SmolLM2, 17 held-out prompts: top-1 0.604 -> 0.836, greedy 0.19 -> 0.38, export-check decoder
               # cosine 0.876 (below this gate) -> 0.996; 17-prompt perplexity +4.5 % -> +8.3 %, joined held-out
               # text +23.5 % -> +16.5 %
               gptq_default=True),
)

SPEC = TargetSpec(
    name="ort",
    description="ONNX Runtime mobile: one .onnx and one .ort per method, a reduced-build operator config, "
                "the mobile usability report and a genai_config.json for onnxruntime-genai",
    recipes=RECIPES,
    runtime_packages=("onnx", "onnxscript", "onnxruntime", GENAI_PACKAGE),
    nondeterministic_files=(
        ("*.ort", "onnxruntime's ORT-format converter serializes the optimized graph's flatbuffer tables in a "
                  "varying order (same size, same .onnx input; the .onnx files are byte-identical)"),
    ),
    notes=(
        "the app links onnxruntime (the mobile package, or a reduced build from required_operators_and_types.config; "
        "int4-weight, and int8-weight with --group-size, need the com.microsoft contrib op MatMulNBits) and opens each "
        "<method>.ort",
        "onnxruntime-genai opens the folder as exported (og.Model + og.Tokenizer); images go in as named tensors "
        "(report.genai), audio only through onnxruntime directly",
    ),
    reads_stored_weights=True,
)
