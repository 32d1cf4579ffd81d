#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for CI and local testing.
#
#   launch/ci/slurm-cluster.sh up       install (if needed) and start munged, slurmctld, 2 x slurmd
#   launch/ci/slurm-cluster.sh status   exit 0 when every daemon runs and all nodes are usable
#   launch/ci/slurm-cluster.sh down     cancel its jobs, stop exactly the daemons `up` started
#
# Everything lives under one state directory (STARS_SLURM_DIR, default /tmp/stars-slurm):
# slurm.conf, a private munge key and socket, pid files, logs, spool and state. Clients
# need `export SLURM_CONF=$STARS_SLURM_DIR/slurm.conf` (printed by `up` and `status`).
#
# Environment:
#   STARS_SLURM_DIR        state directory                       (/tmp/stars-slurm)
#   STARS_SLURM_PORT_BASE  slurmctld port; node i uses base + i  (17000 -> n1 on 17001)
#   STARS_SLURM_NODES      number of nodes n1..nN                (2)
#   STARS_SLURM_CPUS       CPUs each node advertises             (2; the nodes share the host's cores)
#   STARS_SLURM_FIRST_JOB_ID  first job id (1); jobs derive their rendezvous port from it
#   STARS_SLURM_CRED_EXPIRE   credential lifetime, also the delay before a requeued job restarts (5 s)
#   STARS_SLURM_NO_INSTALL set to 1 to fail instead of running apt-get when Slurm is missing
#
# Exit codes: 0 ok; 1 failed to start (logs are printed); 3 Slurm/munge missing and cannot
# be installed (not root, no apt-get, or STARS_SLURM_NO_INSTALL=1).
set -euo pipefail

DIR=${STARS_SLURM_DIR:-/tmp/stars-slurm}
PORT_BASE=${STARS_SLURM_PORT_BASE:-17000}
NODES=${STARS_SLURM_NODES:-2}
CPUS=${STARS_SLURM_CPUS:-2}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
RUN=$DIR/run
LOG=$DIR/log
PARTITION=debug
CRED_EXPIRE=${STARS_SLURM_CRED_EXPIRE:-5}
FIRST_JOB_ID=${STARS_SLURM_FIRST_JOB_ID:-1}

export SLURM_CONF=$CONF

