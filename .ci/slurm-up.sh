#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost for the SLURM-profile test (root, Debian 12).
# Idempotent. Two fake GPUs are declared as gres backed by /dev/null symlinks so that
# `--gpus=1` requests are accepted. No slurmdbd: jobs are seen through squeue (MinJobAge keeps
# finished ones visible) and /var/log/slurm/jobcomp.log.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-up: must run as root" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    # Keep package scripts from starting daemons with the stock config.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key --force
chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
if ! { munge -n </dev/null | unmunge; } >/dev/null 2>&1; then
    runuser -u munge -- munged --force
    sleep 1
fi

mkdir -p /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm
for i in 0 1; do ln -sfn /dev/null "/dev/fakegpu$i"; done
hardware="$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')"
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 $hardware Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
printf 'AutoDetect=off\nNodeName=localhost Name=gpu File=/dev/fakegpu[0-1]\n' >/etc/slurm/gres.conf

scontrol ping 2>/dev/null | grep -q 'is UP' || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost
for _ in $(seq 120); do
    state="$(sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -1)"
    case "$state" in
        idle | mix | alloc) break ;;
        drain* | down* | inval*) scontrol update NodeName=localhost State=RESUME || true ;;
    esac
    sleep 0.5
done
sinfo
