r"""The cost of each distillation method: its train step's time relative to KD's, one pair.

  python benchmarks/methods.py --json /tmp/methods.json --markdown /tmp/methods.md
  python benchmarks/methods.py --methods=kd,crd,sp --repeats=10
  python benchmarks/methods.py --toy      # tiny networks and data: a smoke run (~2 min on CPU)

Every method of ``configs/distill.py`` alone (and ``none``, the student without a teacher)
trains WRN-16-2 under WRN-40-2 at batch 128 on CIFAR-sized inputs: the trainer's own step
(:func:`distill_jax.trainers.train.build_run`: augmentation, both networks, the method's loss
and learned parts, backward, SGD update; CRD with its memory bank of ``--num_train``
examples and the release's 16,384 negatives per example). FSP is timed with its term in the
step (``init_epochs=0``): with the release's recipe its cost is confined to the
initialisation stage, whose step is the same networks with the FSP loss alone. The teacher's
weights are random (the cost does not depend on them); the data are random CIFAR-sized
images registered as a dataset. Every method is compiled first, then the steps are timed
in rounds, one step of each method per round (a machine whose speed drifts slows all
methods alike). Reported per method: compile seconds, the median of ``--repeats``
waited-for steps, images/s and the median over rounds of its step time over KD's in the
same round (the zoo's target: at most 1.10 for a method without a memory bank, 1.3 for
CRD).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import models
from distill_jax.trainers import methods as methods_lib
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import train as train_lib

DEFAULT_METHODS = ('none', 'kd', 'at', 'kd_at', 'sp', 'nst', 'fsp', 'rkd', 'pkt', 'dkd', 'dist',
                   'fitnet', 'vid', 'cc', 'crd')
flags.DEFINE_list('methods', list(DEFAULT_METHODS), 'Methods to time (kd is always timed).')
flags.DEFINE_integer('batch', 128, 'Global batch size.')
flags.DEFINE_integer('repeats', 5, 'Timed steps after compilation (median reported).')
flags.DEFINE_integer('num_train', 50_000, "Training examples (CRD's memory bank rows).")
flags.DEFINE_bool('toy', False, 'WRN-10-2 under WRN-10-2, 2,000 examples, 1,024 negatives.')
flags.DEFINE_string('json', '', 'Write the figures here as JSON.')
flags.DEFINE_string('markdown', '', 'Write the table here as Markdown.')
FLAGS = flags.FLAGS

PAIR = ('wrn_16_2', 'wrn_40_2')
TOY_PAIR = ({'name': 'wrn', 'depth': 10, 'widen_factor': 2},
            {'name': 'wrn', 'depth': 10, 'widen_factor': 2})
DATASET = 'benchmark_cifar_sized'


def register_data(num_train: int) -> None:
  """Random uint8 CIFAR-sized images and labels under :data:`DATASET`."""
  def load():
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, num_train).astype(np.int32),
            rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 100).astype(np.int32))
  data_lib.register_dataset(DATASET, load)


def method_config(method: str, batch_size: int, toy: bool):
  """``configs/distill.py``'s config for ``method`` on the benchmark pair and data."""
  c = config_lib.train_config()
  config_lib.distill_fields(c, teacher=PAIR[1], method=method if method != 'none' else 'kd')
  c.model = config_lib.network(PAIR[0])
  if toy:
    c.model.update(TOY_PAIR[0])
    c.distill.teacher_model.update(TOY_PAIR[1])
  config_lib.set_method(c.distill, method if method != 'none' else 'kd')
  c.distill.init_epochs = 0  # FSP's term in the step (see the docstring)
  if toy:
    c.distill.nce_k = 1024
  c.data.name = DATASET
  c.batch_size = batch_size
  c.num_epochs = 1
  return c


def make_runner(method: str, batch_size: int, toy: bool):
  """``(first_step_s, run)``: the first step's seconds (compilation included) and a function
  that runs one more step of ``method``, waits for it and returns its seconds."""
  config = method_config(method, batch_size, toy)
  teacher = None
  if method != 'none':
    model = models.create_model(**config.distill.teacher_model)
    teacher = teacher_lib.Teacher(model, jax.device_get(
        models.init_variables(model, jax.random.key(1), (1, 32, 32, 3))))
  run = train_lib.build_run(config, teacher=teacher)
  n = run.data.num_examples('train')
  box = [run.state, 0]

  def step() -> float:
    idx = data_lib.train_indices(0, box[1], num_examples=n, batch_size=batch_size)
    batch = run.data.batch('train', idx)
    jax.block_until_ready(batch)
    t0 = time.perf_counter()
    box[0], metrics = run.train_step(box[0], batch, run.teacher_variables)
    jax.block_until_ready(metrics)
    box[1] += 1
    return time.perf_counter() - t0

  return step(), step, run.connector_params


def measure(methods, batch_size: int, repeats: int, toy: bool) -> list[dict]:
  """Every method compiled first, then timed in rounds (one step of each method per
  round), so a drift of the machine's speed falls on all methods alike; each method's
  ratio to KD is the median over rounds of its step over KD's step of the same round."""
  runners = {m: make_runner(m, batch_size, toy) for m in methods}
  times = {m: [] for m in methods}
  for _ in range(repeats):
    for method, (_, step, _) in runners.items():
      times[method].append(step())
  rows = []
  for method, (compile_s, _, connector_params) in runners.items():
    step_s = statistics.median(times[method])
    ratios = [t / k for t, k in zip(times[method], times['kd'])]
    rows.append({'method': method, 'compile_s': compile_s, 'step_s': step_s,
                 'images_per_s': batch_size / step_s,
                 'relative_to_kd': statistics.median(ratios),
                 'relative_range': (min(ratios), max(ratios)),
                 'connector_params': connector_params, 'steps_s': times[method]})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def markdown(rows: list[dict], header: str) -> str:
  lines = [header, '', '| Method | Step (s) | Images/s | × KD step | range over rounds | '
           'Compile (s) |', '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    low, high = r['relative_range']
    lines.append(f"| {r['method']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | "
                 f"{r['relative_to_kd']:.2f} | {low:.2f}–{high:.2f} | {r['compile_s']:.0f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  unknown = [m for m in FLAGS.methods if m not in methods_lib.NAMES]
  if unknown:
    raise app.UsageError(f'--methods: {unknown[0]!r} is not a method; use '
                         f'{", ".join(methods_lib.NAMES)}')
  methods = ['kd', *[m for m in FLAGS.methods if m != 'kd']]
  register_data(2_000 if FLAGS.toy else FLAGS.num_train)
  rows = measure(methods, FLAGS.batch, FLAGS.repeats, FLAGS.toy)
  header = (f'Train step by method: {"toy WRN-10-2 pair" if FLAGS.toy else "WRN-16-2 <- WRN-40-2"}'
            f', batch {FLAGS.batch}, {jax.device_count()} {jax.devices()[0].device_kind} '
            f'device(s), medians of {FLAGS.repeats} rounds')
  table = markdown(rows, header)
  print(table)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
                 'batch': FLAGS.batch, 'methods': rows}, f, indent=2)
  if FLAGS.markdown:
    with open(FLAGS.markdown, 'w') as f:
      f.write(table)


if __name__ == '__main__':
  app.run(main)
