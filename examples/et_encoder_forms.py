"""The 9B's vision encoder on ExecuTorch, from the eager modules vs from targets/executorch/encoders.py's forms.

    python examples/et_encoder_forms.py [--blocks 2] [--recipe fp32|8da4w] [--calls 10] [--threads 2]

Builds GLM-4.1V-9B's vision tower at its real width and image size (336 px: 576 patches, 1536 wide, 12 heads,
merger 4096 -> 13696) cut to ``--blocks`` blocks (the real one has 24), seeded random weights, no fusion (the 9B
preset has none). Exports its ``vision_encoder`` method twice, as the program's method: from
core.components.VisionEncoderMethod (the eager forms every other target exports) and from
targets.executorch.encoders.EtVisionEncoder (what the ExecuTorch target exports now); quantizes both alike
(``--recipe 8da4w``: torchao's 8da4w, group 32, as the target does), lowers each to XNNPACK and emits it.
Prints per form: XNNPACK subgraphs, portable kernel calls, export + lowering CPU seconds, the program's bytes,
then the two programs' call times in ExecuTorch's runtime (``--calls`` calls each, interleaved, median) and the
largest difference between their outputs and against the eager module.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--recipe", default="fp32", choices=("fp32", "8da4w"))
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from core.components import VisionEncoderMethod
    from core.recipes import Recipe
    from exporter.model import get_preset
    from exporter.model.vision import VisionEncoder
    from targets.executorch.encoders import EtVisionEncoder
    from targets.executorch.lower import lower, lowering_report, to_executorch
    from targets.executorch.program_io import read_partitions
    from targets.executorch.quantize import quantize_linears
    from targets.executorch.session import ExecuTorchSession
    from targets.executorch.spec import SPEC

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = get_preset("autoglm-phone-9b")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=args.blocks))
    visual = VisionEncoder(cfg.vision).eval()
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            elif "bias" in name:
                p.zero_()
    method = VisionEncoderMethod(types.SimpleNamespace(visual=visual, config=cfg, fusion=None)).eval()
    pixels = torch.randn(1, 3, cfg.shape.image_size, cfg.shape.image_size)
    with torch.no_grad():
        want = method(pixels).numpy()

    scheme = SPEC.recipe(args.recipe).scheme
    rows, sessions = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="et_encoder_forms_"))
    for form, build in (("eager forms", lambda: method), ("encoders.py forms", lambda: EtVisionEncoder(method))):
        module = build()
        cpu = time.process_time()
        if scheme.quantized:
            import copy

            module = copy.deepcopy(module)
            quantize_linears(module, scheme, Recipe(args.recipe).group_size, set())
        with torch.no_grad():
            ep = torch.export.export(module, (pixels,), strict=False)
        edge = lower({"vision_encoder": ep})
        report = lowering_report(edge, ["vision_encoder"])["vision_encoder"]
        pte = tmp / f"{form.split()[0]}.pte"
        program = to_executorch(edge)
        with open(pte, "wb") as f:
            program.write_to_file(f)
        cpu = time.process_time() - cpu
        parts = read_partitions(pte)["vision_encoder"]
        rows[form] = {"subgraphs": report["xnnpack_subgraphs"], "portable": sum(parts["kernel_calls"].values()),
                      "cpu_s": cpu, "bytes": pte.stat().st_size}
        sessions[form] = ExecuTorchSession(pte, args.recipe)
        print(f"{form}: {rows[form]}  portable: {dict(parts['kernel_calls'])}", flush=True)

    x = pixels.numpy()
    outs = {f: s.run("vision_encoder", pixels=x) for f, s in sessions.items()}
    times: dict[str, list[float]] = {f: [] for f in sessions}
    for _ in range(args.calls):
        for f, s in sessions.items():
            t = time.perf_counter()
            s.run("vision_encoder", pixels=x)
            times[f].append(time.perf_counter() - t)
    (a, b) = outs.values()
    print(f"\n9B vision tower, {args.blocks} of 24 blocks, {cfg.image_grid ** 2} patches -> {cfg.image_tokens} tokens, "
          f"{args.recipe}, {args.threads} threads, {args.calls} interleaved calls (median):")
    print("| form | XNNPACK subgraphs | portable kernel calls | export + lowering CPU s | program MB | call ms |")
    print("|---|---|---|---|---|---|")
    for f, r in rows.items():
        print(f"| {f} | {r['subgraphs']} | {r['portable']} | {r['cpu_s']:.1f} | {r['bytes'] / 1e6:.1f} "
              f"| {1e3 * float(np.median(times[f])):.1f} |")
    eager, ours = list(times)
    print(f"call time ratio (eager forms / encoders.py forms): {np.median(times[eager]) / np.median(times[ours]):.2f}x; "
          f"max |difference| between the programs {float(np.abs(a - b).max()):.2e}, "
          f"vs the eager module {float(np.abs(a - want).max()):.2e} / {float(np.abs(b - want).max()):.2e} "
          f"(output max |x| {float(np.abs(want).max()):.2f})")


if __name__ == "__main__":
    main()
