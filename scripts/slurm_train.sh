#!/usr/bin/env bash
# Multi-node cmgen training under SLURM, through Accelerate (no home-made launcher).
#
# One SLURM task per node; each task runs `accelerate launch` for every GPU of its node, all with the
# same config file and overrides as a single-GPU run:
#
#   sbatch --nodes 2 --gpus-per-node 4 scripts/slurm_train.sh configs/videomoco/ucf101.yaml run.name=vm
#   salloc --nodes 2 --gpus-per-node 4, then: scripts/slurm_train.sh CONFIG [key=value ...]
#
# Started as the batch script (or from salloc), it re-runs itself once per node with srun. On each node:
#   main process address  = first host of $SLURM_JOB_NODELIST (scontrol show hostnames)
#   machine rank          = $SLURM_NODEID
#   processes per node    = $GPUS_PER_NODE, else $SLURM_GPUS_ON_NODE, else `nvidia-smi -L` lines, else 1
#   port                  = $MAIN_PORT, else 29500 + SLURM_JOB_ID % 1000 (the same on every node)
# Environment:
#   ACCELERATE_CONFIG=FILE  an `accelerate config` file (scripts/accelerate_config.example.yaml) instead of
#                           --multi_gpu; SLURM's per-node values above are still passed and take precedence
#   ACCELERATE=PATH         the accelerate executable (default: accelerate on PATH)
#   CMGEN_DRY_RUN=1         print the command(s) instead of running them (tests/test_multinode.py)
#
#SBATCH --job-name=cmgen
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: scripts/slurm_train.sh CONFIG [key=value ...]  (inside a SLURM allocation)" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    echo "slurm_train.sh: not inside a SLURM allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST unset);" \
         "use sbatch or salloc, or run 'accelerate launch -m cmgen train CONFIG' directly" >&2
    exit 2
fi

dry_run="${CMGEN_DRY_RUN:-0}"
nnodes="${SLURM_NNODES:-1}"

# The batch step (or an salloc shell) runs on one node only: start one task per node.
if [ -z "${CMGEN_SLURM_NODE_TASK:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
    srun_cmd=(srun --nodes "$nnodes" --ntasks-per-node 1 --kill-on-bad-exit=1
              env CMGEN_SLURM_NODE_TASK=1 bash "$0" "$@")
    if [ "$dry_run" = "1" ]; then
        printf '%q ' "${srun_cmd[@]}"
        printf '\n'
    else
        exec "${srun_cmd[@]}"
    fi
fi

main_ip="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
node_rank="${SLURM_NODEID:-0}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
if [ -z "$gpus" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L | wc -l)"
    else
        gpus=1
    fi
fi
port="${MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
total=$((gpus * nnodes))

cmd=("${ACCELERATE:-accelerate}" launch)
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
    cmd+=(--config_file "$ACCELERATE_CONFIG")
elif [ "$total" -gt 1 ]; then
    # Precision and compilation are the cmgen config's (train.mixed_precision, train.compile).
    cmd+=(--multi_gpu --mixed_precision no --dynamo_backend no)
fi
cmd+=(--num_machines "$nnodes" --num_processes "$total" --machine_rank "$node_rank"
      --main_process_ip "$main_ip" --main_process_port "$port" --same_network
      -m cmgen train "$@")

if [ "$dry_run" = "1" ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    exec "${cmd[@]}"
fi
