"""One decode step of an ORT artifact through this tool's session against onnxruntime-genai's generator, in one process.

    python examples/ort_step_vs_genai.py OURS_ARTIFACT GENAI_FOLDER [--rounds 12] [--threads 2]

``bench_anchors.py`` times each artifact in its own process, so a few percent between two of them is lost in the
shared host's drift. Here, round-robin in one process (the same load for all), 63 greedy decode steps after a
64-token prompt (after one untimed warm-up), median ms per step over the rounds:

* ``ours``: ``OrtSession.run("token_embedding")`` then ``run("text_decoder")`` per step, as ``generate`` drives it;
* ``ours, decoder only``: the same steps reusing one token's embedding (what the separate embedding call costs);
* ``genai``: ``og.Generator.generate_next_token`` on genai's own folder (its C++ loop, embedding inside its graph).

Both sides get ``--threads`` intra-op threads. The prompt ids are 64 fixed ids (the step's time does not depend on
them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = list(range(100, 164))
STEPS = 63


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("genai", type=Path)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import onnxruntime as ort
    import onnxruntime_genai as og

    base = ort.SessionOptions

    class Options(base):  # the target session's own options, with the thread count set (as bench_anchors.py)
        def __init__(self) -> None:
            super().__init__()
            self.intra_op_num_threads = a.threads

    ort.SessionOptions = Options
    from core.artifact import read_artifact
    from targets import get_target

    session = get_target("ort").open(read_artifact(a.ours))
    one = session.run("token_embedding", tokens=np.asarray([[PROMPT[-1]]], np.int64))

    def ours(embed_each_step: bool) -> float:
        session.reset()
        pos = np.arange(len(PROMPT), dtype=np.int64)
        embeds = session.run("token_embedding", tokens=np.asarray([PROMPT], np.int64))
        logits = session.run("text_decoder", embeds=embeds, position_ids=np.stack([pos] * 3), cache_position=pos)
        tok = int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1]))
        start = time.perf_counter()
        for k in range(STEPS):
            p = len(PROMPT) + k
            e = session.run("token_embedding", tokens=np.asarray([[tok]], np.int64)) if embed_each_step else one
            logits = session.run("text_decoder", embeds=e, position_ids=np.full((3, 1), p, np.int64),
                                 cache_position=np.asarray([p]))
            tok = int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1]))
        return (time.perf_counter() - start) / STEPS * 1e3

    config = og.Config(str(a.genai))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": a.threads}}}}))
    model = og.Model(config)

    def genai() -> float:
        params = og.GeneratorParams(model)
        n = len(PROMPT) + STEPS + 1
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(PROMPT, np.int32))
        gen.generate_next_token()
        start = time.perf_counter()
        for _ in range(STEPS):
            gen.generate_next_token()
        return (time.perf_counter() - start) / STEPS * 1e3

    runs = {"ours": lambda: ours(True), "ours, decoder only": lambda: ours(False), "genai": genai}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            times[name].append(run())
    ref = float(np.median(times["genai"]))
    print(f"{len(PROMPT)}-token prompt, {STEPS} decode steps, {a.threads} threads, {a.rounds} rounds round-robin")
    for name, t in times.items():
        med = float(np.median(t))
        print(f"{name:20s} {med:6.2f} ms/step  ({ref / med:.2f}x genai's speed)  rounds: {' '.join(f'{x:.2f}' for x in t)}")


if __name__ == "__main__":
    main()
