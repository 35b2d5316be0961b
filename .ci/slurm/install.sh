#!/usr/bin/env bash
# Install a single-node SLURM (slurm-wlm) and munge from Debian packages.
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are present.
# Needs root and apt (Debian/Ubuntu). Exit 3 means "cannot install here".
set -euo pipefail

have_all() {
    command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged
} >/dev/null 2>&1

if have_all; then
    echo "slurm: already installed ($(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo unknown version))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "slurm: not installed and not root: cannot apt-get install" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm: not installed and no apt-get on this machine" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends keeps it to slurmctld, slurmd, the client commands and munge.
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
have_all || { echo "slurm: install finished but binaries are missing" >&2; exit 1; }
echo "slurm: installed ($(dpkg-query -W -f='${Version}' slurm-client))"
