#!/usr/bin/env bash
# The full GLM-4.1V-9B-shaped model through ONNX Runtime on a 24 GiB machine (issue 16): make the checkpoint,
# then per recipe export (streaming decoder + the export check), generate, bench and parity, each under
# /usr/bin/time -v; prints one table row per recipe (the README's "Exporting the 9B" table).
#
#   examples/export_9b.sh [WORK_DIR]        # default /work; needs ~20 GB for the checkpoint + ~6-12 GB per artifact
#   RECIPES="int4-weight" STEPS=4 examples/export_9b.sh /work
#   BLOCKWISE=1 ... parity also compares each decoder layer and vision block (parity --blockwise, ort only)
#   TARGET=coreml RECIPES=int4-weight examples/export_9b.sh /work   # Core ML: the decoder in chunk packages; no bench
#     (Core ML cannot execute on Linux: generate and parity run the packages in the NumPy MIL interpreter, whose
#     speed says nothing about a phone's)
#   TARGET=executorch RECIPES=8da4w examples/export_9b.sh /work   # ExecuTorch: the decoder lowered piece by piece
#   GENERATE=0 ... leaves generate out
#
# One 9B process at a time. Peak RSS is /usr/bin/time -v's "Maximum resident set size". Parity runs the eager
# reference first and the artifact after (never both resident) on examples/heldout-9b.jsonl (two held-out prompts,
# one with an image and speech), STEPS greedy tokens each; bench leaves eager out (--no-eager: a bf16 9B upcast
# per call from a checkpoint larger than the page cache measures the disk, not PyTorch).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-/work}
CKPT=$WORK/ckpt9b
OUT=$WORK/out16
ROOT=$WORK/logs16
TARGET=${TARGET:-ort}
RECIPES=${RECIPES:-"int4-weight int8-weight"}
STEPS=${STEPS:-4}
GENERATE=${GENERATE:-1}   # GENERATE=0 leaves generate out (e.g. a row whose generate was measured before)
# per-recipe export options: on make-checkpoint's random weights 4 bits miss the int4-weight gate (decoder cosine
# ~0.78 by examples/quant_depth_probe.py, vision 0.883 on a 2-layer cut, floor 0.96): the rounding noise of
# untrained layers adds up over 40 layers. The rehearsal accepts that drift with --check-floor 0.5, low enough for
# random weights and still far above a broken 4-bit program (cosine 0.04); parity then reports the drift.
# Trained weights should not need it (override: ARGS_int4_weight="").
ARGS_int4_weight=${ARGS_int4_weight---check-floor 0.5}
ARGS_8da4w=${ARGS_8da4w---check-floor 0.5}  # ExecuTorch's 4-bit recipe: the same reason
# int8-weight as 8-bit MatMulNBits in blocks of 128: onnxruntime opens the per-channel DequantizeLinear form by fusing
# it into block-32 MatMulNBits, holding 15.6 GiB of sessions for the 9B (above the 16 GiB target with the rest);
# written directly at block 128 the sessions hold ~1.1x the int8 bytes (examples/ort_session_memory.py).
# The per-channel default: ARGS_int8_weight="".
ARGS_int8_weight=${ARGS_int8_weight---group-size 128}  # (ort; TARGET=executorch / coreml: ARGS_int8_weight="")
mkdir -p "$OUT" "$ROOT"
# shellcheck source=examples/measure.sh
. "$HERE/measure.sh"

if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
    measure make-checkpoint autoglm-export make-checkpoint --preset autoglm-phone-9b --out "$CKPT"
fi

# artifact and log names: 9b-RECIPE for ort (the first rows), 9b-TARGET-RECIPE for the others
prefix=9b-; [ "$TARGET" = ort ] || prefix=9b-$TARGET-
for recipe in $RECIPES; do
    name=$prefix$recipe
    art=$OUT/$name
    if [ ! -f "$art/artifact.json" ]; then
        rm -rf "$art"
        args="ARGS_${recipe//-/_}"
        # shellcheck disable=SC2086  # the options are words
        measure "$name" autoglm-export export --checkpoint "$CKPT" --target "$TARGET" --recipe "$recipe" --out "$art" ${!args:-}
    fi
    [ -f "$art/artifact.json" ] || { echo "export $recipe failed: see $ROOT/$name.log"; continue; }
    if [ "$GENERATE" != 0 ]; then
        MEASURE_LINES='^(error|tokens|text)' measure "$name-generate" \
            autoglm-export generate --artifact "$art" --prompt "Open the settings app" --max-new-tokens 8
    fi
    if [ "$TARGET" != coreml ]; then
        measure "$name-bench" autoglm-export bench "$art" --no-eager --prompt-len 64 --steps 16 --repeats 1 \
            --json "$ROOT/$name-bench.json"
    fi
    rm -rf "$ROOT/$name-parity"
    # shellcheck disable=SC2086  # BLOCKWISE=1 adds --blockwise: every decoder layer and vision block on its own
    measure "$name-parity" autoglm-export parity "$art" --inputs "$HERE/heldout-9b.jsonl" --steps "$STEPS" \
        --out "$ROOT/$name-parity" ${BLOCKWISE:+--blockwise}
done

python - "$OUT" "$ROOT" "$TARGET" "$prefix" $RECIPES <<'EOF'
import json, re, sys
from pathlib import Path

out, root, target, prefix, recipes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]

def timed(name):
    try:
        log = (root / f"{name}.log").read_text()
    except OSError:
        return None, None
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", log)
    secs = None
    if wall:
        parts = [float(x) for x in wall.group(1).split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return secs, (int(rss.group(1)) / 2**20 if rss else None)

def f(x, fmt):
    return "-" if x is None else format(x, fmt)

print("| target | recipe | export wall | export peak RSS | artifact | export check cosine (decoder / vision) "
      "| parity top-1 / greedy / decoder cosine | parity peak RSS | generate peak RSS | decode tok/s (% of bound) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for recipe in recipes:
    name = f"{prefix}{recipe}"
    art = out / name
    try:
        info = json.loads((art / "artifact.json").read_text())
    except OSError:
        print(f"| {target} | {recipe} | failed: see {root}/{name}.log |")
        continue
    size = sum(m["bytes"] for m in info["files"].values())
    check = info["report"]["export_check"].get("methods", {})
    ew, er = timed(name)
    _, pr = timed(f"{name}-parity")
    _, gr = timed(f"{name}-generate")
    try:
        p = json.loads((root / f"{name}-parity" / "report.json").read_text())
        parity = (f"{p['decoder']['top1_agreement']:.3f} / {p['decoder']['greedy_match']:.3f} / "
                  f"{p['methods']['text_decoder']['cosine']:.4f}")
    except (OSError, KeyError):
        parity = "-"
    try:
        b = json.loads((root / f"{name}-bench.json").read_text())["runtimes"][0]
        tok = f"{b['decode_tok_s']:.2f} ({100 * b['decode_fraction_of_bound']:.0f}%)"
    except (OSError, KeyError, IndexError):
        tok = "-"
    cos = " / ".join(f(check.get(m, {}).get("cosine"), ".4f") for m in ("text_decoder", "vision_encoder"))
    print(f"| {target} | {recipe} | {f(ew and ew / 60, '.1f')} min | {f(er, '.2f')} GiB | {size / 1e9:.2f} GB | {cos} "
          f"| {parity} | {f(pr, '.2f')} GiB | {f(gr, '.2f')} GiB | {tok} |")
EOF
