#!/usr/bin/env bash
# The full GLM-4.1V-9B-shaped model through ONNX Runtime within 16 GiB (issue 16): make the checkpoint, export
# int4-weight (then int8-weight) with the streaming decoder, and measure wall time, peak RSS and bytes.
#
#   examples/export_9b.sh [WORK_DIR]        # default /work; needs ~20 GB for the checkpoint + ~15 GB per artifact
#
# One 9B process at a time (2 cores, 24 GiB here); each step is niced. Peak RSS is /usr/bin/time -v's
# "Maximum resident set size"; the export check's numbers are in each artifact.json (report.export_check).
set -euo pipefail

WORK=${1:-/work}
CKPT=$WORK/ckpt9b
OUT=$WORK/out16
LOGS=$WORK/logs16
RECIPES=${RECIPES:-"int4-weight int8-weight"}
mkdir -p "$OUT" "$LOGS"

timed() {  # timed LOG CMD...: run niced under /usr/bin/time -v, print wall time and peak RSS
    local log=$1
    shift
    nice /usr/bin/time -v "$@" >"$log" 2>&1 || { tail -20 "$log"; return 1; }
    awk -F': ' '/Elapsed \(wall clock\)/ {w=$2} /Maximum resident set size/ {r=$2}
        END {printf "  wall %s, peak RSS %.2f GiB\n", w, r / 1048576}' "$log"
}

if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
    echo "make-checkpoint (all 40 layers, 10.29B parameters, bf16, ~20 GB)"
    timed "$LOGS/make-checkpoint.log" autoglm-export make-checkpoint --preset autoglm-phone-9b --out "$CKPT"
fi

for recipe in $RECIPES; do
    art=$OUT/9b-$recipe
    rm -rf "$art"
    echo "export --target ort --recipe $recipe"
    timed "$LOGS/9b-$recipe.log" autoglm-export export --checkpoint "$CKPT" --target ort --recipe "$recipe" --out "$art"
    python - "$art" <<'EOF'
import json, sys
from pathlib import Path
art = Path(sys.argv[1])
info = json.loads((art / "artifact.json").read_text())
files = sum(p.stat().st_size for p in art.iterdir() if p.is_file())
print(f"  artifact {files / 2**30:.2f} GiB ({files} bytes); export {info['export']}")
check = info["report"]["export_check"]
for method, m in check.get("methods", {}).items():
    print(f"  {method}: cosine {m['cosine']:.5f}, relative L2 {m['relative_l2']:.4f}")
print(f"  check: {check.get('inputs', check.get('why'))}, {check.get('wall_s')} s")
EOF
    if [ "${BENCH:-1}" = 1 ]; then
        echo "generate --artifact"
        timed "$LOGS/9b-$recipe-generate.log" autoglm-export generate --artifact "$art" --prompt "Open the settings app" --max-new-tokens 8
        tail -3 "$LOGS/9b-$recipe-generate.log" | head -1
    fi
done
