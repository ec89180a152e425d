# Sourced by the examples/*_9b.sh scripts: measure NAME CMD... runs CMD under /usr/bin/time -v with its output in
# $ROOT/NAME.log and prints "NAME: wall S s, peak RSS M MiB, exit E", then the log lines matching $MEASURE_LINES.
measure() {
    local name=$1; shift
    /usr/bin/time -v "$@" >"$ROOT/$name.log" 2>&1
    local rc=$?
    local wall rss
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$ROOT/$name.log" |
        awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$ROOT/$name.log")
    printf '%s: wall %s s, peak RSS %d MiB, exit %s\n' "$name" "$wall" "$((rss / 1024))" "$rc"
    grep -E "${MEASURE_LINES:-^(error|tokens|text|\[)}" "$ROOT/$name.log" | sed 's/^/    /'
    return 0
}
