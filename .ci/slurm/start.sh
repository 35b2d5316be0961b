#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster on this machine, by hand (no systemd):
# munged, slurmctld and slurmd run in the foreground under setsid, and their PIDs are
# written to $STATE_DIR (default /run/advalign-slurm) so that stop.sh stops exactly
# those processes. The node offers every core, 90% of the memory and one *fake* GPU
# (gres gpu backed by /dev/null) so that rules with gpu=1 are schedulable on a
# GPU-less machine; jobs see CUDA_VISIBLE_DEVICES=0 and the code falls back to CPU.
#
# Writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf; refuses to overwrite files
# it did not write itself (they carry the MARKER line below).
# Exit codes: 0 = cluster idle (started now, or already running from an earlier call:
# then nothing is touched and the message says "already running"), 2 = daemons
# running that this script did not start, or config files it did not write,
# 1 = failure (logs in /var/log/slurm and /var/log/munge).
set -euo pipefail

STATE_DIR=${STATE_DIR:-/run/advalign-slurm}
WAIT_S=${WAIT_S:-60}
# Fake GPUs on the node (1 or 2): two let two GPU jobs run side by side on 2 cores.
FAKE_GPUS=${FAKE_GPUS:-1}
MARKER="# written by advalign .ci/slurm/start.sh"
CONF_DIR=/etc/slurm
HOST=$(hostname -s)
t0=$(date +%s%N)

[[ $(id -u) -eq 0 ]] || { echo "start.sh: needs root" >&2; exit 1; }

alive() { [[ -f $STATE_DIR/$1.pid ]] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null; }

if alive slurmctld && alive slurmd && alive munged; then
    echo "start.sh: our cluster is already running (PIDs in $STATE_DIR)"
    exit 0
fi
for d in munged slurmctld slurmd; do
    if pgrep -x "$d" >/dev/null; then
        echo "start.sh: a $d we did not start is running (pid $(pgrep -x "$d" | tr '\n' ' ')); stop it first" >&2
        exit 2
    fi
done

for f in slurm.conf gres.conf; do
    if [[ -s $CONF_DIR/$f ]] && ! grep -qxF "$MARKER" "$CONF_DIR/$f"; then
        echo "start.sh: $CONF_DIR/$f exists and was not written by this script; not touching it" >&2
        exit 2
    fi
done

# The controller host name must resolve.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

mkdir -p "$STATE_DIR" /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# Memory: RealMemory above what slurmd measures marks the node invalid, so take 90%.
cpus=$(nproc)
mem_mb=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem_mb=$(( mem_mb * 9 / 10 ))

cat >"$CONF_DIR/slurm.conf" <<CONF
$MARKER
ClusterName=advalign-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups/systemd in containers and CI machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem get 1 GB per CPU instead of the whole node.
DefMemPerCPU=1000
# Finished jobs stay visible to squeue for 30 min: the Snakemake SLURM plugin's
# squeue status checks rely on it (and fall back to sacct when it is < 3x the
# initial status-check wait), and a test reads the whole run's jobs back at its end.
MinJobAge=1800
ReturnToService=2
# No slurmdbd: sacct does not work on this cluster (see SLURM-NOTES.md).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
# Fake GPUs: schedulable gres on a GPU-less node, each "device" a harmless file.
fake_devices=(/dev/null /dev/zero)
(( FAKE_GPUS >= 1 && FAKE_GPUS <= ${#fake_devices[@]} )) || { echo "start.sh: FAKE_GPUS must be 1 or 2" >&2; exit 1; }
{
    echo "$MARKER"
    for device in "${fake_devices[@]:0:FAKE_GPUS}"; do
        echo "NodeName=$HOST Name=gpu File=$device"
    done
} >"$CONF_DIR/gres.conf"

start_daemon() {  # name, command...
    local name=$1; shift
    setsid "$@" </dev/null >>"/var/log/slurm/$name.stdout" 2>&1 &
    echo $! >"$STATE_DIR/$name.pid"
}

start_daemon munged runuser -u munge -- /usr/sbin/munged -F
# runuser forks; record the munged process itself (child of runuser) once it is up.
for _ in $(seq 50); do
    [[ -S /run/munge/munge.socket.2 ]] && break
    sleep 0.1
done
munged_pid=$(pgrep -x -P "$(cat "$STATE_DIR/munged.pid")" munged || true)
[[ -n $munged_pid ]] && echo "$munged_pid" >"$STATE_DIR/munged.pid"
munge -n | unmunge >/dev/null || { echo "start.sh: munge does not work" >&2; exit 1; }

start_daemon slurmctld /usr/sbin/slurmctld -D -i
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
start_daemon slurmd /usr/sbin/slurmd -D

state=""
deadline=$(( $(date +%s) + WAIT_S ))
while (( $(date +%s) < deadline )); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    [[ $state == idle ]] && break
    sleep 0.5
done
if [[ $state != idle ]]; then
    echo "start.sh: node is '$state' after ${WAIT_S}s" >&2
    sinfo -N -l >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
elapsed_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "start.sh: cluster idle after $((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000))) s:" \
    "$(sinfo -h -N -o '%N cpus=%c mem=%m gres=%G state=%T')"
