"""onnxruntime-genai: genai_config.json, the named tensors an app hands it, and the report of what it runs.

``genai_config.json`` is in onnxruntime-genai's multimodal layout (qwen2_5_vl family, the one with
host-side 3-D M-RoPE): ``decoder``, ``embedding`` and ``vision`` sections naming this folder's files and
their I/O (no ``speech``: genai opens no speech session for that type). With the tokenizer files
(targets.base) the folder opens as ``og.Model`` + ``og.Tokenizer``; images go in as named tensors
(:func:`genai_inputs`), not through genai's processor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import BadInputError
from targets.ort.graphs import graph_io
from targets.ort.spec import GENAI_PACKAGE

GENAI_CONFIG = "genai_config.json"
# the onnxruntime-genai release genai_config.json and the named-tensor recipe were written and tested for (the
# test extra's pin); runtime_versions also records the one installed at export ("not installed" where absent)
GENAI_VERSION = "0.18.0"


def genai_config(config: Any, files: dict[str, str]) -> dict[str, Any]:
    """onnxruntime-genai's multimodal config for these files (the qwen2_5_vl layout: host 3-D M-RoPE)."""
    t, ids = config.text, config.tokens
    sess = {"log_id": "onnxruntime-genai", "provider_options": []}
    inputs, outputs = graph_io(config)["text_decoder"]
    model: dict[str, Any] = {
        "type": "qwen2_5_vl",
        "bos_token_id": list(ids.bos_ids)[0] if ids.bos_ids else ids.pad_id,
        "eos_token_id": list(ids.eos_ids),
        "pad_token_id": ids.pad_id,
        "vocab_size": t.vocab_size,
        "context_length": config.shape.max_seq_len,
        "decoder": {
            "session_options": sess,
            "filename": files["text_decoder"],
            "head_size": t.head_dim,
            "hidden_size": t.hidden_size,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "num_hidden_layers": t.num_layers,
            "inputs": {
                "inputs_embeds": "inputs_embeds",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        },
        "embedding": {
            "session_options": sess,
            "filename": files["token_embedding"],
            "inputs": {"input_ids": "input_ids", **({"image_features": "image_features"} if config.vision else {}),
                       **({"audio_features": "audio_features"} if config.audio else {})},
            "outputs": {"inputs_embeds": "inputs_embeds"},
        },
    }
    if config.vision:
        v = config.vision
        model["image_token_id"] = ids.image_token_id
        model["video_token_id"] = ids.video_token_id if ids.video_token_id >= 0 else ids.image_token_id
        model["vision_start_token_id"] = ids.image_start_id
        model["vision"] = {
            "session_options": sess,
            "filename": files["vision_encoder"],
            "spatial_merge_size": v.spatial_merge_size,
            "patch_size": v.patch_size,
            "tokens_per_second": 2.0,
            "inputs": {"pixel_values": "pixel_values"},
            "outputs": {"image_features": "image_features"},
        }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": config.shape.max_seq_len,
        "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
        "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
        # the decoder's attention is GroupQueryAttention (targets/ort/attention.py), which appends to a shared
        # [1, kv, max_length, D] past/present buffer in place, as genai's own graphs do
        "past_present_share_buffer": True,
    }
    return {"model": model, "search": search}