log() { echo "slurm-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

# --------------------------------------------------------------------------- install

missing_commands() {
    local c out=()
    for c in slurmctld slurmd sinfo sbatch scontrol srun squeue scancel munged; do
        command -v "$c" >/dev/null 2>&1 || out+=("$c")
    done
    echo "${out[*]}"
}

install_slurm() {
    local missing
    missing=$(missing_commands)
    [[ -z "$missing" ]] && return 0
    if [[ "${STARS_SLURM_NO_INSTALL:-0}" == 1 ]]; then
        log "missing: $missing (STARS_SLURM_NO_INSTALL=1, not installing)"; exit 3
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing: $missing; installing needs root and apt-get (Debian/Ubuntu packages slurmctld slurmd slurm-client munge)"
        exit 3
    fi
    log "installing slurmctld slurmd slurm-client munge (missing: $missing)"
    # Keep the packages' init scripts from starting system daemons: we run our own.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1
    fi
    local rc=0
    { apt-get update -qq -o DPkg::Lock::Timeout=300 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
        --no-install-recommends slurmctld slurmd slurm-client munge; } >"$DIR/install.log" 2>&1 || rc=$?
    [[ $made_policy == 1 ]] && rm -f "$policy"
    if [[ $rc -ne 0 ]]; then
        tail -n 20 "$DIR/install.log" >&2
        log "apt-get install failed (exit $rc); full log: $DIR/install.log"; exit 3
    fi
    missing=$(missing_commands)
    [[ -z "$missing" ]] || { log "still missing after install: $missing"; exit 3; }
}

# --------------------------------------------------------------------------- processes

# alive and not a zombie (daemons are reparented to pid 1, which may reap them late)
alive() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# pid from a pid file, printed only when that process is alive
live_pid() {
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && alive "$pid" || return 1
    echo "$pid"
}

stop_pidfile() {
    local f=$1 name=$2 pid i
    if pid=$(live_pid "$f"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            log "$name (pid $pid) ignored TERM for 10 s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

munged_pidfile() { echo "$RUN/munged.pid"; }
slurmctld_pidfile() { echo "$RUN/slurmctld.pid"; }
slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

all_pidfiles() {
    local n
    munged_pidfile; slurmctld_pidfile
    for n in $(node_names); do slurmd_pidfile "$n"; done
}

daemons_alive() {
    local f
    for f in $(all_pidfiles); do live_pid "$f" >/dev/null || return 1; done
}

nodes_ready() {
    # every node idle/mixed/allocated (i.e. responding and not drained or down)
    local states
    states=$(timeout 10 sinfo -h -N -p "$PARTITION" -o '%T' 2>/dev/null) || return 1
    [[ $(grep -c . <<<"$states") -eq $NODES ]] || return 1
    ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states"
}

# slurmstepd processes of this cluster (they carry its SLURM_CONF), then all their descendants
cluster_step_pids() {
    local stat pid fields comm ppid
    local -A parent=() ours=()
    for stat in /proc/[0-9]*/stat; do
        pid=${stat#/proc/}; pid=${pid%/stat}
        fields=$(<"$stat") 2>/dev/null || continue
        comm=${fields#*(}; comm=${comm%%)*}
        read -r -a fields <<<"${fields##*) }"  # state ppid ...
        parent[$pid]=${fields[1]}
        if [[ $comm == slurmstepd ]] && tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            ours[$pid]=1
        fi
    done
    local changed=1
    while ((changed)); do
        changed=0
        for pid in "${!parent[@]}"; do
            ppid=${parent[$pid]}
            if [[ -z ${ours[$pid]:-} && -n ${ours[$ppid]:-} ]]; then ours[$pid]=1; changed=1; fi
        done
    done
    echo "${!ours[@]}"
}

stop_all() {
    local n i
    if live_pid "$(slurmctld_pidfile)" >/dev/null; then
        # Cancel our jobs and let them end (KillWait + margin) so nothing outlives the cluster.
        timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    for n in $(node_names); do stop_pidfile "$(slurmd_pidfile "$n")" "slurmd $n"; done
    stop_pidfile "$(slurmctld_pidfile)" slurmctld
    # Job steps that did not end with their job (their srun waits on a controller that is gone).
    local left
    left=$(cluster_step_pids)
    if [[ -n $left ]]; then
        log "killing job-step processes left behind: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
    fi
    stop_pidfile "$(munged_pidfile)" munged
}

show_logs() {
    local f
    for f in "$LOG"/*.log; do
        [[ -e $f ]] || continue
        echo "---- $f (last 15 lines)" >&2
        tail -n 15 "$f" >&2
    done
}

# --------------------------------------------------------------------------- config

write_config() {
    local host n i
    host=$(hostname -s)
    {
        echo "# Generated by launch/ci/slurm-cluster.sh; $NODES nodes on this host."
        echo "ClusterName=stars"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$PORT_BASE"
        echo "SlurmUser=$(id -un)"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # cred_expire also delays a requeued job's restart (default 120 s).
        echo "AuthInfo=socket=$SOCKET,cred_expire=$CRED_EXPIRE"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$(slurmctld_pidfile)"
        echo "SlurmdPidFile=$RUN/slurmd-%n.pid"
        echo "SlurmctldLogFile=$LOG/slurmctld.log"
        echo "SlurmdLogFile=$LOG/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/backfill"
        # Schedule every second (default 60 s): requeued and array jobs start promptly.
        echo "SchedulerParameters=sched_interval=1,bf_interval=1"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "FirstJobId=$FIRST_JOB_ID"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        echo "MessageTimeout=20"
        for n in $(node_names); do
            i=${n#n}
            echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + i)) CPUs=$CPUS RealMemory=1024 State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

# --------------------------------------------------------------------------- commands

start_munged() {
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key" >/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"; chmod 0600 "$MUNGE_DIR/munge.key"
    # munged writes its pid file as user munge: give it a file in $RUN it owns.
    install -m 0644 -o munge -g munge /dev/null "$(munged_pidfile)"
    runuser -u munge -- munged --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$(munged_pidfile)" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" --force 9>&-
    local i
    for ((i = 0; i < 50; i++)); do
        live_pid "$(munged_pidfile)" >/dev/null && [[ -S $SOCKET ]] && return 0
        sleep 0.1
    done
    return 1
}

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds
    local limit=$1 t0=$SECONDS
    shift
    while ! "$@"; do
        ((SECONDS - t0 >= limit)) && return 1
        sleep 0.5
    done
}

pidfile_alive() { live_pid "$1" >/dev/null; }

cmd_up() {
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    exec 9>"$DIR/.lock"
    flock 9
    if daemons_alive && nodes_ready; then
        log "already up ($DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_slurm
    # A half-up cluster from an earlier run: stop what is left, start fresh.
    stop_all
    rm -rf "$DIR/state" "$DIR/spool" "$RUN"
    mkdir -p "$DIR/state" "$DIR/spool" "$RUN" "$LOG"
    chmod 0755 "$RUN" "$LOG"
    local n t0=$SECONDS
    write_config
    start_munged || { show_logs; stop_all; die "munged did not start"; }
    timeout 30 slurmctld -c -f "$CONF" 9>&- || { show_logs; stop_all; die "slurmctld failed"; }
    wait_for 20 pidfile_alive "$(slurmctld_pidfile)" || { show_logs; stop_all; die "slurmctld did not start"; }
    for n in $(node_names); do
        mkdir -p "$DIR/spool/$n"
        timeout 30 slurmd -c -N "$n" -f "$CONF" 9>&- || { show_logs; stop_all; die "slurmd $n failed"; }
    done
    for n in $(node_names); do
        wait_for 20 pidfile_alive "$(slurmd_pidfile "$n")" || { show_logs; stop_all; die "slurmd $n did not start"; }
    done
    if ! wait_for 60 nodes_ready; then
        timeout 10 sinfo -N -l >&2 || true
        show_logs; stop_all; die "nodes did not become idle within 60 s"
    fi
    log "up in $((SECONDS - t0)) s: $NODES nodes, partition $PARTITION, state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    [[ -d $DIR ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    exec 9>"$DIR/.lock"
    flock 9
    stop_all
}

cmd_status() {
    local f ok=0
    for f in $(all_pidfiles); do
        if pid=$(live_pid "$f"); then
            echo "$(basename "$f" .pid): running (pid $pid)"
        else
            echo "$(basename "$f" .pid): not running"; ok=1
        fi
    done
    if [[ $ok -eq 0 ]]; then
        timeout 10 sinfo -N -o '%N %P %T %c' || ok=1
        nodes_ready || ok=1
    fi
    echo "export SLURM_CONF=$CONF"
    return $ok
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status   (state in \${STARS_SLURM_DIR:-/tmp/stars-slurm})" >&2; exit 2 ;;
esac
