"""The darts_fisher pipeline: grow a difficult student into its own teacher (the paper's
second table).

Stages, each skipped when its output exists and resumed from its checkpoints when it
was killed (``WORKDIR`` layout in brackets):

1. train the student alone, per seed — the table's N/A row   [student/seed<s>/]
2. per-channel Fisher of the trained student                  [fisher/seed<s>.json]
3. build the teachers from the trained student: ``depth`` (more layers), ``uniform``
   (every cell widened to ≈2× parameters), ``fisher`` (the cell holding the most
   important channel widened, repeatedly, to ≈2×)             [teachers/<kind>/seed<s>/grown.json]
4. train each teacher, from scratch or from the grown weights  [teachers/<kind>/seed<s>/]
5. distill the student from each teacher with attention transfer [pairs/<kind>/seed<s>/]
6. the report: Teacher | Student | Top-1 | Top-5 (mean ± std over seeds) with each
   teacher's parameter count                                   [report.md, report.csv]
7. the attention figure: test images, the student's maps with no teacher and with each
   teacher, and the teachers' own maps                         [attention.png]

Stages 1-5 of one seed do not depend on other seeds, so ``launch/sweep.py --shard=i/n``
runs the seeds ``seeds[i::n]`` in one process each and ``--report_only`` writes stages
6-7 over the finished seeds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from distill_jax import checkpoint as ckpt_lib
from distill_jax import data as data_lib
from distill_jax import figures
from distill_jax import fisher as fisher_lib
from distill_jax import grow as grow_lib
from distill_jax import losses
from distill_jax import models
from distill_jax import sweeps
from distill_jax import teacher as teacher_lib
from distill_jax import train as train_lib
from distill_jax import validation

TEACHER_KINDS = ('depth', 'uniform', 'fisher')
TEACHER_INITS = ('scratch', 'grown')


def validate(config: ml_collections.ConfigDict) -> None:
  """Pipeline-level checks (each run's own config is checked again before it starts)."""
  for kind in config.teachers:
    if kind not in TEACHER_KINDS:
      raise validation.ConfigError(
          f'config.teachers has {kind!r}; allowed: {", ".join(TEACHER_KINDS)}')
  if not config.seeds:
    raise validation.ConfigError('config.seeds=() is invalid: give at least one seed')
  validation.check_choice(config, 'growth.teacher_init', TEACHER_INITS)
  validation.check_choice(config, 'growth.operator', ('widen', 'denser'))
  validation.check_positive(config, 'growth.target_param_ratio')
  validation.check_positive(config, 'growth.depth_layers')
  validation.check_positive(config, 'fisher.num_batches')
  validation.check_positive(config, 'fisher.batch_size')
  if config.model.name != 'darts':
    raise validation.ConfigError(
        f'config.model.name={config.model.name!r} is invalid: the pipeline grows a DARTS student')


def _input_shape(config) -> tuple[int, ...]:
  return (1, *data_lib.IMAGE_SHAPES[config.data.name])


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=_jsonable)
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return str(x)


def _plain(model_config) -> dict:
  d = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


