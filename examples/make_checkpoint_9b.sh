#!/usr/bin/env bash
# Measure make-checkpoint at the 9B's widths, and what today's loader costs on its output.
#
#   examples/make_checkpoint_9b.sh [ROOT]        (default ROOT=/work/tmp9b; never inside the repo)
#
# 1. make-checkpoint --preset autoglm-phone-9b --layers 1 --vision-layers 1  (1.69B params, 3.4 GB bf16)
#    then `info` and `generate --prompt hi --max-new-tokens 2` on it: wall time and peak RSS of each.
# 2. the full 9B (10.29B params, ~20.6 GB bf16 in 5 shards of <= 5 GB) when ROOT's disk has 24 GB free,
#    then `info` on it; its directory is deleted afterwards (FULL_KEEP=1 keeps it).
#    `generate` on the full 9B is measured by examples/load_9b_memory.sh (bf16 kept mapped, fp32 compute).
# Every step prints "<step>: wall S s, peak RSS M MiB, exit E"; logs are in ROOT/*.log.
set -uo pipefail

ROOT=${1:-/work/tmp9b}
mkdir -p "$ROOT"
CLI=(autoglm-export)

MEASURE_LINES='^(error|tokens|text|model|total|\[)|parameters'
source "$(dirname "$0")/measure.sh"

df -h "$ROOT" | tail -1

rm -rf "$ROOT/l1"
measure make_checkpoint_l1 "${CLI[@]}" make-checkpoint --preset autoglm-phone-9b --layers 1 --vision-layers 1 --out "$ROOT/l1"
measure info_l1 "${CLI[@]}" info --checkpoint "$ROOT/l1"
measure generate_l1 "${CLI[@]}" generate --checkpoint "$ROOT/l1" --prompt hi --max-new-tokens 2
du -sh "$ROOT/l1"

free_gb=$(df -BG --output=avail "$ROOT" | tail -1 | tr -dc 0-9)
if [ "$free_gb" -ge 24 ]; then
    rm -rf "$ROOT/full"
    measure make_checkpoint_full "${CLI[@]}" make-checkpoint --preset autoglm-phone-9b --out "$ROOT/full"
    measure info_full "${CLI[@]}" info --checkpoint "$ROOT/full"
    ls -la "$ROOT/full"
    du -sh "$ROOT/full"
    [ "${FULL_KEEP:-0}" = 1 ] || rm -rf "$ROOT/full"
else
    echo "full 9B skipped: ${free_gb} GB free on $ROOT, need 24"
fi
[ "${L1_KEEP:-0}" = 1 ] || rm -rf "$ROOT/l1"
