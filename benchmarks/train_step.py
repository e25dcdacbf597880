r"""Images/s of the jitted train step: a student alone and a KD + AT student with its teacher.

  python benchmarks/train_step.py --json /tmp/train_step.json
  python benchmarks/train_step.py --pairs=wrn --batch=128 --repeats=20

Pairs: ``wrn`` (WRN-16-2 student, WRN-40-2 teacher) and ``darts`` (DARTS_V1 10-cell,
C=16 student; a teacher of the same genotype with every cell's channels scaled so it has
about 2x the parameters); ``darts_teacher`` (that teacher alone); ``wrn40`` (WRN-40-2
alone, whose step time gives
``recipe_200_epochs_minutes``: 200 CIFAR-10 epochs of 50,000 images at ``--batch``, plus
one compilation, without evaluation). CIFAR-sized inputs (32x32x3), steady state after compilation
(median over ``--repeats`` steps, each waited for), compile time separately, peak device
memory where the backend reports it. ``--dtype=bfloat16`` computes in bfloat16,
``--impl`` picks the DARTS operations, ``--toy`` shrinks every network for a CPU smoke run.
The step is the trainer's own
(``distill_jax.trainers.steps.train_step``: augmentation, forward, loss, backward, SGD update).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import optax

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import models
from distill_jax.trainers import steps as steps_lib

flags.DEFINE_list('pairs', ['wrn', 'darts', 'wrn40'], 'Student/teacher pairs to time.')
flags.DEFINE_integer('batch', 128, 'Global batch size.')
flags.DEFINE_integer('repeats', 10, 'Timed steps after compilation.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (parameters stay float32).')
flags.DEFINE_enum('impl', 'auto', ['auto', 'fast', 'lax'], 'DARTS operations (darts pairs only).')
flags.DEFINE_list('modes', ['student', 'kd_at'], 'Steps to time: the student alone, KD + AT.')
flags.DEFINE_bool('toy', False, 'Tiny networks (WRN-10-1/-2, 3-cell DARTS): a CPU smoke run.')
flags.DEFINE_string('json', '', 'Write the figures here as JSON.')
FLAGS = flags.FLAGS

PAIRS = {
    'wrn': (dict(name='wrn', depth=16, widen_factor=2), dict(name='wrn', depth=40, widen_factor=2)),
    # 2x the student's parameters: every cell's C scaled by ~1.42 (uniform growth).
    'darts': (dict(name='darts', genotype='DARTS_V1', layers=10, init_channels=16),
              dict(name='darts', genotype='DARTS_V1', layers=10, init_channels=16,
                   cell_channels=(22, 22, 22, 46, 46, 46, 92, 92, 92, 92))),
    # WRN-40-2 trained alone: its step time gives the time of the 200-epoch CIFAR-10 recipe.
    'wrn40': (dict(name='wrn', depth=40, widen_factor=2), None),
}
# The darts pair's teacher trained alone (the darts_fisher pipeline's teacher runs).
PAIRS['darts_teacher'] = (PAIRS['darts'][1], None)
TOY_PAIRS = {
    'wrn': (dict(name='wrn', depth=10, widen_factor=1), dict(name='wrn', depth=10, widen_factor=2)),
    'darts': (dict(name='darts', genotype='DARTS_V1', layers=3, init_channels=4),
              dict(name='darts', genotype='DARTS_V1', layers=3, init_channels=4,
                   cell_channels=(6, 12, 24))),
    'wrn40': (dict(name='wrn', depth=10, widen_factor=1), None),
}
TOY_PAIRS['darts_teacher'] = (TOY_PAIRS['darts'][1], None)
CIFAR_TRAIN_IMAGES = 50_000
RECIPE_EPOCHS = 200


def make_runner(pair: str, mode: str, batch_size: int, *, compute_dtype: str = 'float32',
                impl: str = 'auto', toy: bool = False):
  """The trainer's jitted step for ``pair`` (``mode`` 'student' or 'kd_at') on all devices;
  ``impl`` sets the DARTS networks' operations, ``toy`` takes :data:`TOY_PAIRS`.

  Returns ``(first_step_s, run)``: the first call's seconds (compilation included) and a
  function that runs one more step, waits for it and returns its seconds.
  """
  student_cfg, teacher_cfg = (TOY_PAIRS if toy else PAIRS)[pair]
  if student_cfg['name'] == 'darts':
    student_cfg = {**student_cfg, 'impl': impl}
    teacher_cfg = teacher_cfg and {**teacher_cfg, 'impl': impl}
  mesh = data_lib.make_mesh()
  shape = (1, 32, 32, 3)
  rng = np.random.default_rng(0)
  batch = data_lib.shard_global_batch({
      'image': rng.integers(0, 256, (batch_size, 32, 32, 3)).astype(np.uint8),
      'label': rng.integers(0, 10, (batch_size,)).astype(np.int32)}, mesh)
  dtype = {'dtype': models.compute_dtype(compute_dtype)}
  student = models.create_model(**student_cfg, **dtype, num_classes=10)
  teacher = models.create_model(**teacher_cfg, **dtype, num_classes=10) if mode == 'kd_at' else None
  tx = optax.sgd(0.1, momentum=0.9)
  state = data_lib.replicate(steps_lib.create_train_state(
      models.init_variables(student, jax.random.key(0), shape), tx, 0), mesh)
  teacher_vars = (data_lib.replicate(models.init_variables(teacher, jax.random.key(1), shape), mesh)
                  if teacher else None)
  aug = ml_collections.ConfigDict(
      {'crop_padding': 4, 'flip': True, 'cutout': 0, 'pad_mode': 'constant'})
  distill = config_lib.distill_section('kd_at')  # the trainer's defaults: α 0.9, T 4, β 1000
  train_step, _ = steps_lib.compile_steps(
      mesh=mesh, model=student, tx=tx, schedule=optax.constant_schedule(0.1),
      augment=steps_lib.make_augment(aug, data_lib.CIFAR_MEAN, data_lib.CIFAR_STD),
      normalize=steps_lib.make_normalize(data_lib.CIFAR_MEAN, data_lib.CIFAR_STD),
      loss_fn=steps_lib.make_loss(distill if teacher else None), teacher_model=teacher)
  box = [state]

  def run() -> float:
    t0 = time.perf_counter()
    box[0], metrics = train_step(box[0], batch, teacher_vars)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  return run(), run


def measure_pair(pair, batch_size, repeats, *, compute_dtype='float32', impl='auto', toy=False,
                 modes=('student', 'kd_at')):
  result = {'pair': pair, 'batch': batch_size, 'devices': jax.device_count(),
            'dtype': compute_dtype, 'impl': impl, 'toy': toy}
  for mode in [m for m in modes if m == 'student' or PAIRS[pair][1]]:
    compile_s, run = make_runner(pair, mode, batch_size, compute_dtype=compute_dtype, impl=impl,
                                 toy=toy)
    step_s = statistics.median([run() for _ in range(repeats)])
    result[f'{mode}_compile_s'] = compile_s
    result[f'{mode}_step_s'] = step_s
    result[f'{mode}_images_per_s'] = batch_size / step_s
  if pair == 'wrn40':
    # Steady-state steps of the whole recipe (the last partial batch counted whole) plus
    # one compilation; evaluation passes are not included.
    steps = RECIPE_EPOCHS * -(-CIFAR_TRAIN_IMAGES // batch_size)
    result['recipe_200_epochs_minutes'] = (steps * result['student_step_s']
                                           + result['student_compile_s']) / 60
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['peak_device_bytes'] = stats['peak_bytes_in_use']
  return result


def main(argv):
  del argv
  bad_modes = [m for m in FLAGS.modes if m not in ('student', 'kd_at')]
  if bad_modes:
    raise app.UsageError(f'--modes: {bad_modes[0]!r} is not a mode; use student, kd_at')
  unknown = [p for p in FLAGS.pairs if p not in PAIRS]
  if unknown:
    raise app.UsageError(f'--pairs: {unknown[0]!r} is not a pair; use {", ".join(PAIRS)}')
  results = [measure_pair(p, FLAGS.batch, FLAGS.repeats, compute_dtype=FLAGS.dtype,
                          impl=FLAGS.impl, toy=FLAGS.toy, modes=FLAGS.modes) for p in FLAGS.pairs]
  for r in results:
    print(json.dumps(r, indent=1))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
                 'pairs': results}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
