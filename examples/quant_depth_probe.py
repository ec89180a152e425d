"""How far weight rounding alone moves a checkpoint's decoder, layer by layer (issue 16's 4-bit question).

    python examples/quant_depth_probe.py CHECKPOINT [TOKENS]

Runs the eager reference (bf16 weights mapped, fp32 compute one module at a time) on TOKENS text tokens three
times: float, every decoder/lm_head linear rounded to int8 per output channel (absmax / 127, as int8-weight),
and to 4 bits in blocks of 32 inputs (absmax / 8 into [-8, 7], as MatMulNBits' symmetric RTN). Prints each
rounding's hidden-state cosine after every 5th layer and the logits' cosine, relative L2 and top-1 match
against float: what the export check's gate will see, before an hour-long 9B export finds out.

Measured on make-checkpoint's random 9B (`make-checkpoint --preset autoglm-phone-9b`), 8 tokens: int8 logits
cosine 0.9975 (gate 0.99: passes), int4 0.781 (gate 0.96: refused); the 4-bit error grows with depth (layer 1:
0.973, layer 10: 0.885, layer 40: 0.785). Random weights have no trained model's small per-layer updates.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.components import build_components
from core.runner import EagerSession
from exporter.model.upcast import CHUNK_BYTES, Float32Linear
from exporter.reference import load_reference
from targets.ort.streaming import release_pages_after_use

BLOCK = 32


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def int4_blocks(w: torch.Tensor) -> torch.Tensor:
    o, k = w.shape
    wb = w.reshape(o, k // BLOCK, BLOCK)
    scale = wb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 8.0
    return (torch.clamp(torch.round(wb / scale), -8, 7) * scale).reshape(o, k)


ROUNDING = {"float": None, "int8 per channel": int8_rows, f"int4 block {BLOCK}": int4_blocks}
_active: dict[str, object] = {"round": None}
_float_forward = Float32Linear.forward


def _rounded_forward(self: Float32Linear, x: torch.Tensor) -> torch.Tensor:
    fn = _active["round"]
    if fn is None or not getattr(self, "_probe_rounds", False):
        return _float_forward(self, x)
    rows = max(1, CHUNK_BYTES // (4 * self.in_features))
    outs = []
    for i in range(0, self.out_features, rows):  # row chunks: never the whole weight in fp32
        b = None if self.bias is None else self.bias[i:i + rows].float()
        outs.append(F.linear(x, fn(self.weight[i:i + rows].float()), b))
    return torch.cat(outs, dim=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(checkpoint: str, n_tokens: int = 8) -> None:
    model = load_reference(checkpoint=checkpoint)
    release_pages_after_use(model)  # the checkpoint is larger than the page cache: read, use, hand back
    Float32Linear.forward = _rounded_forward
    for name, m in model.named_modules():
        if name.startswith("text.") and isinstance(m, torch.nn.Linear) and m.in_features % BLOCK == 0:
            m._probe_rounds = True
    hidden: list[np.ndarray] = []
    for layer in model.text.layers:
        layer.register_forward_hook(
            lambda m, a, out: hidden.append((out[0] if isinstance(out, tuple) else out).detach().float().numpy().copy()))
    session = EagerSession(build_components(model))
    tokens = np.arange(1000, 1000 + n_tokens, dtype=np.int64)[None]
    pos = np.arange(n_tokens, dtype=np.int64)
    runs = {}
    for label, fn in ROUNDING.items():
        _active["round"] = fn
        hidden.clear()
        session.reset()
        t = time.perf_counter()
        emb = session.run("token_embedding", tokens=tokens)
        logits = session.run("text_decoder", embeds=emb, position_ids=np.stack([pos, pos, pos]), cache_position=pos)
        runs[label] = (np.asarray(logits).reshape(n_tokens, -1), list(hidden))
        print(f"{label}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    ref_logits, ref_hidden = runs["float"]
    layers = [i for i in range(len(ref_hidden)) if i == 0 or (i + 1) % 5 == 0 or i == len(ref_hidden) - 1]
    print("| rounding | " + " | ".join(f"layer {i + 1}" for i in layers) + " | logits cosine | rel L2 | top-1 match |")
    print("|---" * (len(layers) + 4) + "|")
    for label in list(ROUNDING)[1:]:
        logits, hid = runs[label]
        rel = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
        top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
        cells = " | ".join(f"{cosine(ref_hidden[i], hid[i]):.4f}" for i in layers)
        print(f"| {label} | {cells} | {cosine(ref_logits, logits):.4f} | {rel:.4f} | {top1:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python examples/quant_depth_probe.py CHECKPOINT [TOKENS]")
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
