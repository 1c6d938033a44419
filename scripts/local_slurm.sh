#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to try (and test) `kdexp sweep --launcher slurm`
# without a real cluster.
#
#   sudo scripts/local_slurm.sh start    # install slurmctld slurmd slurm-client munge if missing, configure, start
#   scripts/local_slurm.sh status        # daemons and `sinfo`
#   sudo scripts/local_slurm.sh stop     # stop the daemons this script started
#
# Needs root and Debian/Ubuntu packages (SLURM 22.05 on Debian 12). It writes /etc/munge/munge.key
# (if missing), /etc/slurm/slurm.conf and /etc/slurm/cgroup.conf, one node named after this host with
# the CPUs and memory `slurmd -C` measures, in one default partition `debug`. Accounting is off, so
# `sacct` fails (submitit then warns; kdexp keeps that off its console). slurmctld starts with an
# empty queue (-c). A slurm.conf that this script did not write is never touched: on a machine that
# is already part of a cluster, use that cluster.
set -euo pipefail

MARK="# written by kdexp scripts/local_slurm.sh"
CONF_DIR=/etc/slurm
STATE_DIR=/run/kdexp-local-slurm            # which daemons this script started (stop ends only those)
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "'$1' needs root (it installs packages, writes /etc/slurm and starts daemons): sudo $0 $1"
}

alive() {  # alive PIDFILE: the process it names is running
    local stat
    [ -s "$1" ] || return 1
    stat=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1   # ps, not kill -0: status works without root
    [[ "$stat" != Z* ]]                                             # a stopped daemon not yet reaped is gone
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
            && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurmctld, slurmd, slurm-client and munge are not installed and there \
is no apt-get here: install them with this system's package manager, then run '$0 start' again"
    say "installing ${PACKAGES[*]} (apt-get, 10-20 s) ..."
    export DEBIAN_FRONTEND=noninteractive
    local log=/tmp/kdexp-local-slurm-apt.log
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
        tail -20 "$log" >&2
        die "apt-get could not install ${PACKAGES[*]} (full log: $log)"
    fi
}

write_if_changed() {  # write_if_changed PATH CONTENT: 0 when the file changed
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
    printf '%s\n' "$2" >"$1"
    return 0
}

configure() {  # writes the config files; exit status 0 when any of them changed
    local host node conf cgroup changed=1
    host=$(hostname -s)
    if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script: this machine is configured for \
another cluster. Use that cluster (kdexp sweep --launcher slurm), or move the file away to start a local one."
    fi
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    # This machine as slurmd measures it (CPUs, sockets, cores, threads, RealMemory in MB).
    node=$(slurmd -C | head -1)
    [[ "$node" == NodeName=* ]] || die "'slurmd -C' did not describe this machine: $node"
    conf="$MARK
ClusterName=kdexp-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
$node
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    # Without IgnoreSystemd slurmd exits ("cannot find cgroup plugin") where systemd does not run.
    cgroup="$MARK
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes"
    write_if_changed "$CONF_DIR/slurm.conf" "$conf" && changed=0
    write_if_changed "$CONF_DIR/cgroup.conf" "$cgroup" && changed=0
    return $changed
}

node_state() {
    sinfo -h -N -n "$(hostname -s)" -o %t 2>/dev/null | head -1
}

start_daemons() {
    mkdir -p "$STATE_DIR" /run/munge
    chown munge:munge /run/munge
    if ! alive /run/munge/munged.pid; then
        runuser -u munge -- /usr/sbin/munged
        touch "$STATE_DIR/munged"
        say "munged started"
    fi
    if ! alive /run/slurmctld.pid; then
        slurmctld -c      # -c: a fresh queue (no jobs left over from an earlier start)
        touch "$STATE_DIR/slurmctld"
        say "slurmctld started"
    fi
    if ! alive /run/slurmd.pid; then
        slurmd
        touch "$STATE_DIR/slurmd"
        say "slurmd started"
    fi
}

wait_idle() {
    local host state waited=0
    host=$(hostname -s)
    while [ "$waited" -lt "$WAIT_S" ]; do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc|comp) return 0 ;;
            down*|drain*|drng*|fail*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
        waited=$((waited + 1))
    done
    die "node $host is not idle after ${WAIT_S} s (sinfo says '${state:-nothing}'). Logs: /var/log/slurm/slurmctld.log, \
/var/log/slurm/slurmd.log"
}

stop_daemons() {
    local pidfile name
    if [ -f "$STATE_DIR/slurmctld" ] && alive /run/slurmctld.pid; then
        scontrol shutdown >/dev/null 2>&1 || true   # slurmctld and every slurmd; their pids end below
    fi
    for name in slurmd slurmctld munged; do
        pidfile=/run/$name.pid
        [ "$name" = munged ] && pidfile=/run/munge/munged.pid
        [ -f "$STATE_DIR/$name" ] || continue
        for _ in $(seq 50); do alive "$pidfile" || break; [ "$name" = munged ] && kill "$(cat "$pidfile")"; sleep 0.2; done
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            sleep 1
            alive "$pidfile" && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        fi
        rm -f "$STATE_DIR/$name"
        say "$name stopped"
    done
}

status() {
    local name pidfile up=0
    for name in munged slurmctld slurmd; do
        pidfile=/run/$name.pid
        [ "$name" = munged ] && pidfile=/run/munge/munged.pid
        if alive "$pidfile"; then say "$name running (pid $(cat "$pidfile"))"; up=$((up + 1))
        else say "$name not running"; fi
    done
    if [ "$up" -eq 3 ]; then sinfo; else return 1; fi
}

case "${1:-}" in
    start)
        need_root start
        t0=$(date +%s%N)
        install_packages
        if configure && alive /run/slurmctld.pid; then
            say "configuration changed: restarting the daemons"
            stop_daemons
        fi
        start_daemons
        wait_idle
        ms=$(( ($(date +%s%N) - t0) / 1000000 ))
        say "cluster up in $((ms / 1000)).$(( ms % 1000 / 100 )) s: \
node $(hostname -s) $(node_state), partition debug. Try: kdexp sweep sweeps/smoke.yaml --launcher slurm seed=1 kd.temperature=4"
        ;;
    stop)
        need_root stop
        stop_daemons
        say "stopped"
        ;;
    status)
        status
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
