#!/usr/bin/env bash
# A Ray cluster over the nodes of the current SLURM job, then one command on its head node:
#   bash cppo/backends/verl/ray_slurm.sh python -m cppo.backends.verl.train --config run.yaml
# The job's first node (where this script runs) is the head; srun starts one Ray worker on
# every other node. The command (verl's driver) joins the cluster through RAY_ADDRESS; verl
# then places its workers on all nodes (trainer.nnodes x trainer.n_gpus_per_node GPUs).
# Environment: SLURM_JOB_NODELIST, SLURM_JOB_ID (set by SLURM); RAY_PORT (default 6379 plus
# the job id modulo 1000, so that two jobs sharing a node do not collide); GPUS_PER_NODE
# (default: the job's SLURM_GPUS_ON_NODE, else 8).
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
: "${SLURM_JOB_NODELIST:?not inside a SLURM job (SLURM_JOB_NODELIST is unset)}"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
port=${RAY_PORT:-$((6379 + ${SLURM_JOB_ID:-0} % 1000))}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
address="$head_ip:$port"

cleanup() {
    srun --overlap --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" ray stop --force >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "ray head: $head_node ($address), ${#nodes[@]} node(s), $gpus GPU(s) each" >&2
srun --overlap --nodes=1 --ntasks=1 -w "$head_node" \
    ray start --head --node-ip-address="$head_ip" --port="$port" --num-gpus="$gpus" --block &
sleep "${RAY_HEAD_WAIT_S:-10}"
for node in "${nodes[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$address" --num-gpus="$gpus" --block &
done
sleep "${RAY_WORKER_WAIT_S:-10}"

RAY_ADDRESS="$address" "$@"