class Pipeline:
  """The stages of one pipeline workdir; every method is idempotent."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.student_model = _plain(config.model)
    self._dataset = None

  # Paths ---------------------------------------------------------------------------
  def student_dir(self, seed: int) -> str:
    return os.path.join(self.workdir, 'student', f'seed{seed}')

  def fisher_path(self, seed: int) -> str:
    return os.path.join(self.workdir, 'fisher', f'seed{seed}.json')

  def teacher_dir(self, kind: str, seed: int) -> str:
    return os.path.join(self.workdir, 'teachers', kind, f'seed{seed}')

  def pair_dir(self, kind: str, seed: int) -> str:
    return os.path.join(self.workdir, 'pairs', kind, f'seed{seed}')

  @property
  def dataset(self) -> data_lib.Dataset:
    if self._dataset is None:
      c = self.config
      self._dataset = data_lib.load_dataset(c.data.name, data_dir=c.data.data_dir or None)
    return self._dataset

  # Stage 1 and 4/5: training runs -------------------------------------------------
  def run_config(self, model: dict, seed: int, **distill) -> ml_collections.ConfigDict:
    return sweeps.run_config(self.config, model, seed, **distill)

  def train(self, model: dict, seed: int, workdir: str, **kwargs) -> dict:
    if sweeps.is_done(workdir):
      return json.load(open(os.path.join(workdir, train_lib.RESULTS_FILE)))
    logging.info('Pipeline: training %s in %s', sweeps.display_name(model), workdir)
    return train_lib.train_and_evaluate(self.run_config(model, seed), workdir, **kwargs)

  def student_variables(self, seed: int) -> dict:
    teacher = teacher_lib.load_teacher(self.student_model, self.student_dir(seed),
                                       _input_shape(self.config))
    return teacher.variables

  # Stage 2: Fisher ------------------------------------------------------------------
  def fisher_batches(self, seed: int) -> list[tuple[jax.Array, jax.Array]]:
    c, d = self.config.fisher, self.dataset
    n = min(c.num_batches * c.batch_size, len(d.train_labels))
    order = np.random.default_rng(seed).permutation(len(d.train_labels))[:n]
    images = data_lib.normalize(jnp.asarray(d.train_images[order]), d.mean, d.std)
    labels = jnp.asarray(d.train_labels[order])
    return [(images[i:i + c.batch_size], labels[i:i + c.batch_size])
            for i in range(0, n, c.batch_size)]

  def fisher_fn(self, seed: int):
    batches = self.fisher_batches(seed)

    def estimate(model_config, variables):
      return fisher_lib.accumulate_fisher(models.create_model(**model_config), variables, batches)

    return estimate

  def student_fisher(self, seed: int) -> dict:
    path = self.fisher_path(seed)
    if not os.path.exists(path):
      fisher = self.fisher_fn(seed)(self.student_model, self.student_variables(seed))
      _write_json(path, {'cell_totals': fisher_lib.cell_totals(fisher),
                         'channels': {k: np.asarray(v) for k, v in fisher.items()}})
    with open(path) as f:
      return {k: jnp.asarray(v) for k, v in json.load(f)['channels'].items()}

  # Stage 3: growth ------------------------------------------------------------------
  def grown_path(self, kind: str, seed: int) -> str:
    return os.path.join(self.teacher_dir(kind, seed), 'grown.json')

  def grown_variables_path(self, kind: str, seed: int) -> str:
    return os.path.join(self.teacher_dir(kind, seed), 'grown_variables')

  def build_teacher(self, kind: str, seed: int) -> dict:
    """The teacher's model config (grown once, then read back from grown.json)."""
    path = self.grown_path(kind, seed)
    if not os.path.exists(path):
      g = self.config.growth
      student_variables = self.student_variables(seed)
      kwargs = dict(strategy=kind, target_param_ratio=g.target_param_ratio,
                    function_preserving=g.function_preserving, rng=jax.random.key(seed),
                    input_shape=_input_shape(self.config))
      if kind == 'depth':
        kwargs['layers'] = g.depth_layers
      else:
        kwargs['operator'] = g.operator
      if kind == 'fisher':
        self.student_fisher(seed)
        kwargs['fisher'] = self.fisher_fn(seed)
      grown_config, grown_variables, history = grow_lib.grow_with_history(
          self.student_model, student_variables, **kwargs)
      if g.teacher_init == 'grown':
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.grown_variables_path(kind, seed), grown_variables)
        checkpointer.wait_until_finished()
      shapes = models.param_shapes(models.create_model(**grown_config), _input_shape(self.config))
      _write_json(path, {'model': grown_config, 'history': history,
                         'num_params': models.count_params(shapes['params']),
                         'student_params': models.count_params(student_variables['params'])})
    with open(path) as f:
      return _plain(json.load(f)['model'])

  def teacher_initial_variables(self, kind: str, seed: int) -> dict | None:
    if self.config.growth.teacher_init != 'grown' or sweeps.is_done(self.teacher_dir(kind, seed)):
      return None
    restored = ckpt_lib.restore_local(self.grown_variables_path(kind, seed))
    return jax.tree.map(np.asarray, {'params': restored['params'],
                                     'batch_stats': restored['batch_stats']})

  def teacher_name(self, kind: str, model: dict) -> str:
    base = sweeps.display_name(model)
    return {'depth': base, 'uniform': f'{base}-u', 'fisher': f'{base}-f'}[kind]

  # The whole pipeline ------------------------------------------------------------------
  def run(self, *, shard: int = 0, num_shards: int = 1) -> str:
    """Every stage for the seeds of this shard (``seeds[shard::num_shards]``); the report
    and the figure only when one process runs every seed (else :meth:`finish` writes them)."""
    c = self.config
    for seed in c.seeds[shard::num_shards]:
      self.train(self.student_model, seed, self.student_dir(seed))
      if 'fisher' in c.teachers:
        self.student_fisher(seed)
      for kind in c.teachers:
        model = self.build_teacher(kind, seed)
        self.train(model, seed, self.teacher_dir(kind, seed),
                   initial_variables=self.teacher_initial_variables(kind, seed))
      for kind in c.teachers:
        workdir = self.pair_dir(kind, seed)
        if not sweeps.is_done(workdir):
          teacher_model = self.build_teacher(kind, seed)
          config = self.run_config(self.student_model, seed, method=c.distill.method,
                                   teacher_model=teacher_model,
                                   teacher_workdir=self.teacher_dir(kind, seed))
          teacher = teacher_lib.load_teacher(teacher_model, self.teacher_dir(kind, seed),
                                             _input_shape(c))
          train_lib.train_and_evaluate(config, workdir, teacher=teacher)
    if num_shards == 1:
      self.finish()
    return os.path.join(self.workdir, 'report.md')

  def finished_seeds(self) -> list[int]:
    """The seeds whose student and every distilled pair have finished."""
    return [s for s in self.config.seeds if sweeps.is_done(self.student_dir(s)) and all(
        sweeps.is_done(self.pair_dir(kind, s)) for kind in self.config.teachers)]

  def finish(self) -> str:
    """The report of the finished seeds and (once) the attention figure, from process 0."""
    seeds = self.finished_seeds()
    if not seeds:
      raise validation.ConfigError(
          f'no seed of config.seeds={tuple(self.config.seeds)} has finished in {self.workdir}; '
          'run the pipeline (or its shards) first')
    if jax.process_index() == 0:
      self.report(seeds)
      if not os.path.exists(os.path.join(self.workdir, 'attention.png')):
        self.attention_figure(seeds[0])
    return os.path.join(self.workdir, 'report.md')

  def report(self, seeds: Sequence[int] | None = None) -> str:
    """report.md / report.csv over ``seeds`` (default: all of ``config.seeds``)."""
    c = self.config
    seeds = list(c.seeds if seeds is None else seeds)
    student = sweeps.display_name(self.student_model)
    runs = [sweeps.RunSpec(name='', workdir=self.student_dir(s), config=None, stage=0,
                           teacher=sweeps.NO_TEACHER, student=student, seed=s) for s in seeds]
    teacher_params = {sweeps.NO_TEACHER: '-'}
    for kind in c.teachers:
      for s in seeds:
        model = self.build_teacher(kind, s)
        name = self.teacher_name(kind, model)
        runs.append(sweeps.RunSpec(name='', workdir=self.pair_dir(kind, s), config=None, stage=1,
                                   teacher=name, student=student, seed=s))
        with open(self.grown_path(kind, s)) as f:
          teacher_params.setdefault(name, []).append(json.load(f)['num_params'])
    rows = sweeps.report_rows(runs)
    fmt = lambda r: (teacher_params[r['teacher']] if r['teacher'] == sweeps.NO_TEACHER
                     else f'{int(np.mean(teacher_params[r["teacher"]])):,}')
    for r in rows:
      r['teacher_params'] = fmt(r)
    return sweeps.write_report(
        rows, self.workdir, title='Growing a difficult student into its teacher',
        extra_columns={'Teacher params': lambda r: r['teacher_params'],
                       'Student params': lambda r: f'{r["student_params"]:,}'})

  def attention_figure(self, seed: int | None = None) -> str:
    """Maps at ``figure.point`` for the first ``figure.num_images`` test images of one
    seed's runs (default: the first of ``config.seeds``)."""
    c, d = self.config, self.dataset
    seed = c.seeds[0] if seed is None else seed
    images = jnp.asarray(d.test_images[:c.figure.num_images])
    x = data_lib.normalize(images, d.mean, d.std)
    shape = _input_shape(c)

    def maps(model_config, workdir):
      net = teacher_lib.load_teacher(model_config, workdir, shape)
      _, points = net.model.apply(net.variables, x, train=False)
      point = points[c.figure.point]
      return np.asarray(losses.attention_map(point)).reshape(point.shape[0], *point.shape[1:3])

    columns = [('student, no teacher', maps(self.student_model, self.student_dir(seed)))]
    teachers = []
    for kind in c.teachers:
      model = self.build_teacher(kind, seed)
      name = self.teacher_name(kind, model)
      columns.append((f'student <- {name}', maps(self.student_model, self.pair_dir(kind, seed))))
      teachers.append((f'teacher {name}', maps(model, self.teacher_dir(kind, seed))))
    return figures.attention_figure(
        os.path.join(self.workdir, 'attention.png'), np.asarray(images) / 255.0,
        columns + teachers, title=f'Attention maps at point {c.figure.point} (seed {seed})')
