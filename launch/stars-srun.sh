#!/usr/bin/env bash
# stars-srun.sh: the per-task payload of a stars_scale Slurm job (run it through srun).
#
#   srun --ntasks-per-node=1 launch/stars-srun.sh --config CFG --out DIR [--set k=v ...] [--resume]
#
# Every argument is passed to `python -m $STARS_MODULE`. Two modes (STARS_LAUNCH_MODE):
#   torchrun  one task per node; starts one torchrun per node with c10d rendezvous, which
#             forks STARS_NPROC_PER_NODE workers (default).
#   srun      one task per device (Megatron's way); this task is one rank:
#             RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID.
# Both give the payload the same torch.distributed env:// variables (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
#
# Rendezvous: the head node is the first of `scontrol show hostnames $SLURM_JOB_NODELIST`;
# its address is its name where that resolves, else the node's NodeAddr from scontrol.
# The port is derived from the job id (20000 + SLURM_JOB_ID % 10000) unless
# STARS_MASTER_PORT is set.
#
# Signals: USR1 and TERM are ignored by torchrun (so it neither dies nor kills its workers
# with a 30 s deadline) and inherited as ignored by the payload's children; this wrapper
# traps both and sends them to the rank processes, which are expected to install handlers
# (checkpoint, exit 0). See docs/launch.md.
#
# Environment read here (all optional except under Slurm's own):
#   STARS_LAUNCH_MODE     torchrun | srun                      (torchrun)
#   STARS_MODULE          python module to run                 (stars_scale.cli.train)
#   STARS_PYTHON          python interpreter                   (python3)
#   STARS_NPROC_PER_NODE  torchrun workers per node            (1)
#   STARS_MASTER_ADDR     rendezvous host                      (head node, see above)
#   STARS_MASTER_PORT     rendezvous port                      (from the job id)
#   STARS_SOCKET_IFNAME   network interface for NCCL and gloo  (their own choice)
#   STARS_RDZV_TIMEOUT    seconds torchrun waits for all nodes (900)
set -uo pipefail

log() { echo "stars-srun[${SLURMD_NODENAME:-?}:${SLURM_PROCID:-?}]: $*" >&2; }

if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_PROCID:-}" ]]; then
    log "not inside a Slurm job step (SLURM_JOB_ID/SLURM_PROCID unset); run me through srun"
    exit 2
fi

MODE=${STARS_LAUNCH_MODE:-torchrun}
MODULE=${STARS_MODULE:-stars_scale.cli.train}
PYTHON=${STARS_PYTHON:-python3}

