# Sourced by run_all.sh and run_lab.sh. Other processes on these 2 cores wreck the numbers: before each
# benchmark wait (up to QUIET_WAIT_S, default 300 s) until the machine's CPU use over 2 s is below 15 %.
busy_pct() {
    local a b
    a=($(head -1 /proc/stat)); sleep 2; b=($(head -1 /proc/stat))
    local idle=$(( (b[4]+b[5]) - (a[4]+a[5]) )) tot=0 i
    for i in 1 2 3 4 5 6 7 8; do tot=$(( tot + b[i] - a[i] )); done
    echo $(( tot > 0 ? 100 * (tot - idle) / tot : 0 ))
}
wait_quiet() {
    local t0=$SECONDS p
    while p=$(busy_pct); [ "$p" -ge 15 ] && [ $((SECONDS - t0)) -lt "${QUIET_WAIT_S:-300}" ]; do
        echo "  (cpu busy ${p}%, waiting)" >&2; sleep 8
    done
    echo "  (cpu busy ${p}% before start)" >&2
}
