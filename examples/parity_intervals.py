"""95 % bootstrap intervals (over prompts) of parity's decoder top-1 agreement and perplexity change.

    python examples/parity_intervals.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--samples 2000] [--seed 0]

Reads each ``ARTIFACT_DIR/parity/report.json`` (``autoglm-export parity``) and resamples its prompts with
replacement: top-1 over all positions of the drawn prompts, perplexity change from their summed NLLs (as parity
computes both). Prompts share a chat template, so their errors are correlated and the intervals are a lower bound
on the real uncertainty. Also prints each prompt's smallest and largest own perplexity change: a change of the same
sign on every prompt is systematic, not noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def intervals(report: dict, samples: int, rng: np.random.Generator) -> dict:
    prompts = report["decoder"]["prompts"]
    nll_ref = np.array([p["nll_reference"] for p in prompts])
    nll_art = np.array([p["nll_artifact"] for p in prompts])
    scored = np.array([p["text_tokens_scored"] for p in prompts])
    top1 = [np.asarray(p["per_position"]["top1"]) for p in prompts]
    hits, positions = np.array([t.sum() for t in top1]), np.array([t.size for t in top1])

    def ppl_change(i):
        return float(np.exp((nll_art[i].sum() - nll_ref[i].sum()) / scored[i].sum()) - 1)

    draws = rng.integers(0, len(prompts), (samples, len(prompts)))
    ppl = [ppl_change(i) for i in draws]
    agree = hits[draws].sum(1) / positions[draws].sum(1)
    per_prompt = np.exp((nll_art - nll_ref) / np.maximum(scored, 1)) - 1
    everything = np.arange(len(prompts))
    return {"prompts": len(prompts), "positions": int(positions.sum()), "tokens_scored": int(scored.sum()),
            "top1": float(hits.sum() / positions.sum()), "top1_95": [float(x) for x in np.percentile(agree, [2.5, 97.5])],
            "perplexity_change": ppl_change(everything), "perplexity_change_95": [float(x) for x in np.percentile(ppl, [2.5, 97.5])],
            "per_prompt_perplexity_change": [float(per_prompt.min()), float(per_prompt.max())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| artifact | top-1 (95 %) | perplexity change (95 %) | per-prompt change min / max | prompts, positions, tokens scored |")
    print("|---|---|---|---|---|")
    for d in args.artifacts:
        r = intervals(json.loads((d / "parity" / "report.json").read_text()), args.samples, rng)
        lo, hi = r["top1_95"]
        plo, phi = r["perplexity_change_95"]
        mn, mx = r["per_prompt_perplexity_change"]
        print(f"| {d.name} | {r['top1']:.4f} [{lo:.3f}, {hi:.3f}] | {100 * r['perplexity_change']:+.2f} % "
              f"[{100 * plo:+.1f}, {100 * phi:+.1f}] | {100 * mn:+.0f} / {100 * mx:+.0f} % | "
              f"{r['prompts']}, {r['positions']}, {r['tokens_scored']} |")


if __name__ == "__main__":
    main()