def genai_inputs(config: Any, prompt_ids: list[int], pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The named tensors an app hands ``og.Generator.set_inputs`` for a prompt with (or without) an image.

    onnxruntime-genai's own multimodal processor for its qwen2_5_vl type cannot
    feed this folder: it expects Qwen's vision markers and emits flattened
    patches ``[N, C*2*P*P]``, while vision_encoder.onnx takes normalised pixels
    ``[1, 3, S, S]`` (patchify is in the graph). genai's pipeline itself takes
    them unchanged: given ``pixel_values`` (4-D, so one image),
    ``num_image_tokens`` and ``image_grid_thw`` it runs vision_encoder.onnx,
    hands its ``image_features [N, H]`` to token_embedding.onnx (which splices
    them in at the placeholder tokens) and computes the 3-D M-RoPE positions from
    the grid, the same positions as the runner (an image at p: (p, p+row,
    p+col), text after it at p + grid/merge). ``prompt_ids`` are the rendered
    chat template's ids with one placeholder per image, as the runner tokenizes
    them; each placeholder is repeated to the image's token count here.
    """
    ids = config.tokens
    expanded: list[int] = []
    for tok in prompt_ids:
        n = config.image_tokens if (pixels is not None and tok == ids.image_token_id) else 1
        expanded += [int(tok)] * n
    out = {"input_ids": np.asarray([expanded], np.int32)}
    if pixels is None:
        return out
    if config.vision is None:
        raise BadInputError(f"model '{config.name}' has no vision encoder; drop the image")
    s = config.shape.image_size
    pixels = np.ascontiguousarray(pixels, np.float32)
    if pixels.shape != (1, 3, s, s):
        raise BadInputError(f"pixel_values must be normalised pixels [1, 3, {s}, {s}], got {list(pixels.shape)}")
    if prompt_ids.count(ids.image_token_id) != 1:
        raise BadInputError(f"the prompt must hold exactly one image placeholder (id {ids.image_token_id}) for one image")
    out["pixel_values"] = pixels
    out["image_grid_thw"] = np.asarray([[1, config.image_grid, config.image_grid]], np.int64)
    out["num_image_tokens"] = np.asarray([config.image_tokens], np.int64)
    return out


def genai_usage(config: Any, tokenizer_files: list[str]) -> dict[str, Any]:
    """artifact.json's account of what onnxruntime-genai runs in this folder and what the app does itself."""
    if {"tokenizer.json", "tokenizer_config.json"} <= set(tokenizer_files):
        text = ("og.Model(dir), og.Tokenizer(model) (tokenizer.json + tokenizer_config.json, which carries the chat "
                "template for tokenizer.apply_chat_template), generator.append_tokens(prompt ids)")
    else:  # og.Tokenizer needs both files
        text = (f"og.Model(dir), generator.append_tokens(prompt ids); no og.Tokenizer: model '{config.name}' ships "
                "no tokenizer.json + tokenizer_config.json, so the app tokenizes")
    if not config.vision:  # measured with 0.18.0 on SmolLM2's folder (README "Running the ONNX folder ...")
        text = ("not loadable by onnxruntime-genai: its qwen2_5_vl type (the one whose host computes the 3-D M-RoPE "
                "positions this decoder takes) opens only with a vision model, and a decoder-only type with this "
                "folder's separate embedding graph needs genai's dynamic-batching Engine and feeds 2-D positions; "
                "run the graphs with onnxruntime directly (as OrtSession does)")
    out: dict[str, Any] = {"package": GENAI_PACKAGE, "written_for": GENAI_VERSION, "config": GENAI_CONFIG,
                           "model_type": "qwen2_5_vl", "loads": bool(config.vision), "text": text}
    if config.vision:
        v = config.vision
        s = config.shape.image_size
        out["image"] = {
            "processor": "none: genai's qwen2_5_vl processor emits Qwen's flattened patches and markers; do not call "
                         "model.create_multimodal_processor()",
            "preprocess": f"RGB, bicubic resize to {s}x{s}, /255, (x - image_mean) / image_std per channel, CHW",
            "image_mean": list(v.image_mean),
            "image_std": list(v.image_std),
            "set_inputs": {
                "input_ids": f"int32 [1, T]: the prompt ids with the image placeholder {config.tokens.image_token_id} "
                             f"repeated {config.image_tokens} times, right after {config.tokens.image_start_id}",
                "pixel_values": f"float32 [1, 3, {s}, {s}]",
                "image_grid_thw": [[1, config.image_grid, config.image_grid]],
                "num_image_tokens": [config.image_tokens],
            },
        }
    if config.audio:
        out["audio"] = ("not through onnxruntime-genai: its qwen2_5_vl model type opens no speech session, so audio "
                        "placeholders would keep their token embeddings; run audio_encoder and the other graphs with "
                        "onnxruntime directly (as OrtSession does)")
    return out
