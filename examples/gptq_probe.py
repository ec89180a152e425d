"""GPTQ-style int8 rounding vs round-to-nearest, in eager PyTorch on calibration prompts held back from the
Hessians: every decoder linear but lm_head int8 per channel (float inputs: the int8-weight recipe on ORT and
Core ML), top-1 agreement and cosines against float.

    PYTHONPATH=/work/smolpkg OMP_NUM_THREADS=1 python examples/gptq_probe.py --preset smollm2-135m [--judge-on M]

--act-block N also rounds every decoder linear's input to int8 in blocks of N (symmetric, block max / 127), as
onnxruntime's MatMulNBits at accuracy_level 4 (its CPU EP's default for int8 weights) does at run time.

--judge-on MANIFEST judges on that manifest's prompts instead (e.g. calibration/data/heldout.jsonl, the prompts
`parity` uses), every calibration prompt then fitting the Hessians unless --fit-search-only.
"""

from __future__ import annotations

import argparse
import contextlib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--judge-on", default=None, help="judge on this manifest's prompts (default: held-back calibration prompts)")
    ap.add_argument("--act-block", type=int, default=0, help="int8 inputs in blocks of N (ORT accuracy_level 4)")
    ap.add_argument("--smooth", type=float, default=None, help="SmoothQuant the decoder first (calibration/smooth.py)")
    ap.add_argument("--int8-table", action="store_true",
                    help="also the runtime's int8 (per row) embedding rows and lm_head (round to nearest in both rows)")
    ap.add_argument("--fit-search-only", action="store_true", help="with --judge-on: Hessians from the search prompts only")
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
    if a.judge_on:
        if not a.fit_search_only:
            fit = {"text_decoder": list(calib.method_inputs["text_decoder"])}
        held = S._prompts(calibration_data(comps, a.judge_on).method_inputs["text_decoder"])
    with torch.no_grad():
        refs = [S._unit_output(comps, "text_decoder", u) for u in held]
    if a.smooth is not None:  # fp32 outputs unchanged; the inputs the weights and int8 blocks see are not
        from calibration.smooth import smooth

        model, _ = smooth(comps, calib, a.smooth)
        comps = build_components(model)
    rounded, record = round_weights(comps, fit)
    names = [n for n, m in model.named_modules() if n.startswith("text.layers.") and isinstance(m, nn.Linear)]
    if a.int8_table:  # int8-weight on every target quantizes lm_head (SmolLM2: the tied table) and the table's rows
        names.append("text.lm_head")
        held_q = [[{**c, "embeds": _rows_int8(c["embeds"])} for c in u] for u in held]
    else:
        held_q = held
    print(f"{a.preset}: {len(names)} decoder linears int8 per channel, float inputs; {len(held)} judged prompts ({a.judge_on or 'held back from the calibration set'}), "
          f"Hessians from {len(fit['text_decoder'])} decoder calls; smooth {a.smooth}; int8 input blocks {a.act_block or 'no'}; int8 table and lm_head {a.int8_table}; "
          f"GPTQ/RTN layer output error on its calibration inputs, median {record['output_error_vs_rtn_median']}\n")
    print("| rounding | worst-position cosine | mean cosine | top-1 agreement |")
    print("|---|---|---|---|")
    runs = [("round to nearest", model, True), ("GPTQ", rounded, True)]
    if a.act_block:
        runs.append(("float weights (int8 inputs only)", model, False))
    for label, m, quantized in runs:
        c = build_components(m)
        mods = dict(m.named_modules())
        layers = [(n, mods[n]) for n in names]
        cos, agree, rows = [], 0, 0
        hooks = [mods[n].register_forward_pre_hook(_block_int8(a.act_block)) for n in names] if a.act_block else []
        with torch.no_grad():
            for ref, unit in zip(refs, held_q):
                weights = S._attributing(layers, calib, "w8", record=False) if quantized else contextlib.nullcontext()
                with weights:  # RTN of GPTQ's grid weights is exact
                    test = S._unit_output(c, "text_decoder", unit)
                cos.append(S._row_cosines(ref, test))
                agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
                rows += ref.shape[0]
        for h in hooks:
            h.remove()
        allc = torch.cat(cos)
        print(f"| {label} | {float(allc.min()):.5f} | {float(allc.mean()):.5f} | {agree / rows:.4f} |", flush=True)


def _rows_int8(x):
    """Each embedding row on its own symmetric int8 grid (as the int8 table's rows are: per-row scale)."""
    import torch

    from calibration.sensitivity import _fq_weight  # symmetric int8 per row of a 2-D tensor

    return _fq_weight(torch.from_numpy(x.reshape(-1, x.shape[-1]))).numpy().reshape(x.shape)


def _block_int8(n: int):
    """A forward pre-hook rounding the input to symmetric int8 in blocks of n along its last dim."""
    from calibration.sensitivity import _fq_weight  # each block a row of its own

    def pre(_m, args):
        x = args[0]
        return (_fq_weight(x.reshape(-1, n)).reshape(x.shape),) + tuple(args[1:])

    return pre


if __name__ == "__main__":
    main()
