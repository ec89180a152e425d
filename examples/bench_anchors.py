"""Time examples/bench_anchors.sh's artifacts interleaved: ours, onnxruntime-genai builder's, optimum-executorch's.

    python examples/bench_anchors.py OUT [--rounds 3] [--new-tokens 64] [--threads 2] [--json FILE]
    python examples/bench_anchors.py --profile-genai GENAI_DIR     (which kernels genai's decoder runs, 2 threads)

OUT is bench_anchors.sh's output folder: ``ours-<target>-<recipe>/`` (this tool's artifacts), ``genai-<p>/``
(``python -m onnxruntime_genai.models.builder -p <p> -e cpu``), ``oe-<q>/model.pte`` (``optimum-cli export executorch
--recipe xnnpack --use_custom_sdpa --use_custom_kv_cache``) and ``hf-smollm2/`` (the transformers folder the anchors
were built from). Every present artifact, plus this tool's PyTorch eager fp32 reference, is timed in rounds: in each
round every artifact runs once, one process at a time (``/usr/bin/time -v python bench_anchors.py --worker ...``),
the order rotated by one from round to round, so that the load of this shared host falls on all of them alike.

A worker loads its artifact the way its own runner does (ours: ``targets.get_target(...).open``; genai:
``og.Model`` + ``og.Generator``; optimum-executorch: ``executorch.runtime``'s ``load_program`` + ``load_method("forward")``, called
with ``(input_ids, cache_position)`` as ``ExecuTorchModelForCausalLM.generate`` calls it), runs one untimed warm-up prefill, then a timed
prefill of the prompt and a timed greedy decode of ``--new-tokens`` tokens (the first comes from the prefill's logits,
each further one is one decoder call: decode tok/s = (new tokens - 1) / decode time). The eager reference runs in the first ``--eager-rounds`` rounds
only (1: its tokens do not change; it decodes at about 1 tok/s). End of sequence does not stop
any runtime (genai: ``min_length`` = ``max_length``). Threads: ``--threads`` for every runtime (onnxruntime
``intra_op_num_threads``, genai's decoder session options, ExecuTorch's threadpool, torch).

The prompt is one user turn rendered with SmolLM2's own chat template by this tool's runner; the script checks that
genai's tokenizer (``apply_chat_template`` + ``encode``) and the transformers tokenizer of hf-smollm2
(``apply_chat_template``) give the same ids, and feeds every runtime those ids.

Per artifact: size on disk (its folder), load s (imports done before), prefill and decode tok/s (median over
rounds), % of the memory-bandwidth bound (exporter.bench's: copy bandwidth measured after each round, median / the
decoder's weight bytes per token at the recipe's bytes per weight; an anchor takes the bytes per weight of our recipe
with the same precision), peak RSS (``/usr/bin/time -v``'s maximum resident set size of the worker process), greedy
match against the eager fp32 reference's tokens (tokens matched before the first divergence / new tokens, as
``parity``'s greedy_match).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# one user turn; rendered with SmolLM2's template (its default system turn included) it is 64 tokens
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle on the beach "
          "one stormy night. Describe what the message says and what he decides to do.")

# an anchor's precision -> our recipe with the same bytes per weight (for the bound) and the same precision
ANCHOR_SCHEME = {"genai-fp32": ("ort", "fp32"), "genai-int8": ("ort", "int8-weight"), "genai-int4": ("ort", "int4-weight"),
                 "oe-fp32": ("executorch", "fp32"), "oe-8da4w": ("executorch", "8da4w")}


# --- the worker (one artifact, one process) ------------------------------------------------------------------------


def _time_loop(prefill, step, first_token, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Timed prefill, then greedy decode: ``prefill(ids)`` -> logits of the last position, ``step(tok, pos)`` -> logits."""
    t = time.perf_counter()
    logits = prefill(ids)
    prefill_s = time.perf_counter() - t
    tok = first_token(logits)
    tokens = [tok]
    t = time.perf_counter()
    for k in range(new_tokens - 1):
        tok = int(np.argmax(step(tok, len(ids) + k)))
        tokens.append(tok)
    return prefill_s, time.perf_counter() - t, tokens


