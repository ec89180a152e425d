"""How an ExecuTorch artifact's methods are partitioned: XNNPACK subgraphs and portable kernel calls per method.

    python examples/et_partitions.py ARTIFACT [ARTIFACT ...]      (an artifact directory or its model.pte)

Read from each .pte's own instruction chains (targets.executorch.program_io.read_partitions), so it works
on artifacts from any version of this tool. Prints, per method, the delegate calls by backend and the
kernel calls left on the portable path by op (``--ops`` lists them), the decoder's XNNPACK subgraphs per
layer, and the build's lowering / export wall times when artifact.json has them.

``--profile N`` also runs text_decoder with ExecuTorch's ETDump (a 16-token prefill, then N decode steps
of random embeddings) and prints where its time goes: per XNNPACK operator, per portable kernel, and
the delegate calls in total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets.executorch.program_io import read_partitions  # noqa: E402

CONSTANT_PREFIXES = ("get_", "use_", "enable_")  # the runner's constant methods (no instructions worth listing)


def describe(path: Path, ops: bool) -> None:
    pte = path / "model.pte" if path.is_dir() else path
    info_file = pte.parent / "artifact.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    layers = (info.get("metadata", {}).get("model", {}).get("text", {}) or {}).get("num_layers")
    print(f"{pte}  ({info.get('recipe', '?')}, {pte.stat().st_size / 1e6:.1f} MB"
          + (f", {layers} decoder layers" if layers else "") + ")")
    for m, r in read_partitions(pte).items():
        if m.startswith(CONSTANT_PREFIXES):
            continue
        xnn = r["delegate_calls"].get("XnnpackBackend", 0)
        kernels = sum(r["kernel_calls"].values())
        line = f"  {m:16s} XNNPACK subgraphs {xnn:4d}   portable kernel calls {kernels:4d}"
        if m == "text_decoder" and layers:
            line += f"   ({xnn / layers:.2f} subgraphs per layer)"
        print(line)
        if ops:
            for op, n in r["kernel_calls"].items():
                print(f"      {n:4d}  {op}")
    timings = info.get("report", {}).get("timings_s")
    if timings:
        print(f"  build timings (s): {timings}; export wall {info.get('export', {}).get('wall_s')} s")


def profile(pte: Path, steps: int, top: int = 20) -> None:
    """ETDump of the decoder over a 16-token prefill and ``steps`` decode calls: time per event name, largest
    first. Ours: ``text_decoder(embeds, cache_position)``; optimum-executorch's .pte (no artifact.json):
    ``forward(input_ids, cache_position)``, as its ``ExecuTorchModelForCausalLM`` calls it."""
    import collections
    import tempfile

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from targets.executorch.session import load_runtime_kernels

    load_runtime_kernels()
    module = _load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    gen = torch.Generator().manual_seed(0)
    if (pte.parent / "artifact.json").exists():
        method = "text_decoder"
        h = json.loads((pte.parent / "artifact.json").read_text())["programs"][method]["inputs"][0]["shape"][2]

        def call(n: int, start: int) -> None:
            module.run_method(method, (torch.randn(1, n, h, generator=gen) * 0.1, torch.arange(start, start + n)))
    else:
        method = "forward"

        def call(n: int, start: int) -> None:  # token ids well inside any vocabulary
            ids = torch.randint(100, 1000, (1, n), generator=gen)
            module.run_method(method, (ids, torch.arange(start, start + n)))
    call(16, 0)
    for i in range(steps):
        call(1, 16 + i)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "etdump.bin"
        module.write_etdump_result_to_file(str(dump))
        inspector = Inspector(etdump_path=str(dump))
    total: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for block in inspector.event_blocks:
        for ev in block.events:
            if ev.perf_data is not None:
                total[ev.name] += sum(ev.perf_data.raw)
                calls[ev.name] += len(ev.perf_data.raw)
    run = sum(t for n, t in total.items() if n == "Method::execute") or 1.0
    print(f"  ETDump, {method}: prefill 16 + {steps} decode calls, {run:.1f} ms in Method::execute")
    for name, t in total.most_common(top):
        if name.startswith(("Program::", "Method::init")):
            continue
        print(f"    {t:10.1f} ms  {100 * t / run:5.1f}%  {calls[name]:6d} calls  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--ops", action="store_true", help="list the portable kernel calls per op")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="ETDump text_decoder over N decode steps")
    args = ap.parse_args()
    for a in args.artifacts:
        describe(a, args.ops)
        if args.profile:
            profile(a / "model.pte" if a.is_dir() else a, args.profile)


if __name__ == "__main__":
    main()
