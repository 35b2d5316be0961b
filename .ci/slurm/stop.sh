#!/usr/bin/env bash
# Stop the daemons start.sh started, by the PIDs it recorded (slurmd, slurmctld,
# munged, in that order), and nothing else. Safe to run twice.
set -uo pipefail
STATE_DIR=${STATE_DIR:-/run/advalign-slurm}

stop_one() {  # name
    local name=$1 pidfile=$STATE_DIR/$1.pid pid comm
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    # A recycled PID belongs to someone else: only signal our daemon (or its runuser/setsid parent).
    if [[ -n $comm && ( $comm == "$name" || $comm == runuser ) ]]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $name ($pid) ignored SIGTERM; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        echo "stop.sh: stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop_one slurmd
stop_one slurmctld
stop_one munged
