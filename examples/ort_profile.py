"""Which onnxruntime kernels run one decode step of an ORT artifact's text decoder, and their share of the time.

    python examples/ort_profile.py ARTIFACT [--past 64] [--steps 20] [--format onnx|ort] [--threads 2] [--decoder PATH]

Opens ``text_decoder.<format>`` with the session options the target's own session uses (CPU provider,
``session.qdqisint8allowed`` 1, NCHWc left out: see targets/ort/session.py), turns on onnxruntime's
profiler (``SessionOptions.enable_profiling``), runs ``--steps`` single-token decode calls over a past of
``--past`` positions (after one untimed warm-up call) and reads the profile JSON back: every node event
carries its op type (the kernel actually dispatched after the graph optimizer's fusions, e.g.
``MatMulIntegerToFloat`` for a fused DQ -> MatMul) and its kernel time. Prints the op types by share of the
summed kernel time, their node counts, and the mean wall time per step. The inputs are random (kernel time
does not depend on the values); only the shapes matter.

``--compare NAME=DECODER[,key=value...] ...`` instead times the artifact's decoder (as ``fp32`` when the artifact is
fp32) and each given decoder file of the same model round-robin in one process (the same host load for all: a shared
host's load drifts between separate runs), with optional session config entries per decoder (e.g.
``session.qdq_matmulnbits_accuracy_level=0``), and scores each against the artifact's decoder on the held-out texts
joined into one sequence, teacher-forced through the artifact's token embedding: top-1 agreement of the logits,
perplexity change, mean logits cosine. It measures the decoder alone, not ``parity``'s greedy runs.

Why not bench: bench says how fast, this says why (a QDQ model whose pattern the CPU EP does not fuse shows
up as DequantizeLinear + MatMul time, a fused one as integer kernels).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.artifact import read_artifact  # noqa: E402
from exporter.model.config import ModelConfig  # noqa: E402
from targets.ort.graphs import decoder_feeds  # noqa: E402


def session_options(profile_dir: Path, threads: int, model_format: str):
    """The target session's options (targets/ort/session.py) plus the profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    if model_format == "ort":
        options.add_session_config_entry("session.load_model_format", "ORT")
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "decode")
    return options


