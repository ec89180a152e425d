"""What the Core ML target offers: its recipes (each one's QuantScheme and export gate), the runtime
package it records, the artifact's layout (one package per method, the decoder's two functions), and
how its numbers are obtained on a host without Core ML.

Importing this module must not import the runtime (coremltools, torch): the CLI's choices and every
check before model work read :data:`SPEC`.
"""

from __future__ import annotations

from core.recipes import FLOAT16, QuantScheme, RecipeName
from targets.spec import Gate, RecipeSpec, TargetSpec

DEPLOYMENT_TARGET = "iOS18"  # ct.target.iOS18: states, multifunction packages, blockwise int4/int8 weights
COMPUTE_PRECISION = "FLOAT16"  # ct.precision.FLOAT16
# the decoder package's functions, sharing its states (the KV cache); the first is made by reset()
DECODER_FUNCTIONS = ("prefill", "decode")
DEFAULT_DECODER_FUNCTION = "decode"
# each method's one output in its package
OUTPUT_NAMES = {
    "token_embedding": "embeds",
    "vision_encoder": "image_embeds",
    "audio_encoder": "audio_embeds",
    "text_decoder": "logits",
}


def package_name(method: str) -> str:
    return f"{method}.mlpackage"


# int8 per output channel, symmetric; linear / conv / matmul weights and the embedding table (gather)
_INT8_WEIGHTS = QuantScheme(8, embedding_bits=8, float_dtype="float16")

SPEC = TargetSpec(
    name="coreml",
    description=f"one ML program (.mlpackage) per method for {DEPLOYMENT_TARGET}, fp16 compute; the decoder is one "
                "multifunction package (prefill, decode) with its KV cache as Core ML states",
    recipes=(
        # export gate: cosine floor against eager on a held-out sample (no relative-L2 ceiling).
        # int4-weight on tiny's random weights (held-out sample, fp16 compute): decoder cosine 0.977 at block 32,
        # 0.965 at block 128, the other methods >= 0.997; with each byte's two int4 values swapped the decoder
        # falls to 0.04, with one scale for every block (the mean) to 0.90
        RecipeSpec(RecipeName.FP16, FLOAT16, Gate(0.999)),
        RecipeSpec(RecipeName.INT8_WEIGHT, _INT8_WEIGHTS, Gate(0.99)),
        # W8A8: quantize/dequantize pairs before every linear / conv, ranges measured by the interpreter
        RecipeSpec(RecipeName.INT8_STATIC, QuantScheme(8, activations="static", embedding_bits=8, float_dtype="float16"),
                   Gate(0.95)),
        # int4 in blocks of --group-size input channels (0: per output channel); the embedding table, and any
        # weight the block does not tile, int8 per channel
        RecipeSpec(RecipeName.INT4_WEIGHT, QuantScheme(4, groupwise=True, embedding_bits=8, float_dtype="float16"),
                   Gate(0.95)),
    ),
    runtime_packages=("coremltools",),
    notes=(
        "token_embedding / vision_encoder / audio_encoder / text_decoder .mlpackage: the app loads each with "
        "MLModel; text_decoder with function_name prefill (T > 1) or decode (T = 1) and one make_state() shared by both",
        "tokens and positions are int32 in the packages; float inputs and outputs float32",
        "Core ML cannot execute on Linux: there, the export check and parity run the saved ML programs in "
        "targets.coreml.mil (a NumPy interpreter) and their provenance says 'emulated'; on macOS, MLModel.predict",
    ),
)
