"""Would a training-free, confidence-based early exit be honest? Measure it before offering it (issue 20, item 4).

The seed's "conditional computation" skips layers depending on the input. Without training, the only exit
head a model has is its own final norm + lm_head applied to an intermediate hidden state (a "logit lens").
A decoder would stop at the first candidate layer k whose max softmax probability reaches a threshold and
emit that layer's top-1. This script measures, on the built-in held-out prompts through the eager reference:

* per candidate layer k and threshold t: the fraction of decoded tokens confident enough to exit at k, and
  how often the token read at k equals the full model's top-1 (among those that would exit there);
* per threshold, the whole policy (exit at the first confident candidate, else run every layer): tokens
  exited, agreement of the emitted token with the full model's, and the fraction of decoder layers skipped.

Positions are those of a greedy continuation of each prompt by the full model (the decode steps an exit would
act on), teacher-forced, so the agreement is an upper bound: a real early exit would feed its own (possibly
different) tokens back, and the layers it skipped would leave no K/V for later tokens to attend to.

    PYTHONPATH=/work/smolpkg python examples/early_exit_probe.py --preset smollm2-135m
    python examples/early_exit_probe.py --preset tiny --every 1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from core.components import build_components
from core.dataset import heldout_manifest
from core.runner import EagerSession, Prompt, Runner, load_tokenizer
from exporter.reference import load_reference


@dataclass
class Lens:
    """Per decoded position: the max softmax probability and top-1 read at each candidate layer, and the final top-1."""

    layers: list[int]  # candidate exit layers (after k decoder layers), then the last layer (the full model)
    confidence: np.ndarray  # [len(layers), N]
    top1: np.ndarray  # [len(layers), N]
    final: np.ndarray  # [N]: the full model's top-1
    num_layers: int


def heldout_texts() -> list[str]:
    """The held-out prompts' text (media dropped: the probe is about the text decoder, and SmolLM2 has no encoders)."""
    lines = heldout_manifest().read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def hidden_states(text_model, embeds: torch.Tensor, position_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's output (forward hooks) and the final logits, for one uncached forward pass."""
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: states.append(out)) for layer in text_model.layers]
    try:
        with torch.no_grad():
            logits = text_model.forward_full(embeds, position_ids)
    finally:
        for h in hooks:
            h.remove()
    return states, logits[0]


def lens_for_prompt(runner: Runner, components, text: str, steps: int, layers: list[int]):
    """Greedy-continue ``text`` with the full model, then read every candidate layer at the continuation's positions."""
    result = runner.generate(Prompt(text=text), max_new_tokens=steps, stop_at_eos=False)
    ids = result.prompt_tokens + result.tokens
    text_model = components.model.text
    with torch.no_grad():
        embeds = components.token_embedding(torch.tensor([ids], dtype=torch.long))
    pos = torch.arange(len(ids), dtype=torch.long).expand(3, len(ids)).contiguous()
    states, final_logits = hidden_states(text_model, embeds.to(components.model.compute_dtype), pos)
    # position i predicts token i+1: the decode steps are the positions from the prompt's last token on
    sl = slice(len(result.prompt_tokens) - 1, len(ids) - 1)
    final = final_logits[sl].float().argmax(-1).numpy()
    conf, top1 = [], []
    with torch.no_grad():
        for k in layers:
            probs = torch.softmax(text_model.lm_head(text_model.norm(states[k - 1][0, sl])).float(), dim=-1)
            p, t = probs.max(-1)
            conf.append(p.numpy())
            top1.append(t.numpy())
    return np.stack(conf), np.stack(top1), final, np.asarray(result.tokens)


def measure(preset: str, every: int, steps: int) -> Lens:
    """The lens over every held-out prompt (checking that the hooked pass reproduces the greedy tokens)."""
    model = load_reference(preset)
    model.eval()
    config = model.config
    n = config.text.num_layers
    # the candidates, and the last layer itself as the reference row (the full model's own confidence)
    layers = [k for k in range(every, n, every)] + [n]
    components = build_components(model)
    runner = Runner(EagerSession(components), config, load_tokenizer(config))
    confs, top1s, finals, greedy = [], [], [], []
    texts = heldout_texts()
    for i, text in enumerate(texts):
        print(f"prompt {i + 1}/{len(texts)}", file=sys.stderr, flush=True)
        c, t, f, g = lens_for_prompt(runner, components, text, steps, layers)
        confs.append(c)
        top1s.append(t)
        finals.append(f)
        greedy.append(g)
    final = np.concatenate(finals)
    same = float(np.mean(final == np.concatenate(greedy)))
    print(f"<!-- {preset}: {len(finals)} prompts, {final.size} decoded positions; the hooked uncached pass reproduces "
          f"the cached greedy tokens at {same:.3f} of them -->")
    return Lens(layers, np.concatenate(confs, axis=1), np.concatenate(top1s, axis=1), final, n)


def per_layer_table(lens: Lens, thresholds: list[float]) -> str:
    """Fraction confident at k, and their agreement with the full top-1; plus the unconditional agreement at k."""
    head = "| exit after layer | top-1 = full (all tokens) | " + " | ".join(
        f"p≥{t}: exits / agrees" for t in thresholds) + " |"
    rows = [head, "|" + "---|" * (2 + len(thresholds))]
    for i, k in enumerate(lens.layers):
        agree = lens.top1[i] == lens.final
        cells = []
        for t in thresholds:
            ex = lens.confidence[i] >= t
            cells.append(f"{ex.mean():.3f} / {agree[ex].mean():.3f}" if ex.any() else f"{ex.mean():.3f} / n/a")
        rows.append(f"| {k} of {lens.num_layers} | {agree.mean():.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def policy_table(lens: Lens, thresholds: list[float]) -> str:
    """Exit at the first candidate layer that is confident enough, else run all layers: what it would cost."""
    rows = ["| threshold | tokens exited early | emitted = full top-1 | exited tokens that differ | decoder layers skipped |",
            "|---|---|---|---|---|"]
    n_tok = lens.final.size
    for t in thresholds:
        emitted = lens.final.copy()
        depth = np.full(n_tok, lens.num_layers)
        done = np.zeros(n_tok, bool)
        for i, k in enumerate(lens.layers[:-1]):  # the last entry is the full model, not an exit
            go = ~done & (lens.confidence[i] >= t)
            emitted[go] = lens.top1[i][go]
            depth[go] = k
            done |= go
        wrong = emitted != lens.final
        rows.append(f"| {t} | {done.mean():.3f} | {1 - wrong.mean():.3f} | "
                    f"{(wrong[done].mean() if done.any() else 0.0):.3f} | {1 - depth.mean() / lens.num_layers:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--every", type=int, default=5, help="candidate exit layers: every N-th decoder layer")
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens decoded per held-out prompt")
    ap.add_argument("--thresholds", default="0.5,0.7,0.9")
    args = ap.parse_args()
    thresholds = [float(x) for x in args.thresholds.split(",")]
    torch.manual_seed(0)
    lens = measure(args.preset, args.every, args.steps)
    print(f"\n#### Early exit on {args.preset}: per candidate layer (teacher-forced on the full model's greedy tokens)\n")
    print(per_layer_table(lens, thresholds))
    print(f"\n#### Early exit on {args.preset}: exit at the first confident candidate\n")
    print(policy_table(lens, thresholds))


if __name__ == "__main__":
    main()
