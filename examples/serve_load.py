"""Load on `autoglm-export serve`: N concurrent streaming chat requests; TTFT and tokens/s under that load.

Starts the server as its own process (so the client's threads do not share its GIL), on a free port,
sends N requests at once (streamed, greedy, --max-tokens each), and reports per answered request the time
to first token and its decode rate, the aggregate rate, and how many were refused (429/503). Every request
must end one way or the other within --timeout: a hang or a lost request is an error (exit 1).

    python examples/serve_load.py                      # tiny reference, 50 requests, queue 8
    python examples/serve_load.py --queue-size 64      # every request queued, none refused
    python examples/serve_load.py --artifact DIR       # an exported artifact instead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import threading
import time

import httpx


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "cli", "serve", "--port", "0", "--queue-size", str(args.queue_size)]
    cmd += [args.artifact] if args.artifact else ["--preset", args.preset]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # "[label] serving 'name' at http://127.0.0.1:PORT/v1"
        m = re.search(r"serving '(.+)' at (http://\S+/v1)", line)
        if m:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start")
    else:
        raise SystemExit(f"server exited: {proc.wait()}")
    base = m.group(2)
    # keep reading the server's log (uvicorn's access lines), or a full pipe would stall the server
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while True:  # the line comes before uvicorn accepts connections
        try:
            httpx.get(f"{base}/models", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, m.group(1), base


async def one(client: httpx.AsyncClient, base: str, model: str, args, i: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}: open the settings and turn on Wi-Fi."}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "error": r.json()["error"]["code"], "wall_s": time.perf_counter() - t0}
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    if not done:
        raise RuntimeError(f"request {i}: stream ended without [DONE]")
    first = first or end
    decode_s = end - first
    return {"status": 200, "ttft_s": first - t0, "wall_s": end - t0, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / decode_s if decode_s > 0 and tokens > 1 else None}


async def load(base: str, model: str, args) -> list[dict]:
    limits = httpx.Limits(max_connections=args.requests + 10)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        return await asyncio.gather(*(one(client, base, model, args, i) for i in range(args.requests)))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it counts as hung")
    args = ap.parse_args()

    proc, model, base = start_server(args)
    try:
        t0 = time.perf_counter()
        results = asyncio.run(load(base, model, args))
        wall = time.perf_counter() - t0
        health = httpx.get(base.removesuffix("/v1") + "/health", timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    other = [r for r in results if r["status"] not in (200, 429, 503)]
    print(f"{model} at {base}: {args.requests} concurrent streamed requests, max_tokens {args.max_tokens}, "
          f"queue {args.queue_size}")
    print(f"answered {len(ok)}, refused {len(refused)} ({', '.join(sorted({r['error'] for r in refused})) or '-'}), "
          f"other {len(other)}, wall {wall:.2f} s")
    if ok:
        ttft = [r["ttft_s"] * 1000 for r in ok]
        rates = [r["decode_tok_s"] for r in ok if r["decode_tok_s"]]
        total = sum(r["tokens"] for r in ok)
        print(f"TTFT ms: p50 {pct(ttft, .5):.0f}, p90 {pct(ttft, .9):.0f}, max {max(ttft):.0f}")
        if rates:
            print(f"decode tok/s per request: median {statistics.median(rates):.0f} (min {min(rates):.0f})")
        print(f"aggregate: {total} tokens in {wall:.2f} s = {total / wall:.0f} tok/s")
    print(f"server: {health}")
    return 1 if other or len(ok) + len(refused) != args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
