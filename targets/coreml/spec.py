"""What the Core ML target offers: its recipes (each one's QuantScheme and export gate), the runtime
package it records, the artifact's layout (one package per method, the decoder's two functions), and
how its numbers are obtained on a host without Core ML.

Importing this module must not import the runtime (coremltools, torch): the CLI's choices and every
check before model work read :data:`SPEC`.
"""

from __future__ import annotations

from core.recipes import FLOAT16, QuantScheme, RecipeName, WeightGrid
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

# a decoder chunk's output when a later chunk follows (its input is always "embeds")
HIDDEN_OUTPUT = "hidden"


def package_name(method: str) -> str:
    return f"{method}.mlpackage"


# the decoder goes into several packages ("chunks", each a run of layers with their KV-cache states, the last
# one also the final norm and lm_head), run one after the other, once its fp16 weights pass this: converting a
# chunk holds a few copies of its weights, and a 9B decoder (18 GB in fp16) does not convert whole in 16 GiB
DECODER_CHUNK_BYTES = 1 << 30


def plan_decoder_chunks(layer_bytes: list[int], head_bytes: int, limit: int) -> list[tuple[int, int]]:
    """Consecutive layer ranges [start, stop), each within ``limit`` bytes (one layer at least); the head
    (final norm + lm_head) joins the last range, which therefore always holds a layer. One range when the
    whole decoder fits."""
    if sum(layer_bytes) + head_bytes <= limit:
        return [(0, len(layer_bytes))]
    chunks: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, b in enumerate(layer_bytes):
        if i > start and size + b > limit:
            chunks.append((start, i))
            start, size = i, 0
        size += b
    chunks.append((start, len(layer_bytes)))
    last_start, last_stop = chunks[-1]
    if last_stop - last_start > 1 and sum(layer_bytes[last_start:]) + head_bytes > limit:
        chunks[-1] = (last_start, last_stop - 1)  # the head goes with the last layer alone
        chunks.append((last_stop - 1, last_stop))
    return chunks


def decoder_package_names(chunks: list[tuple[int, int]]) -> list[str]:
    """``text_decoder.mlpackage``, or ``text_decoder.chunk{k}.mlpackage`` per chunk when there are several."""
    if len(chunks) == 1:
        return [package_name("text_decoder")]
    return [f"text_decoder.chunk{k}.mlpackage" for k in range(len(chunks))]


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
        # GPTQ by default: SmolLM2 (17 held-out prompts, MIL interpreter) top-1 0.961 -> 0.984, perplexity -4.3 % ->
        # +0.4 %, greedy 0.72 -> 0.78 (fp16 compute keeps the inputs float, where GPTQ's error spreading holds)
        RecipeSpec(RecipeName.INT8_WEIGHT, _INT8_WEIGHTS, Gate(0.99), weight_grid=lambda r: WeightGrid(8),
                   gptq_default=True),
        # W8A8: quantize/dequantize pairs before every linear / conv, ranges measured by the interpreter
        # (activation ranges: the interpreter's min / max over the calibration calls, the only one offered)
        RecipeSpec(RecipeName.INT8_STATIC, QuantScheme(8, activations="static", embedding_bits=8, float_dtype="float16"),
                   Gate(0.95), weight_grid=lambda r: WeightGrid(8), activation_ranges=("minmax",)),
        # int4 in blocks of --group-size input channels (0: per output channel); the embedding table, and any
        # weight the block does not tile, int8 per channel. GPTQ by default: SmolLM2 (17 held-out prompts, MIL
        # interpreter, block 32) top-1 0.524 -> 0.766, perplexity +36.2 % -> +20.7 %, greedy 0.143 -> 0.188
        RecipeSpec(RecipeName.INT4_WEIGHT, QuantScheme(4, groupwise=True, embedding_bits=8, float_dtype="float16"),
                   Gate(0.95), weight_grid=lambda r: WeightGrid(4, r.group_size, tiles_only=True),
                   gptq_default=True),
    ),
    runtime_packages=("coremltools",),
    # each method (each decoder chunk) is copied to fp16 from the checkpoint's stored weights as it converts
    reads_stored_weights=True,
    notes=(
        "token_embedding / vision_encoder / audio_encoder / text_decoder .mlpackage: the app loads each with "
        "MLModel; text_decoder with function_name prefill (T > 1) or decode (T = 1) and one make_state() shared by both",
        "tokens and positions are int32 in the packages; float inputs and outputs float32",
        "a decoder whose fp16 weights pass 1 GiB comes as text_decoder.chunk0..N.mlpackage (artifact.json "
        "metadata.decoder_chunks): each a run of layers with its own states, taking embeds and giving hidden; "
        "the app runs them in order, feeding each chunk's hidden to the next as embeds; the last gives logits",
        "Core ML cannot execute on Linux: there, the export check and parity run the saved ML programs in "
        "targets.coreml.mil (a NumPy interpreter) and their provenance says 'emulated'; on macOS, MLModel.predict",
    ),
)
