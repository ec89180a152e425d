#!/usr/bin/env bash
# What loading and running the 9B costs now that bf16 weights stay mapped (issue 16.2).
#
#   examples/load_9b_memory.sh [ROOT]        (default ROOT=/work/tmp9b; never inside the repo)
#
# 1. make-checkpoint --preset autoglm-phone-9b --layers 1 --vision-layers 1 (1.69B params, 3.4 GB bf16),
#    then `generate --prompt hi --max-new-tokens 2` on it (before issue 16.2: 10.0 GB peak RSS).
# 2. when ROOT's disk has 24 GB free: the full 9B (10.29B params, 20.6 GB bf16), then
#    `generate --prompt hi --max-new-tokens 1` on it under a 15-minute limit (GEN_LIMIT seconds).
# Every step prints "<step>: wall S s, peak RSS M MiB, exit E" (/usr/bin/time -v); logs are in ROOT/*.log;
# generate also prints its peak anonymous and file-backed RSS, sampled from /proc every 0.2 s.
# Checkpoints are deleted afterwards (L1_KEEP=1 / FULL_KEEP=1 keep them).
#
# Peak RSS counts the checkpoint's file pages the forward has read (clean, shared with the page cache,
# reclaimable): about the bf16 size of what ran, plus one module's fp32 weights and the activations.
set -uo pipefail

ROOT=${1:-/work/tmp9b}
GEN_LIMIT=${GEN_LIMIT:-900}
mkdir -p "$ROOT"
CLI=(autoglm-export)

source "$(dirname "$0")/measure.sh"

sample_rss() {  # sample_rss PATTERN PID: peak anonymous and file-backed RSS of the python matching PATTERN while PID runs
    local maxa=0 maxf=0 pid a f
    while kill -0 "$2" 2>/dev/null; do
        pid=$(pgrep -f "python.*$1" | head -1)
        if [ -n "$pid" ]; then
            read -r a f < <(awk '/RssAnon/{a=$2} /RssFile/{f=$2} END{print a+0, f+0}' "/proc/$pid/status" 2>/dev/null)
            [ "${a:-0}" -gt "$maxa" ] && maxa=$a
            [ "${f:-0}" -gt "$maxf" ] && maxf=$f
        fi
        sleep 0.2
    done
    wait "$2"
    printf '    sampled every 0.2 s: peak RssAnon %d MiB, peak RssFile %d MiB\n' "$((maxa / 1024))" "$((maxf / 1024))"
}

df -h "$ROOT" | tail -1
free -m | sed -n 2p

if [ ! -f "$ROOT/l1/config.json" ]; then
    rm -rf "$ROOT/l1"
    measure make_checkpoint_l1 "${CLI[@]}" make-checkpoint --preset autoglm-phone-9b --layers 1 --vision-layers 1 --out "$ROOT/l1"
fi
measure generate_l1 "${CLI[@]}" generate --checkpoint "$ROOT/l1" --prompt hi --max-new-tokens 2 &
sample_rss "generate --checkpoint $ROOT/l1" $!
[ "${L1_KEEP:-0}" = 1 ] || rm -rf "$ROOT/l1"

free_gb=$(df -BG --output=avail "$ROOT" | tail -1 | tr -dc 0-9)
if [ -f "$ROOT/full/config.json" ] || [ "$free_gb" -ge 24 ]; then
    if [ ! -f "$ROOT/full/config.json" ]; then
        rm -rf "$ROOT/full"
        measure make_checkpoint_full "${CLI[@]}" make-checkpoint --preset autoglm-phone-9b --out "$ROOT/full"
    fi
    du -sh "$ROOT/full"
    # timeout -s INT: a run past the limit still gets its /usr/bin/time line (exit 124)
    measure generate_full timeout -s INT "$GEN_LIMIT" "${CLI[@]}" generate --checkpoint "$ROOT/full" --prompt hi --max-new-tokens 1 &
    sample_rss "generate --checkpoint $ROOT/full" $!
    [ "${FULL_KEEP:-0}" = 1 ] || rm -rf "$ROOT/full"
else
    echo "full 9B skipped: ${free_gb} GB free on $ROOT, need 24"
fi
