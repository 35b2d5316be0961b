#!/usr/bin/env bash
# Stop the daemons start.sh started, by the PIDs it recorded (slurmd, slurmctld,
# munged, in that order), and nothing else; then remove the config files start.sh
# wrote (those carrying its marker line). Safe to run twice.
# A slurm.conf left behind with no controller behind it costs every later
# `snakemake` call about 9 s: the SLURM executor plugin asks `scontrol show config`
# at import, and scontrol waits for the absent controller until it times out.
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

MARKER="# written by advalign .ci/slurm/start.sh"
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [[ -f $f ]] && grep -qxF "$MARKER" "$f"; then
        rm -f "$f" && echo "stop.sh: removed $f"
    fi
done