# Address of a Slurm node: its name if the name resolves, else its NodeAddr.
node_addr() {
    local name=$1 addr
    if getent hosts "$name" >/dev/null 2>&1; then
        echo "$name"
        return 0
    fi
    addr=$(scontrol show node "$name" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    if [[ -z $addr ]]; then
        log "cannot resolve node $name and scontrol shows no NodeAddr for it"
        return 1
    fi
    echo "$addr"
}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[[ -n $HEAD_NODE ]] || { log "scontrol show hostnames $SLURM_JOB_NODELIST gave nothing"; exit 2; }
if [[ -z "${STARS_MASTER_ADDR:-}" ]]; then
    STARS_MASTER_ADDR=$(node_addr "$HEAD_NODE") || exit 2
fi
STARS_MASTER_PORT=${STARS_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
NNODES=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}

# ---- the usual NCCL / gloo / threading environment (never overriding the user's)
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
if [[ -n "${STARS_SOCKET_IFNAME:-}" ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$STARS_SOCKET_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$STARS_SOCKET_IFNAME}
fi

case $MODE in
    torchrun)
        PROCS=${STARS_NPROC_PER_NODE:-1}
        if [[ "${SLURM_STEP_NUM_TASKS:-$NNODES}" != "$NNODES" ]]; then
            log "torchrun mode needs exactly one task per node (got ${SLURM_STEP_NUM_TASKS} tasks on $NNODES nodes)"
            exit 2
        fi
        LOCAL_ADDR=$(node_addr "${SLURMD_NODENAME:-$(hostname)}") || exit 2
        IS_HOST=0
        [[ "${SLURMD_NODENAME:-}" == "$HEAD_NODE" ]] && IS_HOST=1
        CMD=("$PYTHON" -m torch.distributed.run
            --nnodes="$NNODES" --nproc-per-node="$PROCS"
            --rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID"
            --rdzv-endpoint="$STARS_MASTER_ADDR:$STARS_MASTER_PORT"
            --rdzv-conf="is_host=$IS_HOST,join_timeout=${STARS_RDZV_TIMEOUT:-900}"
            --local-addr="$LOCAL_ADDR" --max-restarts=0
            -m "$MODULE" "$@")
        # torchrun keeps SIGINT/HUP/QUIT handling; TERM and USR1 go to the workers (below).
        # Left to itself it would answer TERM by killing the workers after 30 s. torchrun
        # reads PET_SIGNALS_TO_HANDLE (its --signals-to-handle) and exports it as
        # TORCHELASTIC_SIGNALS_TO_HANDLE; older versions only read the latter.
        export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
        export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
        ;;
    srun)
        PROCS=${SLURM_NTASKS_PER_NODE:-1}
        PROCS=${PROCS%%(*}  # "2(x4)" forms from heterogeneous layouts: first count
        export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS
        export LOCAL_RANK=${SLURM_LOCALID:-0} LOCAL_WORLD_SIZE=$PROCS
        export GROUP_RANK=${SLURM_NODEID:-0}
        export MASTER_ADDR=$STARS_MASTER_ADDR MASTER_PORT=$STARS_MASTER_PORT
        CMD=("$PYTHON" -m "$MODULE" "$@")
        ;;
    *)
        log "STARS_LAUNCH_MODE must be torchrun or srun, got '$MODE'"
        exit 2
        ;;
esac

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cpus=${SLURM_CPUS_ON_NODE:-1}
    cpus=${cpus%%(*}
    threads=$((cpus / PROCS))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

log "mode $MODE, $NNODES node(s), head $HEAD_NODE at $STARS_MASTER_ADDR:$STARS_MASTER_PORT, module $MODULE"

# The payload runs with USR1/TERM ignored (inherited through exec and fork); the rank
# processes install their own handlers. This shell forwards the signals it receives.
(
    trap '' USR1 TERM
    exec "${CMD[@]}"
) &
CHILD=$!

# Direct children of a pid (pgrep where installed, else /proc).
children_of() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$1"
        return 0
    fi
    local parent=$1 stat fields
    for stat in /proc/[0-9]*/stat; do
        fields=$(<"$stat") 2>/dev/null || continue
        read -r -a fields <<<"${fields##*) }"  # state ppid ...
        if [[ ${fields[1]:-} == "$parent" ]]; then
            stat=${stat#/proc/}
            echo "${stat%/stat}"
        fi
    done
    return 0
}

forward() {
    local sig=$1 targets
    if [[ $MODE == torchrun ]]; then
        targets=$(children_of "$CHILD" | tr '\n' ' ')  # the torchrun workers
    else
        targets=$CHILD
    fi
    log "got SIG$sig; forwarding to ${targets:-nobody (no workers yet)}"
    # shellcheck disable=SC2086
    [[ -n $targets ]] && kill -s "$sig" $targets 2>/dev/null
    return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the
# child has really exited, then return its status.
wait_child() {
    local pid=$1 rc rc2
    while :; do
        wait "$pid"
        rc=$?
        if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        if ((rc > 128)); then
            wait "$pid" 2>/dev/null
            rc2=$?
            ((rc2 != 127)) && rc=$rc2
        fi
        return "$rc"
    done
}

wait_child "$CHILD"
rc=$?
log "payload exited with status $rc"
exit "$rc"