def _ours(path: Path, ids: list[int], new_tokens: int, threads: int, eager: bool) -> dict:
    from core.artifact import read_artifact
    from exporter.model.config import ModelConfig

    art = read_artifact(path)
    config = ModelConfig.from_dict(art.metadata["model"])
    if eager:
        import torch

        torch.set_num_threads(threads)
        from core.components import build_components
        from core.runner import EagerSession
        from exporter.parity.run import reference_model

        load = lambda: EagerSession(build_components(reference_model(art, config)))  # noqa: E731
    else:
        from targets import get_target

        if art.target == "ort":
            import onnxruntime as ort

            base = ort.SessionOptions

            class Options(base):  # the target session's own options, with the thread count set
                def __init__(self) -> None:
                    super().__init__()
                    self.intra_op_num_threads = threads

            ort.SessionOptions = Options
        elif art.target == "executorch":
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            import targets.executorch.session as ets

            ets.load_runtime_kernels()
            _unsafe_reset_threadpool(threads)
        target = get_target(art.target)
        load = lambda: target.open(art)  # noqa: E731
    t = time.perf_counter()
    session = load()
    load_s = time.perf_counter() - t

    def run(tokens: list[int], start: int) -> np.ndarray:
        emb = session.run("token_embedding", tokens=np.asarray([tokens], dtype=np.int64))
        pos = np.arange(start, start + len(tokens), dtype=np.int64)
        out = session.run("text_decoder", embeds=emb, position_ids=np.stack([pos, pos, pos]), cache_position=pos)
        return out.reshape(len(tokens), -1)[-1]

    def prefill(p: list[int]) -> np.ndarray:
        session.reset()
        return run(p, 0)

    prefill(ids)  # warm-up
    run([ids[-1]], len(ids))
    prefill_s, decode_s, tokens = _time_loop(prefill, lambda tok, pos: run([tok], pos), lambda lg: int(np.argmax(lg)),
                                             ids, new_tokens)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens,
            "runtime": str(getattr(session, "provenance", ""))}


def _genai(path: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    t = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t
    tok = og.Tokenizer(model)
    text = tok.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True)
    genai_ids = [int(i) for i in tok.encode(text)]
    n = len(ids) + new_tokens
    state = {}

    def prefill(p: list[int]) -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        state["gen"] = gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(p, dtype=np.int32))  # runs the prompt: the logits of its last position
        return None

    def next_token() -> int:  # picks from the current logits; from the 2nd call on it first runs the last token
        gen = state["gen"]
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    prefill(ids)  # warm-up
    next_token(), next_token()
    t = time.perf_counter()
    prefill(ids)
    prefill_s = time.perf_counter() - t
    tokens = [next_token()]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens.append(next_token())
    decode_s = time.perf_counter() - t
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens, "ids_seen": genai_ids,
            "runtime": f"onnxruntime-genai {og.__version__}"}


def _optimum_executorch(path: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    import torch
    from executorch import version as et_version
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (llama::custom_sdpa, update_cache)
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.kernels import quantized  # noqa: F401 (as optimum.executorch.modeling imports it)
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)
    t = time.perf_counter()
    # load the program and its forward method now (XNNPACK packs the weights here), as our session does at open
    method = Runtime.get().load_program(path / "model.pte").load_method("forward")
    load_s = time.perf_counter() - t

    def forward(p: list[int], start: int) -> np.ndarray:  # ExecuTorchModelForCausalLM.forward((input_ids, cache_position))
        logits = method.execute((torch.tensor([p], dtype=torch.long), torch.arange(start, start + len(p), dtype=torch.long)))[0]
        return logits.reshape(-1, logits.shape[-1])[-1].float().numpy()

    forward(ids, 0)  # warm-up
    forward([ids[-1]], len(ids))
    prefill_s, decode_s, tokens = _time_loop(lambda p: forward(p, 0), lambda tok, pos: forward([tok], pos),
                                             lambda lg: int(np.argmax(lg)), ids, new_tokens)
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens,
            "runtime": f"ExecuTorch {et_version.__version__} runtime (optimum-executorch's generate loop)"}


