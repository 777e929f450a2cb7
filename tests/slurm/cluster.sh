#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests: Debian's slurmctld + slurmd + munge, with
# N emulated nodes (several slurmd on one host, node1..nodeN on 127.0.0.1).
#
#   tests/slurm/cluster.sh install         only install the Debian packages (CI does it beside pip)
#   tests/slurm/cluster.sh start [NODES]   install if needed, configure, start, wait until idle
#   tests/slurm/cluster.sh stop            stop only the daemons this script started, undo its edits
#
# Needs root (apt-get, munge user, /etc/slurm). State under $MOECL_SLURM_DIR (/tmp/moecl-slurm).
set -euo pipefail
DIR=${MOECL_SLURM_DIR:-/tmp/moecl-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by moe-cl tests/slurm/cluster.sh"

log() { echo "[cluster.sh $(date +%T)] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # alive PIDFILE

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return 0
    log "installing slurmctld slurmd slurm-client munge"
    # No service starts from maintainer scripts: there is no config yet, and no systemd.
    local rcd=/usr/sbin/policy-rc.d
    if [ ! -e "$rcd" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$rcd"; chmod 755 "$rcd"
        trap "rm -f $rcd" EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    local pkgs="slurmctld slurmd slurm-client munge"
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/log/munge; chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving (not ours: left alone)
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/munged.pid"
}

write_config() {
    local nodes=$1 host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 / nodes ))
    mkdir -p /etc/slurm
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then cp -p "$CONF" "$DIR/slurm.conf.before"; fi
    cat > "$CONF" <<EOF
$MARK
ClusterName=moecltest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
MailProg=/bin/true
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-$((17000 + nodes)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Node names must resolve: jobs use them as the rendezvous host.
    for i in $(seq 1 "$nodes"); do
        getent hosts "node$i" >/dev/null || { echo "127.0.0.1 node$i $MARK" >> /etc/hosts; }
    done
}

start() {
    local nodes=${1:-2}
    [ "$(id -u)" = 0 ] || { echo "cluster.sh needs root" >&2; exit 1; }
    mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
    install
    start_munge
    write_config "$nodes"
    alive "$DIR/slurmctld.pid" || { rm -rf "$DIR/state"/*; slurmctld; }
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$DIR/spool/node$i"
        alive "$DIR/slurmd-node$i.pid" || slurmd -N "node$i"
    done
    for _ in $(seq 240); do
        idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' idle$' || true)
        [ "$idle" -ge "$nodes" ] && { log "ready: $nodes node(s) idle"; return 0; }
        sleep 0.5
    done
    sinfo -N -l >&2 || true; tail -n 20 "$DIR"/log/*.log >&2 || true
    echo "cluster not ready after 120 s" >&2; exit 1
}

stop_pid() {  # stop_pid PIDFILE
    alive "$1" || { rm -f "$1"; return 0; }
    local p; p=$(cat "$1"); kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    rm -f "$1"
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    fi
    for f in "$DIR"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"   # only present when this script started munged
    if grep -qF "$MARK" /etc/hosts; then  # rewrite in place: /etc/hosts may be a bind mount
        grep -vF "$MARK" /etc/hosts > "$DIR/hosts" && cat "$DIR/hosts" > /etc/hosts
    fi
    if [ -e "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        if [ -e "$DIR/slurm.conf.before" ]; then mv "$DIR/slurm.conf.before" "$CONF"; else rm -f "$CONF"; fi
    fi
    log "stopped"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:-2}" ;;
    stop) stop ;;
    *) echo "usage: $0 install | start [NODES] | stop" >&2; exit 2 ;;
esac
