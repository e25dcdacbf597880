"""The darts_fisher pipeline: grow a difficult student into its own teacher (the paper's
second table), as a list of memoised tasks per seed (:mod:`distill_jax.experiments.runs`).

Per seed (``WORKDIR`` layout in brackets), each task skipped when done and resumed from
its checkpoints when it was killed:

1. train the student alone — the table's N/A row               [student/seed<s>/]
2. per-channel Fisher of the trained student (``fisher.protocol='release'``: of a freshly
   initialised one, as the author's release measures)          [fisher/seed<s>.json]
3. build the teachers from the trained student: ``depth`` (more cells), ``uniform``
   (every cell widened to ≈2× parameters), ``fisher`` (the cell holding the most
   important channel widened, repeatedly, to ≈2×); ``growth.protocol='release'``: the
   release's densifying loop (:mod:`distill_jax.grow.release`)   [teachers/<kind>/seed<s>/grown.json]
4. train each teacher, from scratch or from the grown weights    [teachers/<kind>/seed<s>/]
5. distill the student from each teacher (``run.distill``)       [pairs/<kind>/seed<s>/]

then, over the finished seeds, the report — Teacher | Student | Top-1 | Top-5 (mean ± std
over seeds) with each teacher's own error and parameter count [report.md; report.csv one
row per run, report_summary.csv] — and the attention figure: test images, the student's
maps with no teacher and with each teacher, and the teachers' own maps [attention.png,
attention.pdf].

Every training run is a copy of ``config.run`` (the student's model and recipe) with its
model, seed and teacher changed. The seeds are independent, so ``--shard=i/n`` runs the
seeds ``seeds[i::n]`` and ``--mode=report`` writes the report and figure over the
finished seeds.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import fisher as fisher_lib
from distill_jax import grow as grow_lib
from distill_jax.grow import release as grow_release
from distill_jax import losses
from distill_jax import models
from distill_jax import validation
from distill_jax.experiments import figures
from distill_jax.experiments import runs
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import methods as methods_lib
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import train as train_lib
from distill_jax.trainers import workdir as workdir_lib

TEACHER_KINDS = ('depth', 'uniform', 'fisher')
# How the Fisher information is measured (distill_jax.fisher's module docstring).
FISHER_PROTOCOLS = ('trained', 'release')
TEACHER_INITS = ('scratch', 'grown')
# The paper's student (config_lib.NETWORKS); the report says when the student is another.
PAPER_STUDENT = 'darts_v1_10'
FIGURE_FILE = 'attention.png'  # and attention.pdf beside it


# Test-split sizes (the figure draws the first figure.num_images test images), and the
# most rows a figure takes: one row per image, 192 px each, under matplotlib's 65,536 px.
TEST_SPLIT_SIZES = {'digits': data_lib.DIGITS_TEST_SIZE, 'cifar10': 10_000, 'cifar100': 10_000}
FIGURE_MAX_IMAGES = 256


def validate(config: ml_collections.ConfigDict) -> None:
  """The pipeline's own fields, then every run's config, before any compute.

  ``growth.target_param_ratio`` must exceed 1 and ``growth.depth_layers`` the student's
  ``run.model.layers`` (a teacher bigger than the student); ``figure.num_images`` is at
  most the test split's size and :data:`FIGURE_MAX_IMAGES`; ``figure.point`` indexes the
  student's attention points, counted by ``jax.eval_shape`` (no compute).
  """
  for kind in config.teachers:
    if kind not in TEACHER_KINDS:
      raise validation.ConfigError(
          f'config.teachers has {kind!r}; allowed: {", ".join(TEACHER_KINDS)}')
  if len(set(config.teachers)) != len(config.teachers):
    validation.fail('teachers', tuple(config.teachers), 'each kind at most once')
  validation.check_seeds(config)
  validation.check_workdir_fields(config)
  if config.run.model.name != 'darts':
    raise validation.ConfigError(
        f'config.run.model.name={config.run.model.name!r} is invalid: the pipeline grows a '
        'DARTS student')
  validation.check_choice(config, 'run.distill.method', methods_lib.NAMES)
  validation.check_choice(config, 'growth.teacher_init', TEACHER_INITS)
  validation.check_choice(config, 'growth.operator', grow_lib.OPERATORS)
  validation.check_choice(config, 'growth.protocol', grow_lib.PROTOCOLS)
  validation.check_choice(config, 'fisher.protocol', FISHER_PROTOCOLS)
  validation.check_int(config, 'growth.param_goal', 0)
  if config.growth.protocol == 'release':
    if config.growth.operator != 'denser':
      validation.fail('growth.operator', config.growth.operator,
                      'growth.protocol=release densifies: use denser')
    if config.growth.function_preserving:
      validation.fail('growth.function_preserving', config.growth.function_preserving,
                      'growth.protocol=release rebuilds densified operations: use False')
  elif config.growth.param_goal:
    validation.fail('growth.param_goal', config.growth.param_goal,
                    '0 unless growth.protocol=release (protocol band uses target_param_ratio)')
  if config.growth.protocol == 'release' and {'uniform', 'fisher'} & set(config.teachers):
    _check_release_goal(config)
  if config.fisher.protocol == 'release' and config.growth.protocol != 'release':
    validation.fail('fisher.protocol', config.fisher.protocol,
                    'release needs growth.protocol=release (its SGD steps change the network '
                    'being grown)')
  validation.check_positive(config, 'growth.target_param_ratio')
  if config.growth.target_param_ratio <= 1:
    validation.fail('growth.target_param_ratio', config.growth.target_param_ratio,
                    'must be > 1: a teacher has more parameters than its student')
  validation.check_int(config, 'growth.depth_layers', 3)
  validation.check_bool(config, 'growth.function_preserving')
  validation.check_positive(config, 'fisher.num_batches', integer=True)
  validation.check_positive(config, 'fisher.batch_size', integer=True)
  validation.check_dataset(config.run)
  validation.check_int(config, 'figure.num_images', 1)
  most = min(TEST_SPLIT_SIZES[config.run.data.name], FIGURE_MAX_IMAGES)
  if config.figure.num_images > most:
    validation.fail('figure.num_images', config.figure.num_images,
                    f'at most {most} (the {config.run.data.name} test split has '
                    f'{TEST_SPLIT_SIZES[config.run.data.name]} images; a figure at most '
                    f'{FIGURE_MAX_IMAGES} rows)')
  validation.check_int(config, 'figure.point', 0)
  validation.check_model(config.run.model, 'run.model')
  if 'depth' in config.teachers and config.growth.depth_layers <= config.run.model.layers:
    validation.fail('growth.depth_layers', config.growth.depth_layers,
                    f'the depth teacher needs more cells than the student '
                    f'(run.model.layers={config.run.model.layers})')
  runs.validate_runs(Pipeline(config, '/').tasks(static_only=True))
  points = _num_attention_points(config.run)
  if config.figure.point >= points:
    validation.fail('figure.point', config.figure.point,
                    f'the student has {points} attention points: use 0..{points - 1}')


def _check_release_goal(config: ml_collections.ConfigDict) -> None:
  """The release's growth must be able to pass its bound: densifying every cell of the
  student reaches at most :func:`distill_jax.grow.release.densest_measure`."""
  student = grow_lib.Layout.from_config(_plain(config.run.model), _input_shape(config.run)[-1])
  n = student.state_dict_count()
  g = config.growth
  field, value = (('growth.param_goal', g.param_goal) if g.param_goal
                  else ('growth.target_param_ratio', g.target_param_ratio))
  goal = g.param_goal or g.target_param_ratio * n
  most = grow_release.densest_measure(student)
  if grow_release.lower_bound(goal) >= most:
    validation.fail(field, value, f'densifying every cell of the student ({n} by the release\'s '
                    f'measure) reaches {most}: the goal must be below {most / (1 - grow_release.GOAL_SLACK):.0f}'
                    f' ({most / (1 - grow_release.GOAL_SLACK) / n:.2f}x)')


def _num_attention_points(run_config) -> int:
  """How many attention points the run's model returns, from shapes alone."""
  model = models.create_model(**_plain(run_config.model))
  x = jax.ShapeDtypeStruct(_input_shape(run_config), jnp.float32)
  _, points = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)
  return len(points)


