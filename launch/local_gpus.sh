#!/usr/bin/env bash
# Spread the independent runs of a sweep config over the GPUs of one machine: one shard
# per GPU, each process seeing only its own GPU. The teacher x student grid is sharded by
# run (every n-th run), the darts_fisher pipeline by seed (every n-th seed, all its
# stages). Resumable: run it again after any failure; finished runs are skipped. The
# report is written at the end. Each shard's log is WORKDIR/shard<i>.log.
#
#   launch/local_gpus.sh configs/teacher_student.py /tmp/grid [extra --config.x=y flags]
#   launch/local_gpus.sh configs/darts_fisher.py /tmp/darts_fisher    # its seeds over the GPUs
#   NUM_GPUS=4 launch/local_gpus.sh configs/teacher_student.py:demo /tmp/grid_demo
set -euo pipefail
config=${1:?usage: launch/local_gpus.sh CONFIG WORKDIR [FLAGS...]}
workdir=${2:?usage: launch/local_gpus.sh CONFIG WORKDIR [FLAGS...]}
shift 2
num_gpus=${NUM_GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
num_gpus=$(( num_gpus > 0 ? num_gpus : 1 ))
cd "$(dirname "$0")/.."
mkdir -p -- "$workdir"
pids=()
for (( i = 0; i < num_gpus; i++ )); do
  CUDA_VISIBLE_DEVICES=$i python -m distill_jax.main --config="$config" --workdir="$workdir" \
      --shard="$i/$num_gpus" "$@" > "$workdir/shard$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python -m distill_jax.main --config="$config" --workdir="$workdir" --mode=report "$@"
exit $status
