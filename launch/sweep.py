r"""Runs a sweep config, or one shard of it: the teacher x student grid
(configs/teacher_student.py, sharded by run) or the darts_fisher pipeline
(configs/darts_fisher.py, sharded by seed: each seed's stages are independent).

  python launch/sweep.py --config=configs/teacher_student.py --workdir=/tmp/grid
  # spread over the 4 GPUs of one machine, one shard each:
  for i in 0 1 2 3; do
    CUDA_VISIBLE_DEVICES=$i python launch/sweep.py --config=configs/teacher_student.py \
        --workdir=/tmp/grid --shard=$i/4 &
  done; wait
  python launch/sweep.py --config=configs/teacher_student.py --workdir=/tmp/grid --report_only

Finished runs are skipped and killed runs resume, so the same command can be repeated
after any failure. A grid distillation run whose teacher belongs to another shard waits
for that teacher's results.json. ``--report_only`` writes report.md/report.csv (and the
pipeline's attention.png) from the finished runs.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Sweep directory (one sub-workdir per run).')
flags.DEFINE_string('shard', '0/1', 'i/n: run every n-th run starting at i.')
flags.DEFINE_bool('report_only', False, 'Only (re)write the report from finished runs.')
flags.DEFINE_integer('cpu_devices', 0, 'On a CPU: this many XLA devices (see distill_jax.main).')
config_flags.DEFINE_config_file('config', None, 'Sweep config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import sys  # pylint: disable=g-import-not-at-top
  from distill_jax import jobs  # pylint: disable=g-import-not-at-top
  shard, num_shards = (int(x) for x in FLAGS.shard.split('/'))
  if not 0 <= shard < num_shards:
    sys.exit(f'error: --shard={FLAGS.shard} is invalid: use i/n with 0 <= i < n')
  job = FLAGS.config.get('job', 'train')
  if job not in jobs.SHARDABLE_JOBS:
    sys.exit(f'error: config.job={job!r} is not a sweep; launch/sweep.py runs '
             f'{", ".join(jobs.SHARDABLE_JOBS)} configs (use distill_jax.main for the others)')
  try:
    jobs.setup_jax(cpu_devices=FLAGS.cpu_devices)
    jobs.SHARDABLE_JOBS[job](FLAGS.config, FLAGS.workdir,
                             mode='report' if FLAGS.report_only else 'train',
                             shard=shard, num_shards=num_shards)
  except jobs.USER_ERRORS as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
