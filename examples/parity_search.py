"""Wall time and outcome of the --parity-target keep-float search: the one-pass attribution search
(calibration.sensitivity.search_keep_float) against the per-layer replay search it replaced
(layer_sensitivity + choose_keep_float), back to back on the same model and calibration set, both judged on
the same held-out calibration prompts (eager fake quantization, the scheme of ORT's int8-static: w8a8).

    PYTHONPATH=/work/smolpkg OMP_NUM_THREADS=1 python examples/parity_search.py --preset smollm2-135m \
        [--smooth 0.8] [--target 0.999] [--old-layers N]

--old-layers N times the old per-layer pass on its first N layers only and projects it to all of them
(said in the output); without it the old search runs whole.
"""

from __future__ import annotations

import argparse
import sys
import time


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress(stage: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        log(f"  {stage}: {done}/{total}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--target", type=float, default=0.999)
    ap.add_argument("--smooth", type=float, default=None)
    ap.add_argument("--old-layers", type=int, default=None)
    a = ap.parse_args()

    from calibration import sensitivity as S
    from core.components import build_components
    from exporter.export import calibration_data
    from exporter.model.upcast import float32_weights
    from exporter.pipeline import load_reference

    model = load_reference(a.preset, None, None)
    float32_weights(model)
    comps = build_components(model)
    calib = calibration_data(comps, None, progress)
    if a.smooth is not None:
        from calibration.smooth import smooth

        model, _ = smooth(comps, calib, a.smooth, progress)
        comps = build_components(model)
        calib = calibration_data(comps, None, progress)
    search, held = S.split_calls(calib, "text_decoder")
    base_search = S.evaluate(comps, calib, "text_decoder", search, (), "w8a8")
    base_held = S.evaluate(comps, calib, "text_decoder", held, (), "w8a8")
    log(f"every linear int8 (w8a8): worst cosine {base_search:.5f} search, {base_held:.5f} held-out")

    t = time.perf_counter()
    new = S.search_keep_float(comps, calib, a.target, progress=progress)
    t_new = time.perf_counter() - t
    log(new.summary())

    layers = S._linears(comps)
    t = time.perf_counter()
    if a.old_layers:  # time the per-layer pass on a prefix of the layers, project to all
        names = list(layers)[: a.old_layers]
        calls = S._calls(calib, "text_decoder")
        S._replay(comps, "text_decoder", calls)  # the float reference, as the old pass computes it
        for n in names:
            with S._quantizing([(n, layers[n][1])], calib, "w8a8"):
                S._replay(comps, "text_decoder", calls)
        per_layer = (time.perf_counter() - t) / len(names)
        t_old = per_layer * len(layers)
        old_keep = None
        old_note = f"projected from {len(names)} of {len(layers)} layers ({per_layer:.2f} s each); bisection not run"
    else:
        ranking = S.layer_sensitivity(comps, calib, progress)
        t_rank = time.perf_counter() - t
        old_keep = S.choose_keep_float(comps, calib, ranking, a.target, progress)
        t_old = time.perf_counter() - t
        old_note = f"sensitivity pass {t_rank:.0f} s + bisection {t_old - t_rank:.0f} s"

    print(f"\n{a.preset}{f' smoothed {a.smooth:g}' if a.smooth is not None else ''}, target cos={a.target:g}, "
          f"{len(layers)} linears, w8a8; search on {len(search)} prompts, held-out {len(held)} prompts; "
          f"every linear int8: worst cosine {base_search:.5f} / {base_held:.5f} held-out\n")
    print("| search | wall s | linears kept float | search cosine | held-out cosine | target held out | note |")
    print("|---|---|---|---|---|---|---|")
    print(f"| one pass + attribution (new) | {t_new:.0f} | {len(new.keep)} | {new.search_cosine['text_decoder']:.5f} | "
          f"{new.heldout_cosine.get('text_decoder', float('nan')):.5f} | {'yes' if new.met_on_heldout else 'MISSED'} | "
          f"{new.passes} passes |")
    if old_keep is not None:
        oc = S.evaluate(comps, calib, "text_decoder", search, old_keep, "w8a8")
        oh = S.evaluate(comps, calib, "text_decoder", held, old_keep, "w8a8")
        print(f"| per-layer replays (old) | {t_old:.0f} | {len(old_keep)} | {oc:.5f} | {oh:.5f} | "
              f"{'yes' if oh >= a.target else 'MISSED'} | {old_note}; fitted on its first {S.MAX_CALLS} calls |")
    else:
        print(f"| per-layer replays (old) | {t_old:.0f} (projected) | | | | | {old_note} |")
    print(f"\nratio old / new wall time: {t_old / t_new:.1f}x")


if __name__ == "__main__":
    main()
