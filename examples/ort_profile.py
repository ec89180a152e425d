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


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends quietly
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--past", type=int, default=64, help="cached positions before the decoded token")
    ap.add_argument("--steps", type=int, default=20, help="profiled decode calls (after one warm-up)")
    ap.add_argument("--format", choices=("onnx", "ort"), default="onnx", help="text_decoder.onnx or .ort")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--decoder", type=Path, help="profile this decoder file (same model) instead of the artifact's")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
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
