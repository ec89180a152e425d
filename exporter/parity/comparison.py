"""The comparison: the same runner over the reference and the artifact, per method and end to end."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.artifact import Progress
from core.errors import ConfigError, InputFileError, ParityFailure
from core.metrics import aggregate, compare
from exporter.parity.inputs import Item
from exporter.parity.thresholds import METRICS_MIN


@dataclass
class ReferenceRun:
    """One parity item through the reference: its greedy generation and the embeddings the decoder is
    teacher-forced with. The reference pass finishes before the artifact is opened (at 9B the eager
    model's working set and the artifact's weights are not held together), and reuses the generation's
    own logits: the per-method decoder calls are exactly the generation's calls, so they are not repeated.
    """

    segments: list[Any]
    result: Any  # GenerationResult (greedy, ``steps`` tokens, no eos stop)
    segment_embeds: list[np.ndarray]  # the reference's embedding of each segment
    step_embeds: list[np.ndarray]  # the reference's embedding of each greedy token but the last

    def segment_logits(self) -> list[np.ndarray]:
        """The prompt logits split per segment, as each segment's prefill call returned them."""
        cuts = np.cumsum([s.length for s in self.segments])[:-1]
        return np.split(self.result.prompt_logits, cuts)

    def step_logits(self, k: int) -> np.ndarray:
        """[1, V]: the decoder's output after the reference's k-th greedy token (0-based)."""
        return self.result.step_logits[k + 1].reshape(1, -1)


def reference_pass(
    reference: Any,
    config: Any,
    tokenizer: Any,
    items: list[Item],
    steps: int = 32,
    progress: Progress | None = None,
) -> list[ReferenceRun]:
    """Every item through the reference session (greedy, ``steps`` tokens, no eos stop)."""
    from core.runner import Prompt, Runner

    runner = Runner(reference, config, tokenizer)
    runs = []
    for idx, item in enumerate(items):
        for p in (item.image, item.audio):
            if p is not None and not p.is_file():
                raise InputFileError(f"parity input file not found: {p}")
        prompt = Prompt(text=item.text, image=item.image, audio=item.audio)
        segments = runner.segments(prompt)
        result = runner.generate(prompt, max_new_tokens=steps, stop_at_eos=False)
        runs.append(ReferenceRun(
            segments=segments,
            result=result,
            segment_embeds=[runner.embed(seg) for seg in segments],
            step_embeds=[reference.run("token_embedding", tokens=np.asarray([[tok]], dtype=np.int64))
                         for tok in result.tokens[:-1]],
        ))
        if progress:
            progress("parity reference", idx + 1, len(items))
    reference.reset()
    return runs


