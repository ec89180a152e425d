"""A small random Glm4v checkpoint written by transformers, with the tiny tokenizer and a GLM chat template.

Shared by the chat-template and serve tests (both need a real checkpoint layout whose template opens the
answer with <think>).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from exporter.model.config import TINY_SPECIALS
from exporter.model.templates import GLM4V_CHAT_TEMPLATE

ID = {s: i for i, s in enumerate(TINY_SPECIALS)}


def tokenizer_files(dest: Path, template: str = GLM4V_CHAT_TEMPLATE, eos: bool = True) -> None:
    """tokenizer.json (the tiny preset's, GLM's special tokens) and tokenizer_config.json carrying ``template``."""
    from core.preprocess import tokenizer_file

    shutil.copyfile(tokenizer_file("builtin:tiny"), dest / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "pad_token": "<|endoftext|>"}
    if eos:
        cfg["eos_token"] = "<|endoftext|>"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_glm_checkpoint(dest: Path):
    """Save a seeded random Glm4vForConditionalGeneration into ``dest`` with the tokenizer files; returns the model."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    cfg = Glm4vConfig(
        text_config=dict(
            vocab_size=2048, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=4, out_hidden_size=128, intermediate_size=96, image_size=56),
        image_token_id=ID["<|image|>"], image_start_token_id=ID["<|begin_of_image|>"],
        image_end_token_id=ID["<|end_of_image|>"], video_token_id=2047,
    )
    torch.manual_seed(0)
    hf = Glm4vForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # less flat than the default init, so differences would show
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    hf.save_pretrained(dest)
    tokenizer_files(dest)
    return hf
