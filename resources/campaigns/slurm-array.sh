#!/bin/bash
# Runs a campaign as a Slurm job array: task i runs shard i of N, then a dependent job
# merges the slices.
#
#   jid=$(sbatch --parsable resources/campaigns/slurm-array.sh resources/campaigns/probe.toml)
#   sbatch --dependency=afterany:$jid --wrap "faultvisor merge --out results/all results/shard-*"
#
#SBATCH --job-name=faultvisor-campaign
#SBATCH --array=0-7
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --constraint=kvm
set -euo pipefail
campaign=${1:?usage: sbatch slurm-array.sh CAMPAIGN.toml}
shards=$((SLURM_ARRAY_TASK_MAX + 1))
faultvisor campaign "$campaign" --jobs "$SLURM_CPUS_PER_TASK" \
    --shard "${SLURM_ARRAY_TASK_ID}/${shards}" --seed 2026 \
    --out "results/shard-${SLURM_ARRAY_TASK_ID}"
