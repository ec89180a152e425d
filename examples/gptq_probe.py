"""GPTQ-style int8 rounding vs round-to-nearest, in eager PyTorch on calibration prompts held back from the
Hessians: every decoder linear but lm_head int8 per channel (float inputs: the int8-weight recipe on ORT and
Core ML), top-1 agreement and cosines against float.

    PYTHONPATH=/work/smolpkg OMP_NUM_THREADS=1 python examples/gptq_probe.py --preset smollm2-135m
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    a = ap.parse_args()

    import torch
    from torch import nn

    from calibration import sensitivity as S
    from calibration.gptq import round_weights
    from core.components import build_components
    from exporter.export import calibration_data
    from exporter.model.upcast import float32_weights
    from exporter.pipeline import load_reference

    model = load_reference(a.preset, None, None)
    float32_weights(model)
    comps = build_components(model)
    calib = calibration_data(comps, None)
    search, held = S.split_calls(calib, "text_decoder")
    fit = {"text_decoder": [c for u in search for c in u]}  # Hessians from the search prompts only
    rounded, record = round_weights(comps, fit)
    names = [n for n, m in model.named_modules() if n.startswith("text.layers.") and isinstance(m, nn.Linear)]
    with torch.no_grad():
        refs = [S._unit_output(comps, "text_decoder", u) for u in held]
    print(f"{a.preset}: {len(names)} decoder linears int8 per channel, float inputs; {len(held)} held-out prompts; "
          f"GPTQ/RTN layer output error on its calibration inputs, median {record['output_error_vs_rtn_median']}\n")
    print("| rounding | worst-position cosine | mean cosine | top-1 agreement |")
    print("|---|---|---|---|")
    for label, m in (("round to nearest", model), ("GPTQ", rounded)):
        c = build_components(m)
        mods = dict(m.named_modules())
        layers = [(n, mods[n]) for n in names]
        cos, agree, rows = [], 0, 0
        with torch.no_grad():
            for ref, unit in zip(refs, held):
                with S._attributing(layers, calib, "w8", record=False):  # RTN of GPTQ's grid weights is exact
                    test = S._unit_output(c, "text_decoder", unit)
                cos.append(S._row_cosines(ref, test))
                agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
                rows += ref.shape[0]
        allc = torch.cat(cos)
        print(f"| {label} | {float(allc.min()):.5f} | {float(allc.mean()):.5f} | {agree / rows:.4f} |", flush=True)


if __name__ == "__main__":
    main()
