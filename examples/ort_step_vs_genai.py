"""One decode step of an ORT artifact through this tool's session against onnxruntime-genai's generator, in one process.

    python examples/ort_step_vs_genai.py OURS_ARTIFACT GENAI_FOLDER [--rounds 12] [--threads 2] [--profile]

``bench_anchors.py`` times each artifact in its own process, so a few percent between two of them is lost in the
shared host's drift. Here, round-robin in one process (the same load for all), 63 greedy decode steps after a
64-token prompt (after one untimed warm-up), median ms per step over the rounds:

* ``ours``: ``OrtSession.run("token_embedding")`` then ``run("text_decoder")`` per step, as ``generate`` drives it;
* ``ours, decoder only``: the same steps reusing one token's embedding (what the separate embedding call costs);
* ``genai``: ``og.Generator.generate_next_token`` on genai's own folder (its C++ loop, embedding inside its graph).

Both sides get ``--threads`` intra-op threads. The prompt ids are 64 fixed ids (the step's time does not depend on
them).

``--profile``: after the timed rounds, one more pass of ``ours`` and of ``genai`` on sessions opened with
onnxruntime's profiler (genai: its decoder's ``session_options.enable_profiling``), alternated ``--profile-rounds``
times. Per decode step (means over every profiled step, as the step's wall time is a pass's mean): the step's wall
time, the decoder's ``model_run`` (the whole ``Run`` inside onnxruntime), the sum of its kernels' times, and the
rest: for ours the token embedding's own ``Run`` and the Python around the calls, for genai its C++ generator
around the ``Run``. That says whether a difference between the two is in the graph (kernels), in onnxruntime's run
overhead, or in the host loop. The profiler adds its own cost to every number of this pass, on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    ap.add_argument("--profile", action="store_true", help="then one profiled pass of each (see above)")
    ap.add_argument("--profile-rounds", type=int, default=3)
    a = ap.parse_args()

    import onnxruntime as ort
    import onnxruntime_genai as og

    base = ort.SessionOptions

    class Options(base):  # the target session's own options, with the thread count set (as bench_anchors.py)
        profile_prefix: str | None = None  # set: the sessions opened now are profiled

        def __init__(self) -> None:
            super().__init__()
            self.intra_op_num_threads = a.threads
            if Options.profile_prefix:
                self.enable_profiling = True
                self.profile_file_prefix = Options.profile_prefix

    ort.SessionOptions = Options
    from core.artifact import read_artifact
    from targets import get_target

    session = get_target("ort").open(read_artifact(a.ours))
    one = session.run("token_embedding", tokens=np.asarray([[PROMPT[-1]]], np.int64))

    def ours(embed_each_step: bool, session=session) -> float:
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

    def genai(model=model) -> float:
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
    if a.profile:
        with tempfile.TemporaryDirectory() as tmp:
            profiled(a, Path(tmp), Options, ours, genai, og, get_target, read_artifact)


def decode_runs(profile: Path) -> list[tuple[float, float]]:
    """(model_run µs, summed kernel µs) of every Run in an onnxruntime profile after its first (the prompt's)."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    kernels = sorted((e["ts"], e["dur"]) for e in events
                     if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))
    out, k = [], 0
    for ts, dur in runs:
        total = 0.0
        while k < len(kernels) and kernels[k][0] < ts + dur:
            if kernels[k][0] >= ts:
                total += kernels[k][1]
            k += 1
        out.append((float(dur), total))
    return out[1:]


def profiled(a, tmp: Path, Options, ours, genai, og, get_target, read_artifact) -> None:
    """The --profile pass: both sides on profiled sessions, alternated; a table of per-step means."""
    rows: dict[str, list[tuple[float, float, float, float]]] = {"ours": [], "genai": []}
    for r in range(a.profile_rounds):
        Options.profile_prefix = str(tmp / f"ours{r}")
        session = get_target("ort").open(read_artifact(a.ours))
        Options.profile_prefix = None
        wall = ours(True, session)
        files = {m: Path(s.end_profiling()) for m, s in session.sessions.items()}
        del session
        decoder = decode_runs(files["text_decoder"])
        embed = [run for run, _ in decode_runs(files["token_embedding"])]
        rows["ours"] += [(wall * 1e3, run, kern, emb) for (run, kern), emb in zip(decoder, embed)]

        config = og.Config(str(a.genai))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": a.threads, "enable_profiling": str(tmp / f"genai{r}")}}}}))
        model = og.Model(config)
        wall = genai(model)
        del model  # the profile is written when genai's session closes
        profile = max(tmp.glob(f"genai{r}*.json"), key=lambda f: f.stat().st_mtime)
        rows["genai"] += [(wall * 1e3, run, kern, 0.0) for run, kern in decode_runs(profile)]
    print(f"profiled ({a.profile_rounds} passes of {STEPS} steps each, alternated; means in µs per decode step):")
    print(f"{'':8s} {'step wall':>10s} {'decoder Run':>12s} {'its kernels':>12s} {'Run - kernels':>14s} "
          f"{'embedding Run':>14s} {'outside the Runs':>17s}")
    for name, r in rows.items():
        wall, run, kern, emb = (float(np.mean([x[i] for x in r])) for i in range(4))  # (wall: a pass's mean)
        print(f"{name:8s} {wall:10.0f} {run:12.0f} {kern:12.0f} {run - kern:14.0f} {emb:14.0f} "
              f"{wall - run - emb:17.0f}")


if __name__ == "__main__":
    main()
