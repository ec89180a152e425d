"""Benchmark an artifact's runtime against eager PyTorch fp32, in the same run.

Each runtime is measured in its own child process (``python -m exporter.bench
--worker ...``) so its peak RSS is its own: load time (the second load in the
process, imports done; the first, with the runtime's Python imports, is
reported beside it), prefill tok/s (one
text prefill of P tokens), decode tok/s (N greedy single-token steps), peak
RSS. The parent adds artifact size, the host's measured copy bandwidth
(numpy, large array) and the memory-bandwidth bound for decode: the weight
bytes a decoded token must read divided by that bandwidth.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.recipes import FLOAT32, QuantScheme
from core.errors import RuntimeFailure

BENCH_SCHEMA = "autoglm-export/bench"
BENCH_SCHEMA_VERSION = 1
Progress = Callable[[str, int, int], None]

# bytes per decoder weight element, by recipe (scales and zero points not counted)


def weight_bytes(scheme: QuantScheme) -> float:
    """Bytes a decode step reads per decoder weight under ``scheme`` (the target spec's, for the recipe)."""
    if scheme.weight_bits is not None:
        return scheme.weight_bits / 8
    return 2.0 if scheme.float_dtype == "float16" else 4.0


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s from copying a large array (read + write counted), best of ``repeats``."""
    n = mib * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * src.nbytes / best


def decoder_weight_elements(config: Any) -> int:
    """Weight elements one decode step reads: decoder layers, final norm, lm_head (one embedding row is negligible)."""
    from exporter.model import build

    model = build(config, device="meta")
    t = model.text
    n = sum(p.numel() for p in t.layers.parameters()) + sum(p.numel() for p in t.norm.parameters())
    head = getattr(t, "lm_head", None)
    n += t.embed_tokens.weight.numel() if (config.text.tie_embeddings or head is None) else head.weight.numel()
    return int(n)


# --- the child process ------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would carry the parent's peak across fork/exec)."""
    from core.artifact import memory_mib

    return memory_mib()["peak_mib"]


def _bench_tokens(config: Any, tokenizer: Any, n: int) -> np.ndarray:
    """``n`` token ids of real text (the held-out prompts, repeated)."""
    try:
        from core.dataset import heldout_manifest

        from exporter.parity import read_inputs

        texts = [i.text for i in read_inputs(Path(heldout_manifest())) if i.text]
    except Exception:  # noqa: BLE001 - fall back to this module's docstring as text
        texts = []
    text = " ".join(texts) or (__doc__ or "benchmark")
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids) or [0]
    reps = -(-n // len(ids))
    return np.asarray((ids * reps)[:n], dtype=np.int64)[None]


def _worker(artifact_dir: Path, which: str, prompt_len: int, steps: int, repeats: int) -> dict[str, Any]:
    from core.runner import load_tokenizer
    from core.artifact import read_artifact

    from exporter.model.config import ModelConfig

    art = read_artifact(artifact_dir)
    config = ModelConfig.from_dict(art.metadata["model"])
    tokenizer = load_tokenizer(config, art.dir / "tokenizer.json")
    rss_before = _peak_rss_mb()

    def load() -> Any:
        if which == "eager":
            from core.components import build_components
            from exporter.parity.run import reference_model
            from core.runner import EagerSession

            return EagerSession(build_components(reference_model(art, config)))
        from targets import get_target

        return get_target(art.target).open(art)

    runtime = "PyTorch eager fp32" if which == "eager" else art.target
    # the first load pays the runtime's Python imports (ExecuTorch's bindings import its compiler, seconds);
    # an app links its runtime once, so "load" is the second: the program itself, imports done
    t0 = time.perf_counter()
    session = load()
    first_load_s = time.perf_counter() - t0
    del session
    gc.collect()
    t0 = time.perf_counter()
    session = load()
    load_s = time.perf_counter() - t0
    tokens = _bench_tokens(config, tokenizer, prompt_len)
    P = tokens.shape[1]
    pos = np.arange(P, dtype=np.int64)

    def prefill() -> np.ndarray:
        emb = session.run("token_embedding", tokens=tokens)
        return session.run("text_decoder", embeds=emb, position_ids=np.stack([pos, pos, pos]), cache_position=pos)

    session.reset()
    prefill()  # warm-up
    pre = []
    for _ in range(repeats):
        session.reset()
        t = time.perf_counter()
        logits = prefill()
        pre.append(time.perf_counter() - t)
    dec = []
    for _ in range(repeats):
        session.reset()
        logits = prefill()
        tok = int(np.argmax(logits.reshape(P, -1)[-1]))
        t = time.perf_counter()
        for k in range(steps):
            emb = session.run("token_embedding", tokens=np.asarray([[tok]], dtype=np.int64))
            p = np.asarray([P + k], dtype=np.int64)
            out = session.run("text_decoder", embeds=emb, position_ids=np.stack([p, p, p]), cache_position=p)
            tok = int(np.argmax(out.reshape(-1)))
        dec.append(time.perf_counter() - t)
    return {
        "runtime": runtime,
        "provenance": str(getattr(session, "provenance", runtime)),
        "load_s": load_s,
        "first_load_s": first_load_s,
        "prefill_tokens": P,
        "prefill_s": float(np.median(pre)),
        "prefill_tok_s": P / float(np.median(pre)),
        "decode_steps": steps,
        "decode_s": float(np.median(dec)),
        "decode_tok_s": steps / float(np.median(dec)),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_load_mb": rss_before,
        "pid": os.getpid(),
    }


def _run_worker(artifact_dir: Path, which: str, prompt_len: int, steps: int, repeats: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "exporter.bench", "--worker", str(artifact_dir), which,
        str(prompt_len), str(steps), str(repeats),
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeFailure(f"bench of {which} on {artifact_dir} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- entry points -----------------------------------------------------------------------------


def _artifact_dirs(path: Path) -> list[Path]:
    """One artifact directory, or every artifact of a build directory (its manifest.json)."""
    from core.errors import ArtifactError

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact directory not found: {path}")
    m = path / "manifest.json"
    if m.is_file() and not (path / "artifact.json").is_file():
        try:
            entries = json.loads(m.read_text())["artifacts"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ArtifactError(f"{m}: unreadable build manifest: {e}") from None
        dirs = [path / e["path"] for e in entries]
        if not dirs:
            raise ArtifactError(f"{m}: lists no artifacts")
        return dirs
    return [path]


def run_bench(
    artifact_dir: Path,
    json_out: Path | None = None,
    progress: Progress | None = None,
    prompt_len: int | None = None,
    steps: int = 32,
    repeats: int = 3,
    eager: bool = True,
) -> dict:
    """Benchmark the artifact's runtime (or every artifact of a build dir) and eager fp32, in one run.

    ``eager=False`` leaves eager out: a 9B's eager reference, upcasting its bf16 weights per call from a
    checkpoint larger than the page cache, decodes at tens of seconds a token and measures the disk.
    """
    from exporter.model.config import ModelConfig
    from core.artifact import read_artifact, verify_artifact

    arts = [read_artifact(d) for d in _artifact_dirs(Path(artifact_dir))]
    for a in arts:
        verify_artifact(a)  # timing a modified file would describe some other artifact
    config = ModelConfig.from_dict(arts[0].metadata["model"])
    for a in arts[1:]:
        if a.metadata["model"] != arts[0].metadata["model"]:
            from core.errors import ArtifactError

            raise ArtifactError(f"{a.dir}: a different model than {arts[0].dir}; bench one model per run")
    max_seq = config.shape.max_seq_len
    prompt_len = prompt_len or min(128, max_seq // 2)
    steps = max(1, min(steps, max_seq - prompt_len - 1))
    from targets import target_spec

    jobs = [(a, "artifact", target_spec(a.target).recipe(a.recipe).scheme, f"{a.target} {a.recipe}") for a in arts]
    if eager:
        jobs.append((arts[0], "eager", FLOAT32, "eager fp32"))
    elements = decoder_weight_elements(config)
    runs = []
    for i, (a, which, scheme, label) in enumerate(jobs):
        if progress:
            progress("bench", i, len(jobs))
        r = _run_worker(a.dir, which, prompt_len, steps, repeats)
        r.update(
            label=label,
            artifact=str(a.dir) if which == "artifact" else None,
            artifact_bytes=sum(f["bytes"] for f in a.info.get("files", {}).values()) if which == "artifact" else None,
            weight_bytes_per_token=int(elements * weight_bytes(scheme)),
            emulated="emulat" in r["provenance"].lower(),
        )
        runs.append(r)
    bandwidth = measure_bandwidth()  # after the workers: its buffers stay out of their RSS
    for r in runs:
        r["decode_bound_tok_s"] = bandwidth / r["weight_bytes_per_token"]
        r["decode_fraction_of_bound"] = r["decode_tok_s"] / r["decode_bound_tok_s"]
    if progress:
        progress("bench", len(jobs), len(jobs))
    result = {
        "schema": BENCH_SCHEMA,
        "schema_version": BENCH_SCHEMA_VERSION,
        "model": config.name,
        "host": {
            "cpu_count": os.cpu_count(),
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_method": "numpy copyto of 256 MiB, best of 5, read + write bytes counted",
        },
        "decoder_weight_elements": elements,
        "settings": {"prompt_len": prompt_len, "decode_steps": steps, "repeats": repeats, "statistic": "median"},
        "runtimes": runs,
        "notes": "bound = measured copy bandwidth / weight bytes per decoded token (decoder layers + norm + lm_head "
        "at the recipe's bytes per weight, scales not counted); each runtime measured in its own process",
    }
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def format_table(result: dict) -> str:
    cols = ("runtime", "load s", "1st load s", "prefill tok/s", "decode tok/s", "bound tok/s", "% bound", "peak RSS MiB", "size MiB", "numbers")
    rows = []
    for r in result["runtimes"]:
        size = r.get("artifact_bytes")
        rows.append(
            (
                r["label"],
                f"{r['load_s']:.2f}",
                f"{r.get('first_load_s', r['load_s']):.2f}",
                f"{r['prefill_tok_s']:.1f}",
                f"{r['decode_tok_s']:.1f}",
                f"{r['decode_bound_tok_s']:.0f}",
                f"{100 * r['decode_fraction_of_bound']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                "-" if size is None else f"{size / (1 << 20):.2f}",
                "emulated" if r["emulated"] else "real runtime",
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    h = result["host"]
    s = result["settings"]
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(
        f"prefill {s['prompt_len']} tokens, decode {s['decode_steps']} steps, median of {s['repeats']}; "
        f"copy bandwidth {h['copy_bandwidth_gb_s']:.1f} GB/s; {result['decoder_weight_elements']:,} decoder weights per token"
    )
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        res = _worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        print(json.dumps(res))
    else:
        print("internal worker: python -m exporter.bench --worker ARTIFACT_DIR artifact|eager PROMPT_LEN STEPS REPEATS", file=sys.stderr)
        sys.exit(2)