def compare_sessions(
    reference: Any,
    artifact: Any,
    config: Any,
    tokenizer: Any,
    items: list[Item],
    steps: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Metrics per method and for the decoder: ``artifact`` against ``reference`` (a session, or the
    :func:`reference_pass` already made of it) through the shared runner on ``items``."""
    from core.runner import Prompt, Runner

    refs = reference if isinstance(reference, list) else reference_pass(reference, config, tokenizer, items, steps, progress)
    art_runner = Runner(artifact, config, tokenizer)
    per_method: dict[str, list[dict[str, Any]]] = {}
    prompts_out = []

    def record(method: str, item_idx: int, label: str, r: np.ndarray, a: np.ndarray) -> dict[str, Any]:
        if r.shape != a.shape:
            raise ParityFailure(
                f"{method}: artifact output shape {list(a.shape)} differs from the reference {list(r.shape)}",
                failures=[f"{method}.shape"],
            )
        m = compare(r, a)
        m.update(n=int(r.size), item=item_idx, call=label)
        per_method.setdefault(method, []).append(m)
        return m

    for idx, (item, run) in enumerate(zip(items, refs)):
        prompt = Prompt(text=item.text, image=item.image, audio=item.audio)
        segments, ref = run.segments, run.result
        art = art_runner.generate(prompt, max_new_tokens=steps, stop_at_eos=False)

        # 1. per method, identical inputs on both sides (the decoder teacher-forced with the reference's embeddings)
        artifact.reset()
        start = 0
        for s_i, (seg, r_emb, r_log) in enumerate(zip(segments, run.segment_embeds, run.segment_logits())):
            method = {"text": "token_embedding", "image": "vision_encoder", "audio": "audio_encoder"}[seg.kind]
            a_emb = art_runner.embed(seg)
            record(method, idx, f"segment {s_i} ({seg.kind}, {seg.length} tok)", r_emb, a_emb)
            a_log = art_runner.decode(r_emb, seg.position_ids, start)
            record("text_decoder", idx, f"prefill segment {s_i} ({seg.length} tok)", r_log, a_log)
            start += seg.length
        next_pos = int(segments[-1].position_ids.max()) + 1
        for k, tok in enumerate(ref.tokens[:-1]):
            r_emb = run.step_embeds[k]
            a_emb = artifact.run("token_embedding", tokens=np.asarray([[tok]], dtype=np.int64))
            record("token_embedding", idx, f"decode step {k + 1}", r_emb, a_emb)
            pos = np.full((3, 1), next_pos + k, dtype=np.int64)
            a_log = art_runner.decode(r_emb, pos, start + k)
            record("text_decoder", idx, f"decode step {k + 1}", run.step_logits(k), a_log)
        # 2. end to end, teacher-forced on the reference's continuation (artifact's own embeddings)
        a_prompt_logits = art_runner.prefill(segments)
        a_steps = [a_prompt_logits[-1]]
        for k, tok in enumerate(ref.tokens[:-1]):
            emb = artifact.run("token_embedding", tokens=np.asarray([[tok]], dtype=np.int64))
            pos = np.full((3, 1), next_pos + k, dtype=np.int64)
            a_steps.append(art_runner.decode(emb, pos, start + k)[-1])
        ref_pos = np.concatenate([ref.prompt_logits, ref.step_logits[1:]], axis=0)
        art_pos = np.concatenate([a_prompt_logits, np.stack(a_steps)[1:]], axis=0)
        top1 = (ref_pos.argmax(-1) == art_pos.argmax(-1)).astype(int).tolist()
        pos_metrics = [compare(r, a) for r, a in zip(ref_pos, art_pos)]
        # held-out text: each prompt logit scored on the prompt's next token (media placeholders excluded)
        media_ids = {config.tokens.image_token_id, config.tokens.audio_token_id}
        scored = [i for i in range(len(ref.prompt_tokens) - 1) if ref.prompt_tokens[i + 1] not in media_ids]
        targets = np.asarray([ref.prompt_tokens[i + 1] for i in scored], dtype=np.int64)
        nll_ref = _nll(ref.prompt_logits[scored], targets)
        nll_art = _nll(a_prompt_logits[scored], targets)

        first_div = next((i for i, (x, y) in enumerate(zip(ref.tokens, art.tokens)) if x != y), None)
        if first_div is None and len(ref.tokens) != len(art.tokens):
            first_div = min(len(ref.tokens), len(art.tokens))
        matched = len(ref.tokens) if first_div is None else first_div
        prompts_out.append(
            {
                "item": idx,
                "text": item.text,
                "image": str(item.image) if item.image else None,
                "audio": str(item.audio) if item.audio else None,
                "prompt_len": len(ref.prompt_tokens),
                "steps": len(ref.tokens),
                "reference_tokens": ref.tokens,
                "artifact_tokens": art.tokens,
                "reference_text": ref.text,
                "artifact_text": art.text,
                "first_divergence": first_div,
                "greedy_match": matched / max(len(ref.tokens), 1),
                "top1_agreement": float(np.mean(top1)) if top1 else 1.0,
                "text_tokens_scored": len(scored),
                "nll_reference": nll_ref,
                "nll_artifact": nll_art,
                "per_position": {
                    "top1": top1,
                    "cosine": [m["cosine"] for m in pos_metrics],
                    "max_abs": [m["max_abs"] for m in pos_metrics],
                },
            }
        )
        if progress:
            progress("parity prompts", idx + 1, len(items))

    methods = {}
    for name, calls in per_method.items():
        agg = aggregate(calls)
        agg["calls"] = len(calls)
        agg["per_call"] = [{k: c[k] for k in ("item", "call", "max_abs", "mean_abs", "cosine", "sqnr_db")} for c in calls]
        methods[name] = agg
    top1_all = [t for p in prompts_out for t in p["per_position"]["top1"]]
    n_scored = sum(p["text_tokens_scored"] for p in prompts_out)
    ppl_ref = float(np.exp(sum(p["nll_reference"] for p in prompts_out) / max(n_scored, 1)))
    ppl_art = float(np.exp(sum(p["nll_artifact"] for p in prompts_out) / max(n_scored, 1)))
    decoder = {
        "steps": steps,
        "prompts": prompts_out,
        "perplexity_reference": ppl_ref,
        "perplexity_artifact": ppl_art,
        "perplexity_change": ppl_art / ppl_ref - 1.0,
        "top1_agreement": float(np.mean(top1_all)) if top1_all else 1.0,
        "greedy_match": min((p["greedy_match"] for p in prompts_out), default=1.0),
        "how": {
            "top1_agreement": "artifact teacher-forced on the reference's prompt + greedy continuation; argmax equal per position, over all positions of all prompts",
            "greedy_match": "both greedy for N steps; tokens matched before the first divergence / N; worst prompt",
            "perplexity": "exp(mean next-token NLL) over the held-out prompts' text tokens (media placeholders excluded), "
            "reference and artifact each scored with its own prompt logits; change = artifact / reference - 1",
        },
    }
    return {"methods": methods, "decoder": decoder}


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-token negative log-likelihood (float64 log-softmax)."""
    if len(targets) == 0:
        return 0.0
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def for_model(items: list[Item], config: Any) -> tuple[list[Item], list[str]]:
    """Items as this model can take them: media it has no encoder for is dropped (and said so)."""
    import dataclasses

    out, notes = [], []
    for it in items:
        drop = [k for k, enc in (("image", config.vision), ("audio", config.audio)) if getattr(it, k) and enc is None]
        if drop:
            notes.append(f"{it.label()}: {' and '.join(drop)} dropped (model '{config.name}' has no such encoder)")
            it = dataclasses.replace(it, **{k: None for k in drop})
        out.append(it)
    return out, notes


def evaluate(results: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """One check per (threshold, method) pair that applies; each says pass or fail."""
    checks = []
    for key, limit in sorted(thresholds.items()):
        scope, _, metric = key.partition(".")
        if scope == "decoder":
            value = results["decoder"][metric]
            checks.append(_check(key, "decoder", metric, value, ">=", limit))
            continue
        names = list(results["methods"]) if scope == "*" else [scope]
        for name in names:
            if name not in results["methods"]:
                raise ConfigError(f"threshold '{key}': the artifact has no method '{name}' (it has: {', '.join(results['methods'])})")
            value = results["methods"][name][metric]
            op = ">=" if metric in METRICS_MIN else "<="
            if metric == "sqnr_db" and value is None and results["methods"][name]["finite"]:
                value = math.inf  # exact
            checks.append(_check(f"{name}.{metric}", name, metric, value, op, limit))
    return checks


def _check(name: str, scope: str, metric: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        passed = False
    else:
        passed = value >= limit if op == ">=" else value <= limit
    v = None if value is None or (isinstance(value, float) and math.isinf(value)) else value
    return {"name": name, "scope": scope, "metric": metric, "value": v, "op": op, "threshold": limit, "passed": bool(passed)}
