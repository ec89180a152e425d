"""How an ExecuTorch artifact's methods are partitioned: XNNPACK subgraphs and portable kernel calls per method.

    python examples/et_partitions.py ARTIFACT [ARTIFACT ...]      (an artifact directory or its model.pte)

Read from each .pte's own instruction chains (targets.executorch.program_io.read_partitions), so it works
on artifacts from any version of this tool. Prints, per method, the delegate calls by backend and the
kernel calls left on the portable path by op (``--ops`` lists them), the decoder's XNNPACK subgraphs per
layer, and the build's lowering / export wall times when artifact.json has them.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--ops", action="store_true", help="list the portable kernel calls per op")
    args = ap.parse_args()
    for a in args.artifacts:
        describe(a, args.ops)


if __name__ == "__main__":
    main()
