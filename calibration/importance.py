"""Which attention heads and which decoder layers matter, measured on the calibration set.

Two scores from one reference pass over the calibration prompts (prefill + a few greedy decode steps, the
runner's own preprocessing), taken with forward hooks:

- head importance: per layer and query head, the mean L2 norm of that head's contribution to the residual
  stream, ``|| x_h @ W_o[:, h]^T ||`` (x_h: the head's attention output, W_o: o_proj). A head that adds
  little to the residual stream costs little when removed (Michel et al. 2019 use the loss gradient instead;
  the output norm needs no labels and no backward pass, so it runs on the exportable reference as is).
- block influence: per decoder layer, ``1 - cos(h_in, h_out)`` averaged over tokens (ShortGPT, Men et al. 2024):
  a layer whose output is almost its input changes little when skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

IMPORTANCE_JSON = "head_importance.json"


def measure(components: Components, prompts: list[Any], tokenizer: Any, progress: Callable[[str, int, int], None] | None = None,
            decode_steps: int = 2) -> dict[str, Any]:
    """{"heads": [[score per query head] per layer], "blocks": [influence per layer], "tokens": n, "num_kv_heads": kv}."""
    from calibration.stats import collect_method_inputs

    text = components.model.text
    cfg = components.config.text
    n_layers, n_heads, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
    head_sum = np.zeros((n_layers, n_heads))
    block_sum = np.zeros(n_layers)
    counts = np.zeros(n_layers)
    hooks = []

    def on_o_proj(i: int):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, n_heads, d)  # [T, heads, head_dim]
            w = module.weight.detach().float().reshape(module.weight.shape[0], n_heads, d)  # [hidden, heads, head_dim]
            contrib = torch.einsum("thd,ohd->tho", x, w)  # each head's share of the o_proj output
            head_sum[i] += contrib.norm(dim=-1).sum(0).numpy()
        return hook

    def on_layer(i: int):
        def hook(module, args, out):
            h_in, h_out = args[0].detach().float().reshape(-1, args[0].shape[-1]), out.detach().float().reshape(-1, out.shape[-1])
            block_sum[i] += (1.0 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().item()
            counts[i] += h_in.shape[0]
        return hook

    for i, layer in enumerate(text.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.register_forward_hook(on_layer(i)))
    try:
        collect_method_inputs(components, prompts, tokenizer, decode_steps=decode_steps, record_past=False, progress=progress)
    finally:
        for h in hooks:
            h.remove()
        components.text_decoder.cache.reset()
    n = np.maximum(counts, 1)[:, None]
    return {
        "heads": (head_sum / n).round(6).tolist(),
        "blocks": (block_sum / n[:, 0]).round(6).tolist(),
        "tokens": int(counts[0]),
        "num_kv_heads": cfg.num_kv_heads,
        "metric": {"heads": "mean L2 norm of the head's o_proj contribution", "blocks": "1 - mean cos(layer input, output)"},
    }


def builtin_prompts() -> list[Any]:
    from core.dataset import calibration_manifest
    from calibration.manifest import read_manifest

    return [s.to_prompt() for s in read_manifest(calibration_manifest())]


def save(scores: dict[str, Any], out: Path) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / IMPORTANCE_JSON).write_text(json.dumps(scores, indent=1) + "\n")
    heads = np.asarray(scores["heads"])
    blocks = np.asarray(scores["blocks"])
    return [
        f"head importance: {out / IMPORTANCE_JSON} ({heads.shape[0]} layers x {heads.shape[1]} heads, {scores['tokens']} tokens)",
        f"  least important heads per layer: " + ", ".join(f"L{i}:h{int(np.argmin(r))}" for i, r in enumerate(heads)),
        f"  block influence (lowest first): " + ", ".join(f"L{i}={blocks[i]:.4f}" for i in np.argsort(blocks)),
    ]


def load(path: Path, num_layers: int, num_heads: int) -> dict[str, Any] | None:
    """A calibration dir's scores when they fit this model, else None."""
    f = Path(path) / IMPORTANCE_JSON
    if not f.is_file():
        return None
    scores = json.loads(f.read_text())
    if np.asarray(scores.get("heads")).shape != (num_layers, num_heads):
        from core.errors import InputFileError

        raise InputFileError(f"{f}: scores for another model ({np.asarray(scores.get('heads')).shape} layers x heads, "
                             f"this one has {num_layers} x {num_heads}); run calibrate --head-importance again")
    return scores
