"""What the ExecuTorch target offers: its recipes (each one's QuantScheme and export gate), the
runtime packages it records, and what an app links to run its program.

Importing this module must not import the runtime (torch, executorch, torchao): the CLI's choices
and every check before model work read :data:`SPEC`.
"""

from __future__ import annotations

from core.recipes import FLOAT32, QuantScheme, RecipeName, WeightGrid
from targets.spec import Gate, RecipeSpec, TargetSpec

PTE = "model.pte"  # the one program file (every method plus the runner's constant methods)

SPEC = TargetSpec(
    name="executorch",
    description="one multi-method .pte lowered to XNNPACK, in the layout of ExecuTorch's stock MultimodalRunner",
    recipes=(
        # export gate: cosine floor and relative-L2 ceiling against eager on a held-out sample
        RecipeSpec(RecipeName.FP32, FLOAT32, Gate(0.99999, 1e-3)),
        # torchao Int8DynamicActivationIntxWeightConfig (int8, PerAxis(0)): XNNPACK qd8-f32-qc8w kernels.
        # XNNPACK's weight-only int8 path in executorch 1.5.1 returns wrong numbers (STACK.md): not offered.
        RecipeSpec(RecipeName.INT8_WEIGHT, QuantScheme(8, activations="dynamic", embedding_bits=8), Gate(0.99, 0.15)),
        # the same config with int4 weights in groups of --group-size (0: PerAxis(0), per output channel)
        RecipeSpec(RecipeName.W4_DA8, QuantScheme(4, groupwise=True, activations="dynamic", embedding_bits=8),
                   Gate(0.95, 0.35)),
        # PT2E with the XNNPACK quantizer on linear/conv: per-channel int8 weights, static per-tensor inputs
        # (--activation-range: the XNNPACK quantizer's own HistogramObserver, which picks the range that minimises
        # the histogram's L2 quantization error ("mse", its default), or torchao's MinMaxObserver)
        RecipeSpec(RecipeName.INT8_STATIC, QuantScheme(8, activations="static", embedding_bits=8), Gate(0.95, 0.35),
                   weight_grid=lambda r: WeightGrid(8),  # XNNPACK's symmetric per-channel weight observer: +-127
                   activation_ranges=("mse", "minmax")),
    ),
    runtime_packages=("executorch", "torchao"),
    # every method is copied to float32 on its own as it is exported, a large decoder piece by piece
    # (targets/executorch/streaming.py): a kept bf16 checkpoint is never copied whole
    reads_stored_weights=True,
    notes=(
        f"{PTE}: ExecuTorch's stock MultimodalRunner runs it as exported (methods token_embedding, "
        "vision_encoder, audio_encoder, text_decoder; the decoder keeps its own M-RoPE positions)",
        "the app links the XNNPACK delegate, the portable kernels and ExecuTorch's LLM custom_ops library "
        "(text_decoder's cache writes and attention are llama::update_cache and llama::custom_sdpa, as in "
        "ExecuTorch's own Llama export); the int8 recipes store the embedding table as int8 rows "
        "(quantized_decomposed::embedding_byte), so their app also links quantized_ops_lib",
    ),
)
