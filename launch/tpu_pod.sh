#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM pod slice; JAX forms one mesh
# over all chips (jax.distributed.initialize() on every worker, DISTILL_JAX_DISTRIBUTED=1).
# The workdir should be a gs:// bucket or a shared filesystem.
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/teacher_student.py gs://bucket/grid
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]}
config=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]}
workdir=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]}
shift 4
# Every argument is quoted for the workers' shell: a space or ';' in a path stays in it.
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/distill_jax && pip install -q -e . 'jax[tpu]' &&
  DISTILL_JAX_DISTRIBUTED=1 python -m distill_jax.main${args}"
