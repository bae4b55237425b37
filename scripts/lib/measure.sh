# Sourced by the measurement scripts (soak, login-flood, syscalls): a
# release broker and helpers started in the background, stopped by PID on
# exit.

measure_pids=()
# Stops everything started with `measure_spawn`.
measure_cleanup() {
    for p in "${measure_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap measure_cleanup EXIT

# Waits (up to 10 s) until 127.0.0.1:PORT accepts; fails otherwise.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1 after 10 s" >&2
    return 1
}