def _input_shape(run_config) -> tuple[int, ...]:
  return (1, *data_lib.dataset_info(run_config.data.name, run_config.data.data_dir or None)[1])


def _plain(model_config) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}


class Pipeline:
  """The tasks of one pipeline workdir; every method is idempotent."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.student_model = _plain(config.run.model)
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
      self._dataset = data_lib.load_dataset(c.run.data.name, data_dir=c.run.data.data_dir or None)
    return self._dataset

  def run_config(self, model: dict, seed: int, **teacher) -> ml_collections.ConfigDict:
    """A training run: ``config.run`` with ``model``, ``seed`` and (optionally) a teacher."""
    return runs.run_config(self.config.run, model=model, seed=seed,
                           allow_resume_changes=self.config.allow_resume_changes, **teacher)

  def grown_model(self, kind: str, seed: int) -> dict | None:
    """The teacher's model config once grown (from grown.json), else ``None``."""
    path = self.grown_path(kind, seed)
    return _plain(loop.read_json(path)['model']) if os.path.exists(path) else None

  def student_variables(self, seed: int) -> dict:
    student = teacher_lib.load_teacher(self.student_model, self.student_dir(seed),
                                       _input_shape(self.config.run), role='student')
    return student.variables

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
    """The Fisher estimator of ``fisher.protocol``: ``(model_config, variables) -> Δ``
    ('trained': the same batches every call), or ``-> (Δ, variables)`` ('release': each
    call draws ``fisher.num_batches`` fresh augmented batches, as the release's new
    loader iterator does, and takes the release's SGD step after each)."""
    if self.config.fisher.protocol == 'release':
      return self._release_fisher_fn(seed)
    batches = self.fisher_batches(seed)

    def estimate(model_config, variables):
      return fisher_lib.accumulate_fisher(models.create_model(**model_config), variables, batches)

    if self.config.growth.protocol == 'release':  # its loop takes (Δ, variables)
      return lambda model_config, variables: (estimate(model_config, variables), variables)
    return estimate

  def _release_fisher_fn(self, seed: int):
    c, d = self.config, self.dataset
    calls = iter(range(1 << 30))

    def estimate(model_config, variables):
      model = models.create_model(**model_config)
      key = jax.random.fold_in(jax.random.key(seed), next(calls))
      total = None
      for b in range(c.fisher.num_batches):
        k_batch, k_aug, k_step = jax.random.split(jax.random.fold_in(key, b), 3)
        order = jax.random.permutation(k_batch, len(d.train_labels))[:c.fisher.batch_size]
        order = np.asarray(order)
        images = data_lib.augment(jnp.asarray(d.train_images[order]), k_aug,
                                  crop_padding=c.run.data.crop_padding, flip=c.run.data.flip,
                                  mean=d.mean, std=d.std)
        delta, variables = fisher_lib.release_fisher_step(
            model, variables, images, jnp.asarray(d.train_labels[order]), k_step)
        total = delta if total is None else jax.tree.map(jnp.add, total, delta)
      return total, variables  # the release sums Δ over its batches

    return estimate

  def growth_start_variables(self, seed: int) -> dict:
    """The network growth starts from: the trained student, or with ``fisher.protocol=
    'release'`` a freshly initialised one (key ``seed``), as the release grows."""
    if self.config.fisher.protocol == 'release':
      return models.init_variables(models.create_model(**self.student_model),
                                   jax.random.key(seed), _input_shape(self.config.run))
    return self.student_variables(seed)

  def student_fisher(self, seed: int) -> dict:
    """Δ of the student growth starts from (the release: its first measurement)."""
    path = self.fisher_path(seed)
    if not os.path.exists(path):
      fisher = self.fisher_fn(seed)(self.student_model, self.growth_start_variables(seed))
      if isinstance(fisher, tuple):
        fisher = fisher[0]
      loop.write_json(path, {'cell_totals': fisher_lib.cell_totals(fisher),
                             'channels': {k: np.asarray(v) for k, v in fisher.items()}})
    return {k: jnp.asarray(v) for k, v in loop.read_json(path)['channels'].items()}

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
      student_variables = (self.student_variables(seed) if kind == 'depth'
                           else self.growth_start_variables(seed))
      kwargs = dict(strategy=kind, target_param_ratio=g.target_param_ratio,
                    function_preserving=g.function_preserving, rng=jax.random.key(seed),
                    input_shape=_input_shape(self.config.run))
      if kind == 'depth':
        kwargs['layers'] = g.depth_layers
      else:
        kwargs.update(operator=g.operator, protocol=g.protocol,
                      param_goal=g.param_goal or None)
      if kind == 'fisher':
        self.student_fisher(seed)
        kwargs['fisher'] = self.fisher_fn(seed)
      grown_config, grown_variables, history = grow_lib.grow_with_history(
          self.student_model, student_variables, **kwargs)
      if g.teacher_init == 'grown':
        # grown.json is written last: weights without it are a killed growth's, redone.
        shutil.rmtree(self.grown_variables_path(kind, seed), ignore_errors=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.grown_variables_path(kind, seed), grown_variables)
        checkpointer.wait_until_finished()
      shapes = models.param_shapes(models.create_model(**grown_config), _input_shape(self.config.run))
      loop.write_json(path, {'model': grown_config, 'history': history,
                             'num_params': models.count_params(shapes['params']),
                             'student_params': models.count_params(student_variables['params'])})
    return _plain(loop.read_json(path)['model'])

  def teacher_initial_variables(self, kind: str, seed: int) -> dict | None:
    if self.config.growth.teacher_init != 'grown' or runs.is_done(self.teacher_dir(kind, seed)):
      return None
    restored = ckpt_lib.restore_local(self.grown_variables_path(kind, seed))
    return jax.tree.map(np.asarray, {'params': restored['params'],
                                     'batch_stats': restored['batch_stats']})

  def teacher_name(self, kind: str) -> str:
    """The table's name of a teacher, known before it is grown."""
    if kind == 'depth':
      return runs.display_name({**self.student_model, 'layers': self.config.growth.depth_layers})
    return runs.display_name(self.student_model) + '-' + kind[0]

  # The tasks ------------------------------------------------------------------------
  def tasks(self, seeds: Sequence[int] | None = None, *, static_only: bool = False
            ) -> list[runs.Task]:
    """Every task of ``seeds`` (default: ``config.seeds``) in order, grouped by seed.

    ``static_only``: give the teacher and pair tasks configs with the student standing in
    for the teachers (grown only by the growth tasks), to validate every run's config
    before anything is computed.
    """
    c = self.config
    seeds = list(c.seeds if seeds is None else seeds)
    student = runs.display_name(self.student_model)
    out = []
    for group, seed in enumerate(seeds):
      def add(name, path, compute, *, seed=seed, group=group, **kwargs):
        out.append(runs.Task(name=f'{name} seed {seed}', path=path, compute=compute, group=group,
                             seed=seed, **kwargs))

      student_dir = self.student_dir(seed)
      config = self.run_config(self.student_model, seed)
      add('student', student_dir, functools.partial(train_lib.run, config, student_dir),
          config=config, teacher=runs.NO_TEACHER, student=student, row=True)
      if 'fisher' in c.teachers:
        add('fisher', self.fisher_path(seed), functools.partial(self.student_fisher, seed),
            needs=(student_dir,), is_run=False)
      for kind in c.teachers:
        add(f'grow {kind}', self.grown_path(kind, seed),
            functools.partial(self.build_teacher, kind, seed), needs=(student_dir,),
            is_run=False)
      # A teacher's config is known once it is grown; before that (and to validate every
      # run first), the student stands in for it.
      grown = {kind: None if static_only else self.grown_model(kind, seed) for kind in c.teachers}
      for kind in c.teachers:
        model = grown[kind] or self.student_model
        add(f'teacher {kind}', self.teacher_dir(kind, seed),
            functools.partial(self.train_teacher, kind, seed),
            needs=(self.grown_path(kind, seed),),
            config=self.run_config(model, seed) if static_only or grown[kind] else None,
            teacher=self.teacher_name(kind))
      for kind in c.teachers:
        pair = self.run_config(self.student_model, seed,
                               teacher_model=grown[kind] or self.student_model,
                               teacher_workdir=self.teacher_dir(kind, seed))
        add(f'pair {kind}', self.pair_dir(kind, seed),
            functools.partial(self.distill_student, kind, seed),
            needs=(self.teacher_dir(kind, seed),),
            config=pair if static_only or grown[kind] else None,
            teacher=self.teacher_name(kind), student=student, row=True)
    return out

  def train_teacher(self, kind: str, seed: int) -> dict:
    """Trains the grown teacher ``kind`` (from scratch or from its grown weights)."""
    model = self.build_teacher(kind, seed)
    logging.info('Pipeline: training %s in %s', runs.display_name(model),
                 self.teacher_dir(kind, seed))
    return train_lib.train_and_evaluate(
        self.run_config(model, seed), self.teacher_dir(kind, seed),
        initial_variables=self.teacher_initial_variables(kind, seed))

  def distill_student(self, kind: str, seed: int) -> dict:
    """Distils the student from the trained teacher ``kind`` by ``run.distill``."""
    config = self.run_config(self.student_model, seed, teacher_model=self.build_teacher(kind, seed),
                             teacher_workdir=self.teacher_dir(kind, seed))
    return train_lib.run(config, self.pair_dir(kind, seed))

  # The whole pipeline ---------------------------------------------------------------
  def run(self, options: JobOptions = JobOptions()) -> dict:
    """Every task of this shard's seeds (``seeds[shard::num_shards]``); the report and
    the figure when one process runs every seed (else ``--mode=report`` writes them)."""
    with workdir_lib.Lock(self.workdir, runs.lock_name(options.shard, options.num_shards)):
      tasks = self.tasks()
      runs.check_experiment(self.config, self.workdir, tasks, record=True)
      trained = runs.run_tasks(tasks, shard=options.shard, num_shards=options.num_shards)
    if not runs.writes_report(options):
      logging.info('Shard %d/%d writes no report: run --mode=report once every shard has '
                   'finished.', options.shard, options.num_shards)
      return {'trained': trained, 'report': None, 'seeds': []}
    return {'trained': trained, **self.finish()}

  def finished_seeds(self) -> list[int]:
    """The seeds whose every task has finished."""
    return [s for s in self.config.seeds if all(t.done() for t in self.tasks([s]))]

  def finish(self) -> dict:
    """The report of the finished seeds and (once) the attention figure, from process 0."""
    seeds = self.finished_seeds()
    if not seeds:
      raise validation.ConfigError(
          f'no seed of config.seeds={tuple(self.config.seeds)} has finished in {self.workdir}; '
          'run the pipeline (or its shards) first')
    if jax.process_index() == 0:
      self.report(seeds)
      if not os.path.exists(os.path.join(self.workdir, FIGURE_FILE)):
        self.attention_figure(seeds[0])
    return {'report': os.path.join(self.workdir, runs.REPORT_FILE), 'seeds': seeds}

  def notes(self) -> list[str]:
    """The report's note when the student is not the paper's DARTS_V1-10 (C=16): the
    demo stand-in (:data:`~distill_jax.config_lib.DEMO_NETWORKS`), the paper's size with
    another genotype (the author's release builds DARTS_V2 by default), or another size."""
    paper, demo = config_lib.NETWORKS[PAPER_STUDENT], config_lib.DEMO_NETWORKS[PAPER_STUDENT]
    student = self.student_model
    differ = [k for k, v in paper.items() if student.get(k) != v]
    if not differ:
      return []
    name, paper_name = runs.display_name(student), runs.display_name(paper)
    if differ == ['genotype']:
      return [f'The student {name} has the size of the paper\'s {paper_name} with genotype '
              f'{student["genotype"]} (the author\'s release builds DARTS_V2 by default; the '
              'paper\'s table names DARTS_V1).']
    if all(student.get(k) == v for k, v in demo.items()):
      what = 'the demo stand-in (config_lib.DEMO_NETWORKS) of'
    else:
      size = lambda cfg: grow_lib.Layout.from_config(cfg, 3).count()
      what = 'smaller than' if size(student) < size(dict(student, **paper)) else 'larger than'
    return [f'The student {name} is {what} the paper\'s {paper_name}, and its teachers are '
            'grown from it: these are not the paper\'s networks.']

  def report(self, seeds: Sequence[int] | None = None) -> str:
    """report.md, report.csv and report_summary.csv over the finished runs of ``seeds``
    (default: all); the report names the other seeds and the runs not finished."""
    seeds = list(self.config.seeds if seeds is None else seeds)
    notes = self.notes()
    left_out = [s for s in self.config.seeds if s not in seeds]
    if left_out:
      notes.append(f'Seeds left out of the table (not every task has finished): '
                   f'{", ".join(map(str, left_out))}.')
    return runs.write_report(self.tasks(seeds), self.workdir,
                             title='Growing a difficult student into its teacher', notes=notes,
                             missing_from=self.tasks())

  def attention_figure(self, seed: int | None = None) -> str:
    """Maps at ``figure.point`` for the first ``figure.num_images`` test images of one
    seed's runs (default: the first of ``config.seeds``), each column labelled with its
    network, point and test error; ``attention.png``, ``attention.pdf`` and a TensorBoard
    image in the workdir."""
    c, d = self.config, self.dataset
    seed = c.seeds[0] if seed is None else seed
    images = jnp.asarray(d.test_images[:c.figure.num_images])
    x = data_lib.normalize(images, d.mean, d.std)
    shape = _input_shape(c.run)

    def column(name, model_config, workdir):
      net = teacher_lib.load_teacher(model_config, workdir, shape)
      _, points = net.model.apply(net.variables, x, train=False)
      point = points[c.figure.point]
      maps = np.asarray(losses.attention_map(point)).reshape(point.shape[0], *point.shape[1:3])
      error = loop.read_json(os.path.join(workdir, loop.RESULTS_FILE))['test_top1_error']
      where = f'{point_name(model_config, c.figure.point)}, {point.shape[1]}×{point.shape[2]}'
      return f'{name}\n{where}\ntest error {100 * error:.2f}%', maps

    columns = [column('student alone', self.student_model, self.student_dir(seed))]
    teachers = []
    for kind in c.teachers:
      model = self.build_teacher(kind, seed)
      name = self.teacher_name(kind)
      columns.append(column(f'student ← {name}', self.student_model, self.pair_dir(kind, seed)))
      teachers.append(column(f'teacher {name}', model, self.teacher_dir(kind, seed)))
    return figures.attention_figure(
        os.path.join(self.workdir, FIGURE_FILE), np.asarray(images) / 255.0, columns + teachers,
        title=f'Attention maps of {c.run.data.name} test images (seed {seed}; test error after '
              'the final epoch)', tensorboard_dir=self.workdir)


def point_name(model_config: dict, point: int) -> str:
  """The plain name of a DARTS network's attention point: ``'cell 0 output'`` (point 0),
  then the outputs of the two reduction cells (``layers // 3``, ``2 * layers // 3``)."""
  layers = model_config['layers']
  return f'cell {(0, layers // 3, 2 * layers // 3)[point]} output'


def run(config: ml_collections.ConfigDict, workdir: str,
        options: JobOptions = JobOptions()) -> dict:
  """``mode='train'`` runs (or resumes) the seeds ``seeds[shard::num_shards]``, then (one
  shard) reports; ``'report'`` and ``'evaluate'`` write the report and figure of the
  finished seeds (``'evaluate'`` only unsharded: one shard of several never writes
  them)."""
  validate(config)
  pipeline = Pipeline(config, workdir_lib.prepare(workdir))
  if options.mode == 'train':
    return pipeline.run(options)
  runs.check_experiment(config, pipeline.workdir, pipeline.tasks(), record=False)
  if not runs.writes_report(options):
    logging.info('Shard %d/%d writes no report: run --mode=report.', options.shard,
                 options.num_shards)
    return {'trained': [], 'report': None, 'seeds': []}
  return {'trained': [], **pipeline.finish()}
