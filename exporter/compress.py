"""The seed's compression, applied to the reference model before export: head pruning and layer skipping.

Both are structural: the pruned model is an ordinary, smaller model of the same family (fewer query heads,
or fewer decoder layers), so every target exports it with no special op, and the artifact's graphs really are
smaller. What was removed is recorded in artifact.json (``metadata.compression``); parity rebuilds the
*unpruned* reference from ``metadata.source``, so its numbers show the cost.

Head pruning respects GQA: every KV group keeps the same number of query heads (the model stays a uniform
GQA model: num_heads = kv_heads x kept per group), the least important heads of each group go
(calibration/importance.py), and K/V projections are untouched. Layer skipping removes the layers with the
lowest block influence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from core.errors import BadInputError


def _rebuild(model, config, state: dict[str, torch.Tensor]):
    from exporter.model.multimodal import build, materialize_buffers

    new = build(config, device="meta")
    tied = config.text.tie_embeddings
    if tied:
        state = {k: v for k, v in state.items() if k != "text.lm_head.weight"}
    new.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        new.text.lm_head.weight = new.text.embed_tokens.weight
    materialize_buffers(new)
    return new.eval()


def check_settings(config, prune: float | None, skip: int | None) -> None:
    """--prune-heads / --skip-layers against the model's shape, before any scoring or export work."""
    t = config.text
    if prune is not None:
        if not 0 < prune < 1:
            raise BadInputError(f"--prune-heads {prune}: must be a fraction in (0, 1)")
        per_group = t.num_heads // t.num_kv_heads
        remove = int(round(per_group * prune))
        if remove == 0 or remove >= per_group:
            raise BadInputError(
                f"--prune-heads {prune}: each KV group has {per_group} query heads, so this removes {remove}; "
                f"choose a fraction that removes between 1 and {per_group - 1} per group"
            )
    if skip is not None and not 0 < skip < t.num_layers:
        raise BadInputError(f"--skip-layers {skip}: must be between 1 and {t.num_layers - 1} for '{config.name}'")


def prune_heads(model, scores: dict[str, Any], fraction: float):
    """Remove ``fraction`` of each KV group's query heads in every layer (least important first)."""
    check_settings(model.config, fraction, None)
    t = model.config.text
    per_group = t.num_heads // t.num_kv_heads
    remove = int(round(per_group * fraction))
    heads = np.asarray(scores["heads"])
    d = t.head_dim
    state = {k: v for k, v in model.state_dict().items()}
    removed: dict[str, list[int]] = {}
    for i in range(t.num_layers):
        keep = []
        for g in range(t.num_kv_heads):
            group = list(range(g * per_group, (g + 1) * per_group))
            ranked = sorted(group, key=lambda h: heads[i][h], reverse=True)
            keep += sorted(ranked[: per_group - remove])
        removed[str(i)] = sorted(set(range(t.num_heads)) - set(keep))
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        p = f"text.layers.{i}.self_attn."
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][rows].clone()
        if p + "q_proj.bias" in state:
            state[p + "q_proj.bias"] = state[p + "q_proj.bias"][rows].clone()
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, rows].clone()
    kept = t.num_kv_heads * (per_group - remove)
    record = {"prune_heads": fraction, "num_heads": [t.num_heads, kept], "removed_heads": removed}
    return _rebuild(model, compressed_config(model.config, record), state), record


def skip_layers(model, scores: dict[str, Any], n: int):
    """Remove the ``n`` decoder layers with the lowest block influence."""
    check_settings(model.config, None, n)
    t = model.config.text
    order = np.argsort(np.asarray(scores["blocks"]))
    drop = sorted(int(i) for i in order[:n])
    keep = [i for i in range(t.num_layers) if i not in drop]
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("text.layers."):
            i, rest = k[len("text.layers."):].split(".", 1)
            if int(i) in drop:
                continue
            k = f"text.layers.{keep.index(int(i))}.{rest}"
        state[k] = v
    record = {"skip_layers": n, "num_layers": [t.num_layers, len(keep)], "removed_layers": drop}
    return _rebuild(model, compressed_config(model.config, record), state), record


def compressed_config(config, record: dict[str, Any]):
    """The config after ``record``'s removals (parity checks an artifact's config against it)."""
    t = config.text
    text = t
    name = config.name
    if "num_heads" in record:
        text = dataclasses.replace(text, num_heads=record["num_heads"][1], head_dim_override=t.head_dim)
        name += f"-pruned{record['num_heads'][1]}h"
    if "num_layers" in record:
        text = dataclasses.replace(text, num_layers=record["num_layers"][1])
        name += f"-skip{len(record['removed_layers'])}"
    return config.replace(text=text, name=name)


def apply(model, scores: dict[str, Any], prune: float | None, skip: int | None):
    """Prune, then skip (scores are of the unpruned model: layer indices and influences are unchanged by pruning)."""
    records: dict[str, Any] = {}
    if prune:
        model, r = prune_heads(model, scores, prune)
        records.update(r)
    if skip:
        model, r = skip_layers(model, scores, skip)
        records.update(r)
    return model, records
