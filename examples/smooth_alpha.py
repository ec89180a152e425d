"""Which SmoothQuant strength: every decoder linear int8 (w8a8: int8 per-channel weights, static per-tensor
int8 inputs with MinMax ranges, as ORT's int8-static), simulated in eager PyTorch on calibration prompts held
back from the scales (calibration.sensitivity.split_calls), for several alphas.

    PYTHONPATH=/work/smolpkg OMP_NUM_THREADS=1 python examples/smooth_alpha.py --preset smollm2-135m

One replay of the calibration set measures the per-channel input ranges; each alpha's smoothed ranges follow
from them exactly (calibration.smooth.smoothed_absmax), so an alpha costs only the held-out forward passes.
The real runtimes' numbers are examples/int8_drift.sh's.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--alphas", default="0,0.5,0.65,0.8,0.9")
    a = ap.parse_args()

    import torch

    from calibration import sensitivity as S
    from calibration.smooth import input_absmax, smooth_model, smoothed_absmax
    from core.components import build_components
    from exporter.export import calibration_data
    from exporter.model.upcast import float32_weights
    from exporter.pipeline import load_reference

    model = load_reference(a.preset, None, None)
    float32_weights(model)
    comps = build_components(model)
    calib = calibration_data(comps, None)
    xmax = input_absmax(comps, calib)
    search, held = S.split_calls(calib, "text_decoder")
    with torch.no_grad():
        refs = [S._unit_output(comps, "text_decoder", u) for u in held]
    print(f"{a.preset}: every decoder linear int8 (w8a8, MinMax static inputs), {len(held)} held-out calibration prompts "
          f"({sum(r.shape[0] for r in refs)} positions)\n")
    print("| alpha | worst-position cosine | mean cosine | top-1 agreement | largest input range / median channel (down_proj, worst layer) |")
    print("|---|---|---|---|---|")
    for alpha in [float(x) for x in a.alphas.split(",")]:
        scales: dict = {}
        m = smooth_model(model, xmax, alpha, scales)[0] if alpha > 0 else model
        sm = smoothed_absmax(xmax, scales)
        stats = dict(calib.activation_stats)  # lm_head's input is not smoothed
        stats.update({n: {"absmax": float(v.max()), "min": -float(v.max()), "max": float(v.max())} for n, v in sm.items()})
        c = build_components(m)
        view = type("Calib", (), {"activation_stats": stats, "method_inputs": calib.method_inputs})()
        layers = [(n, mod) for n, (meth, mod) in S._linears(c).items() if meth == "text_decoder"]
        cos, agree, rows = [], 0, 0
        with torch.no_grad():
            for ref, unit in zip(refs, held):
                with S._attributing(layers, view, "w8a8", record=False):
                    test = S._unit_output(c, "text_decoder", unit)
                cos.append(S._row_cosines(ref, test))
                agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
                rows += ref.shape[0]
        allc = torch.cat(cos)
        ratio = max(float(v.max() / v.median()) for n, v in sm.items() if n.endswith("down_proj"))
        print(f"| {'none (MinMax)' if alpha == 0 else f'{alpha:g}'} | {float(allc.min()):.4f} | {float(allc.mean()):.4f} | "
              f"{agree / rows:.4f} | {ratio:.0f} |", flush=True)
        print(f"alpha {alpha} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