def decode_feeds(config: ModelConfig, past_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One decode call: a single new token after ``past_len`` cached positions (random values, real shapes)."""
    rng = np.random.default_rng(seed)
    t = config.text
    shape = (1, t.num_kv_heads, past_len, t.head_dim)
    past = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)) for _ in range(t.num_layers)]
    embeds = rng.standard_normal((1, 1, t.hidden_size), np.float32) * 0.02
    pos = np.full((3, 1), past_len, np.int64)
    return decoder_feeds(embeds, pos, past)


def kernel_times(profile: Path) -> tuple[dict[str, float], dict[str, set[str]], int]:
    """Per op type: summed kernel microseconds and the node names; and the number of decoder runs profiled."""
    events = json.loads(profile.read_text())
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += float(e.get("dur", 0))
        nodes[op].add(e["name"][: -len("_kernel_time")])
    return per_op, nodes, runs


def profile_decoder(artifact_dir: Path, past_len: int, steps: int, model_format: str, threads: int,
                    decoder: Path | None = None) -> dict:
    """Run and profile ``steps`` decode calls; returns the measured numbers (also what --json writes).

    ``decoder``: another decoder file of the same model (e.g. one quantized differently) instead of the artifact's."""
    import onnxruntime as ort

    art = read_artifact(artifact_dir)
    config = ModelConfig.from_dict(art.metadata["model"])
    path = decoder or art.dir / f"text_decoder.{model_format}"
    feeds = decode_feeds(config, past_len)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(Path(tmp), threads, model_format)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=["NchwcTransformer"])
        session.run(None, feeds)  # warm-up (first-run allocations): profiled too, dropped by _steady_state
        t0 = time.perf_counter()
        for _ in range(steps):
            session.run(None, feeds)
        wall = (time.perf_counter() - t0) / steps
        profile = Path(session.end_profiling())
        per_op, nodes, runs = _steady_state(profile)
    total = sum(per_op.values())
    return {
        "artifact": str(decoder or artifact_dir), "recipe": "?" if decoder else art.recipe, "format": model_format, "past": past_len,
        "steps": steps, "runs_profiled": runs, "threads": threads or "default",
        "onnxruntime": ort.__version__, "wall_ms_per_step": wall * 1e3,
        "kernel_ms_per_step": total / 1e3 / max(1, runs),
        "ops": {op: {"share": us / total if total else 0.0, "ms_per_step": us / 1e3 / max(1, runs),
                     "nodes": len(nodes[op])} for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


def _steady_state(profile: Path) -> tuple[dict[str, float], dict[str, set[str]], int]:
    """Kernel times of every profiled run but the first (the warm-up), from the profile's event order."""
    events = json.loads(profile.read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(starts) > 1:
        events = [e for e in events if e.get("ts", 0) >= starts[1]]
    trimmed = profile.with_suffix(".steady.json")
    trimmed.write_text(json.dumps(events))
    return kernel_times(trimmed)


def _session(path: Path, threads: int, entries: list[str]):
    """A plain CPU session with the target's options and extra ``key=value`` session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    for entry in entries:
        key, value = entry.split("=", 1)
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


def heldout_sequence(art, config: ModelConfig) -> np.ndarray:
    """The held-out texts (never used for calibration) joined into one token sequence [1, T]."""
    from core.dataset import heldout_manifest
    from core.runner import load_tokenizer
    from exporter.parity import read_inputs

    text = " ".join(i.text for i in read_inputs(Path(heldout_manifest())) if i.text)
    return np.asarray(load_tokenizer(config, art.dir / "tokenizer.json").encode(text, add_special_tokens=False).ids,
                      np.int64)[None]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(artifact_dir: Path, specs: list[str], past_len: int, rounds: int, threads: int) -> dict:
    """Round-robin decode-step times and teacher-forced agreement of each ``NAME=PATH[,k=v...]`` decoder vs the artifact's."""
    from targets.ort.graphs import method_feeds

    art = read_artifact(artifact_dir)
    config = ModelConfig.from_dict(art.metadata["model"])
    decoders = {art.recipe: (art.dir / "text_decoder.onnx", [])}
    for spec in specs:
        name, rest = spec.split("=", 1)
        path, *entries = rest.split(",")
        decoders[name] = (Path(path), entries)
    sessions = {name: _session(path, threads, entries) for name, (path, entries) in decoders.items()}
    ids = heldout_sequence(art, config)
    t = config.text
    embeds = _session(art.dir / "token_embedding.onnx", threads, []).run(None, method_feeds("token_embedding", {"tokens": ids}, config))[0]
    empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
    prefill = decoder_feeds(embeds, np.tile(np.arange(ids.shape[1]), (3, 1)), [(empty, empty)] * t.num_layers)
    logits = {name: s.run(["logits"], prefill)[0][0] for name, s in sessions.items()}
    ref = logits[art.recipe]
    target = ids[0, 1:]
    nll = {name: -_log_softmax(lg[:-1])[np.arange(len(target)), target].mean() for name, lg in logits.items()}
    step = decode_feeds(config, past_len)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, step)
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, step)
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = float(np.median(times[art.recipe]))
    return {"artifact": str(artifact_dir), "reference": art.recipe, "tokens": int(ids.shape[1]), "rounds": rounds,
            "past": past_len, "threads": threads, "decoders": {name: {
                "path": str(decoders[name][0]), "session_config": decoders[name][1],
                "step_ms_median": float(np.median(times[name])), "speed_vs_reference": base / float(np.median(times[name])),
                "top1": float((lg.argmax(-1) == ref.argmax(-1)).mean()),
                "perplexity_delta_pct": float(100 * (np.exp(nll[name] - nll[art.recipe]) - 1)),
                "logits_cosine_mean": float(np.mean((lg * ref).sum(-1) / np.linalg.norm(lg, axis=-1) / np.linalg.norm(ref, axis=-1))),
            } for name, lg in logits.items()}}


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends quietly
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--past", type=int, default=64, help="cached positions before the decoded token")
    ap.add_argument("--steps", type=int, default=20, help="profiled decode calls (after one warm-up)")
    ap.add_argument("--format", choices=("onnx", "ort"), default="onnx", help="text_decoder.onnx or .ort")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--decoder", type=Path, help="profile this decoder file (same model) instead of the artifact's")
    ap.add_argument("--compare", nargs="+", metavar="NAME=DECODER[,key=value]",
                    help="time and score these decoders against the artifact's instead of profiling")
    ap.add_argument("--rounds", type=int, default=15, help="--compare: round-robin decode steps per decoder")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
    if a.compare:
        c = compare(a.artifact, a.compare, a.past, a.rounds, a.threads or 2)
        print(f"vs {c['reference']} ({c['artifact']}): 1 token after {c['past']} past, {c['threads']} threads, "
              f"median of {c['rounds']} round-robin steps; teacher-forced on {c['tokens']} held-out tokens")
        print(f"{'decoder':24s} {'step ms':>8s} {'speed':>6s} {'top-1':>6s} {'ppl delta':>9s} {'cosine':>7s}")
        for name, d in c["decoders"].items():
            print(f"{name:24s} {d['step_ms_median']:8.1f} {d['speed_vs_reference']:5.2f}x {d['top1']:6.3f} "
                  f"{d['perplexity_delta_pct']:+8.1f}% {d['logits_cosine_mean']:7.3f}")
        if a.json:
            a.json.write_text(json.dumps(c, indent=2) + "\n")
        return
    r = profile_decoder(a.artifact, a.past, a.steps, a.format, a.threads, a.decoder)
    print(f"{r['artifact']} ({r['recipe']}, {Path(r['artifact']).name if a.decoder else 'text_decoder.' + r['format']}, onnxruntime {r['onnxruntime']}, "
          f"{r['threads']} threads): 1 token after {r['past']} past, {r['runs_profiled']} runs after a warm-up")
    print(f"wall {r['wall_ms_per_step']:.2f} ms/step, summed kernel time {r['kernel_ms_per_step']:.2f} ms/step")
    print(f"{'op type (kernel that ran)':34s} {'share':>7s} {'ms/step':>8s} {'nodes':>6s}")
    for op, v in r["ops"].items():
        print(f"{op:34s} {100 * v['share']:6.1f}% {v['ms_per_step']:8.3f} {v['nodes']:6d}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