def worker(kind: str, path: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    if kind in ("ours", "eager"):
        return _ours(path, ids, new_tokens, threads, eager=kind == "eager")
    if kind == "genai":
        return _genai(path, ids, new_tokens, threads)
    if kind == "oe":
        return _optimum_executorch(path, ids, new_tokens, threads)
    raise SystemExit(f"unknown worker kind {kind}")


# --- the parent ----------------------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """The folder's files; in our ORT folders the .onnx ones only (the runtime here reads those; the .ort copies
    beside them are the phone's)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "parity" not in f.parts and f.suffix != ".ort")


def discover(out: Path) -> tuple[list[dict], list[dict]]:
    """The artifacts to time, and the rows that are listed without timing (with why)."""
    from targets import target_spec

    items, untimed = [], []
    ours = sorted(p for p in out.glob("ours-*") if (p / "artifact.json").is_file())
    for p in ours:
        info = json.loads((p / "artifact.json").read_text())
        t, r = info["target"], info["recipe"]
        floor = (info.get("report", {}).get("export_check", {}) or {}).get("floor_set_by_user")
        name = f"ours {t} {r}" + ("" if p.name == f"ours-{t}-{r}" else f" ({p.name})")  # a second folder of a recipe
        items.append({"name": name, "kind": "ours", "path": p, "scheme": target_spec(t).recipe(r).scheme,
                      "precision": (t, r), "floor": floor})
    for tr in ("executorch/fp32", "executorch/int8-weight", "executorch/8da4w", "executorch/int8-static",
               "ort/fp32", "ort/int8-weight", "ort/int8-static", "ort/int4-weight"):
        if not any(i["precision"] == tuple(tr.split("/")) for i in items):
            log = out / "logs" / f"ours-{tr.replace('/', '-')}.log"
            why = _last_error(log) if log.is_file() else "not exported"
            untimed.append({"name": f"ours {tr.replace('/', ' ')}", "why": f"no artifact: {why}"})
    untimed.append({"name": "ours coreml (fp16, int8-weight, int8-static, int4-weight)",
                    "why": "not timed: Core ML programs execute only on macOS / iOS (this host is Linux; the MIL "
                           "interpreter the export check uses on Linux is NumPy, not a runtime to time)"})
    for name, (t, r) in ANCHOR_SCHEME.items():
        p = out / name
        present = (p / "genai_config.json").is_file() if name.startswith("genai") else (p / "model.pte").is_file()
        label = f"onnxruntime-genai builder -p {name[6:]}" if name.startswith("genai") else f"optimum-executorch {name[3:]}"
        if present:
            built = p / "BUILT_WITH.txt"
            if built.is_file():
                label += f" ({built.read_text().strip()})"
            items.append({"name": label, "kind": name.split("-")[0], "path": p, "scheme": target_spec(t).recipe(r).scheme,
                          "precision": (t, r), "floor": None})
        else:
            log = out / "logs" / f"{name}.log"
            why = _last_error(log) if log.is_file() else "not built"
            inst = out / "oe-install.txt"
            if name.startswith("oe") and inst.is_file() and "does not import" in inst.read_text():
                why = inst.read_text().strip().splitlines()[-1]
            untimed.append({"name": label, "why": why})
    if ours:
        fp32 = next((i["path"] for i in items if i["kind"] == "ours" and i["precision"][1] == "fp32"), ours[0])
        from core.recipes import FLOAT32

        items.insert(0, {"name": "eager fp32 (reference)", "kind": "eager", "path": fp32, "scheme": FLOAT32,
                         "precision": ("eager", "fp32"), "floor": None})
    return items, untimed


def build_cpu(out: Path, path: Path) -> tuple[float, float] | None:
    """The build's CPU seconds (user + sys) and wall seconds, from /usr/bin/time -v in OUT/logs/<folder>.log."""
    log = out / "logs" / f"{path.name}.log"
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    sys_ = re.search(r"System time \(seconds\): ([\d.]+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if not (user and sys_ and wall):
        return None
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return float(user.group(1)) + float(sys_.group(1)), secs


def install_notes(out: Path) -> list[str]:
    """What bench_anchors.sh said about installing and running optimum-executorch under the pins."""
    notes = []
    inst = out / "oe-install.txt"
    if inst.is_file():
        notes.append(" ".join(inst.read_text().split()))
    for log in sorted((out / "logs").glob("oe-*.pinned.log")):
        notes.append(f"optimum-cli export under the pinned packages ({log.name[:-11]}) failed: {_first_exception(log)}")
    return notes


def _first_exception(log: Path) -> str:
    """A traceback's first exception line (in a chain, the cause)."""
    for ln in log.read_text(errors="replace").splitlines():
        if re.match(r"[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln.strip()[:300]
    return _last_error(log)


def _last_error(log: Path) -> str:
    text = log.read_text(errors="replace")
    if "Exit status:" not in text:  # /usr/bin/time -v writes it when the build ends
        return "its build did not finish (still running, or stopped)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.search(r"error|rejected|refus", ln, re.I) and "is ignored" not in ln]
    return (hits or lines or ["empty log"])[-1][:300]


def prompt_ids(out: Path, items: list[dict]) -> tuple[list[int], dict]:
    """Our runner's ids of the prompt, and the transformers tokenizer's (hf-smollm2) for the check."""
    from core.artifact import read_artifact
    from core.runner import Prompt, Runner, load_tokenizer
    from exporter.model.config import ModelConfig

    art = read_artifact(next(i["path"] for i in items if i["kind"] == "ours"))
    config = ModelConfig.from_dict(art.metadata["model"])
    runner = Runner(None, config, load_tokenizer(config, art.dir / "tokenizer.json"))
    ids = runner.prompt_ids(Prompt(PROMPT))
    checks = {}
    hf = out / "hf-smollm2"
    if hf.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf)
        hf_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
        hf_ids = list(hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids)
        checks["transformers (hf-smollm2, optimum-executorch's tokenizer)"] = [int(i) for i in hf_ids] == ids
    return ids, checks


def run_worker(item: dict, ids: list[int], new_tokens: int, threads: int) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), "--worker", item["kind"],
           str(item["path"]), json.dumps(ids), str(new_tokens), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not results:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("\t")]
        errs = [ln for ln in lines if re.search(r"error|exception", ln, re.I)]
        return {"error": ((errs or lines or ["no output"])[-1])[:300], "rc": proc.returncode}
    r = json.loads(results[-1])
    r["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else None
    return r


def greedy_match(tokens: list[int], ref: list[int]) -> float:
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n / max(len(ref), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager-rounds", type=int, default=1,
                    help="rounds that run the eager reference (its tokens are the same every round; it is slow)")
    ap.add_argument("--json", type=Path, default=None, help="default OUT/anchors.json")
    args = ap.parse_args()
    from exporter.bench import decoder_weight_elements, measure_bandwidth, weight_bytes
    from core.artifact import read_artifact
    from exporter.model.config import ModelConfig

    out = args.out.resolve()
    items, untimed = discover(out)
    if not items:
        raise SystemExit(f"{out}: no artifact to time (run examples/bench_anchors.sh first)")
    ids, checks = prompt_ids(out, items)
    config = ModelConfig.from_dict(read_artifact(next(i["path"] for i in items if i["kind"] == "ours")).metadata["model"])
    elements = decoder_weight_elements(config)
    print(f"prompt: {len(ids)} tokens (SmolLM2's chat template); {args.new_tokens} new tokens; {args.threads} threads; "
          f"{args.rounds} rounds over {len(items)} artifacts", flush=True)
    loads = [{"when": "start", "loadavg": open("/proc/loadavg").read().split()[:3]}]
    runs: dict[str, list[dict]] = {i["name"]: [] for i in items}
    bandwidths = []
    for rnd in range(args.rounds):
        order = items[rnd % len(items):] + items[: rnd % len(items)]
        for item in order:
            if item["kind"] == "eager" and rnd >= args.eager_rounds:
                continue
            r = run_worker(item, ids, args.new_tokens, args.threads)
            runs[item["name"]].append(r)
            msg = r.get("error") or (f"load {r['load_s']:.2f} s, prefill {len(ids) / r['prefill_s']:.1f} tok/s, decode "
                                     f"{(args.new_tokens - 1) / r['decode_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MiB")
            print(f"  round {rnd + 1} {item['name']}: {msg}", flush=True)
        bandwidths.append(measure_bandwidth())
        loads.append({"when": f"after round {rnd + 1}", "loadavg": open("/proc/loadavg").read().split()[:3]})
        print(f"round {rnd + 1} done: copy bandwidth {bandwidths[-1] / 1e9:.1f} GB/s, load average {' '.join(loads[-1]['loadavg'])}",
              flush=True)
    bandwidth = float(np.median(bandwidths))
    ref = next((r["tokens"] for r in runs.get("eager fp32 (reference)", []) if "tokens" in r), None)
    rows = []
    for item in items:
        ok = [r for r in runs[item["name"]] if "error" not in r]
        eager = item["kind"] == "eager"
        row = {"name": item["name"], "path": str(item["path"]), "size_bytes": None if eager else dir_bytes(item["path"]),
               "build_cpu_wall_s": None if eager else build_cpu(out, item["path"]),
               "floor": item["floor"], "runs": runs[item["name"]]}
        if ok:
            bound = bandwidth / (elements * weight_bytes(item["scheme"]))
            decode = float(np.median([(args.new_tokens - 1) / r["decode_s"] for r in ok]))
            tok_sets = {tuple(r["tokens"]) for r in ok}
            row.update(
                runtime=ok[0]["runtime"], load_s=float(np.median([r["load_s"] for r in ok])),
                prefill_tok_s=float(np.median([len(ids) / r["prefill_s"] for r in ok])), decode_tok_s=decode,
                bound_tok_s=bound, fraction_of_bound=decode / bound,
                peak_rss_mb=float(np.median([r["peak_rss_mb"] for r in ok if r["peak_rss_mb"]])),
                greedy_match=greedy_match(ok[0]["tokens"], ref) if ref else None,
                deterministic=len(tok_sets) == 1, timed_rounds=len(ok),
            )
            if "ids_seen" in ok[0]:
                checks[f"onnxruntime-genai tokenizer ({item['name']})"] = ok[0]["ids_seen"] == ids
        else:
            row["error"] = runs[item["name"]][0]["error"] if runs[item["name"]] else "not run"
        rows.append(row)
    result = {"prompt": PROMPT, "prompt_ids": ids, "new_tokens": args.new_tokens, "threads": args.threads,
              "rounds": args.rounds, "eager_rounds": min(args.eager_rounds, args.rounds), "copy_bandwidth_gb_s": [b / 1e9 for b in bandwidths],
              "decoder_weight_elements": elements, "loadavg": loads, "tokenizer_checks": checks,
              "reference_tokens": ref, "rows": rows, "untimed": untimed, "notes": install_notes(out)}
    (args.json or out / "anchors.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = format_table(result)
    (out / "anchors.md").write_text(table + "\n")
    print(table)


def format_table(result: dict) -> str:
    lines = ["| artifact | size MiB | load s | prefill tok/s | decode tok/s | bound tok/s | % of bound | peak RSS MiB | greedy match "
             "| build CPU s (wall s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        name = r["name"] + (f" (`--check-floor {r['floor']['floor_cosine']}`)" if r.get("floor") else "")
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / (1 << 20):.1f}"
        b = r.get("build_cpu_wall_s")
        build = "-" if not b else f"{b[0]:.0f} ({b[1]:.0f})"
        if "error" in r:
            lines.append(f"| {name} | {size} | failed: {r['error']} | | | | | | | {build} |")
            continue
        gm = "-" if r["greedy_match"] is None else f"{r['greedy_match']:.2f}"
        if not r["deterministic"]:
            gm += " (tokens differ between rounds)"
        lines.append(f"| {name} | {size} | {r['load_s']:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['bound_tok_s']:.0f} | {100 * r['fraction_of_bound']:.0f} | {r['peak_rss_mb']:.0f} | {gm} | {build} |")
    for u in result["untimed"]:
        lines.append(f"| {u['name']} | {u['why']} | | | | | | | | |")
    bw = result["copy_bandwidth_gb_s"]
    la = "; ".join(f"{x['when']} {' '.join(x['loadavg'])}" for x in result["loadavg"])
    checks = ", ".join(f"{k}: {'same ids' if v else 'DIFFERENT ids'}" for k, v in result["tokenizer_checks"].items())
    lines += ["", f"Prompt {len(result['prompt_ids'])} tokens, {result['new_tokens']} new tokens greedy, {result['threads']} "
              f"threads, median of {result['rounds']} interleaved rounds (eager: {result['eager_rounds']}); copy bandwidth per round "
              f"{', '.join(f'{b:.1f}' for b in bw)} GB/s (bound uses the median); "
              f"{result['decoder_weight_elements']:,} decoder weights per token. Size: the folder (ours ORT: its .onnx files, "
              f"not the .ort copies). Build: /usr/bin/time -v of the export (ours: with its export check), under nice 19 "
              f"on the shared host. Load average: {la}. "
              f"Prompt ids vs ours: {checks or 'not checked'}."]
    lines += [f"{n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def profile_genai(path: Path, steps: int, threads: int) -> None:
    """onnxruntime's profiler inside onnxruntime-genai (its decoder session options): the kernels of ``steps`` decode
    calls after the prompt's prefill, read with examples/ort_profile.py's parser (the prefill, its first run, dropped)."""
    import tempfile

    import onnxruntime_genai as og

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ort_profile import _steady_state

    with tempfile.TemporaryDirectory() as tmp:
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "enable_profiling": str(Path(tmp) / "genai")}}}}))
        model = og.Model(config)
        tok = og.Tokenizer(model)
        ids = tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + steps + 1, min_length=len(ids) + steps + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        for _ in range(steps + 1):
            gen.generate_next_token()
        del gen, params, tok, model  # the session writes its profile when it closes
        import gc

        gc.collect()
        profile = max(Path(tmp).glob("genai*.json"), key=lambda f: f.stat().st_mtime)
        per_op, nodes, runs = _steady_state(profile)
    total = sum(per_op.values())
    print(f"{path}: {runs} decode calls profiled, kernel time {total / 1e3 / max(runs, 1):.2f} ms per call")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:32s} {100 * us / total:5.1f}%  {len(nodes[op]):4d} nodes")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--profile-genai":
        profile_genai(Path(sys.argv[2]), steps=20, threads=2)
        sys.exit(0)
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        res = worker(sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        print(json.dumps(res))
    else:
        main()
