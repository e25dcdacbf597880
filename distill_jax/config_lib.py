"""Building blocks of the experiment configs in ``configs/``: defaults, networks, demo sizes.

The files in ``configs/`` stay short by composing these; every field a job reads is
created here, so a locked config rejects unknown keys.
"""

from __future__ import annotations

import contextlib
import inspect

import ml_collections

from distill_jax import connectors
from distill_jax import losses

# The paper's networks (and the author's released code): name -> model config.
NETWORKS = {
    'wrn_16_2': {'name': 'wrn', 'depth': 16, 'widen_factor': 2},
    'wrn_40_2': {'name': 'wrn', 'depth': 40, 'widen_factor': 2},
    'densenet_bc_100_12': {'name': 'densenet_bc', 'depth': 100, 'growth_rate': 12},
    'densenet_bc_40_36': {'name': 'densenet_bc', 'depth': 40, 'growth_rate': 36},
    'darts_v1_10': {'name': 'darts', 'genotype': 'DARTS_V1', 'layers': 10, 'init_channels': 16},
    'darts_v1_25': {'name': 'darts', 'genotype': 'DARTS_V1', 'layers': 25, 'init_channels': 16},
}

# Stand-ins of the same families small enough for 8x8 digits on 2 CPU cores.
DEMO_NETWORKS = {
    'wrn_16_2': {'name': 'wrn', 'depth': 10, 'widen_factor': 2},  # the teacher's widths, as WRN-16-2
    'wrn_40_2': {'name': 'wrn', 'depth': 16, 'widen_factor': 2},
    'densenet_bc_100_12': {'name': 'densenet_bc', 'depth': 16, 'growth_rate': 6},
    'densenet_bc_40_36': {'name': 'densenet_bc', 'depth': 22, 'growth_rate': 12},
    'darts_v1_10': {'name': 'darts', 'genotype': 'DARTS_V1', 'layers': 5, 'init_channels': 4},
    'darts_v1_25': {'name': 'darts', 'genotype': 'DARTS_V1', 'layers': 8, 'init_channels': 8},
}


def network(key: str, *, num_classes: int = 10, demo: bool = False) -> ml_collections.ConfigDict:
  """The model config of one of the paper's networks (its demo stand-in with ``demo``)."""
  table = DEMO_NETWORKS if demo else NETWORKS
  if key not in table:
    raise ValueError(f'network {key!r} is not known; known: {", ".join(table)}')
  return ml_collections.ConfigDict({**table[key], 'num_classes': num_classes})


def data_section(validation_fraction: float = 0.0) -> ml_collections.ConfigDict:
  """The dataset and its augmentation (CIFAR-10 defaults: 4-px padded crop and flip)."""
  d = ml_collections.ConfigDict()
  d.name = 'cifar10'          # digits | cifar10 | cifar100 | another tfds name | a registered one
  d.data_dir = ''             # tfds data_dir ('' = tfds default); never downloads
  d.validation_fraction = validation_fraction  # part of the training split held out as 'val'
  d.crop_padding = 4          # random crop of the padded image
  d.pad_mode = 'constant'     # constant | reflect
  d.flip = True               # random horizontal flip
  d.cutout = 0                # cutout square size in pixels (0 = off)
  return d


def train_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with the CIFAR-10 WRN recipe as defaults
  (200 epochs, batch 128, SGD 0.1 ×0.2 at 60/120/160, Nesterov 0.9, weight decay 5e-4)."""
  c = ml_collections.ConfigDict()
  c.job = 'train'
  c.seed = 0

  c.data = data_section()

  c.model = network('wrn_16_2')  # or your own: models.register_model, 'package.module:Class'
  c.model.dropout_rate = 0.0

  c.num_epochs = 200
  c.batch_size = 128               # global, over all devices and hosts
  c.eval_batch_size = 512          # padded batches: any size scores the whole split

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = 'multistep'  # constant | cosine | multistep
  c.optimizer.milestones = (60, 120, 160)  # epochs, for multistep
  c.optimizer.decay_factor = 0.2
  c.optimizer.final_learning_rate = 0.0  # for cosine
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping

  c.aux_weight = 0.0               # DARTS auxiliary head loss weight (0 = no head)
  c.drop_path_prob = 0.0           # DARTS drop path, ramped linearly over the epochs

  c.compute_dtype = 'float32'      # float32 | bfloat16 (params, optimizer state stay float32)

  c.log_every_steps = 100
  c.eval_every_steps = 0           # 0 = once per epoch
  workdir_fields(c)
  c.num_devices = 0                # 0 = every device of every process
  return c


def workdir_fields(c: ml_collections.ConfigDict, *, checkpoint_every_steps: int = 1000
                   ) -> ml_collections.ConfigDict:
  """How a run keeps its workdir: checkpoint cadence and the changes a resume accepts."""
  c.checkpoint_every_steps = checkpoint_every_steps
  c.checkpoint_every_seconds = 0.0  # also save after this much wall time (0 = off)
  c.keep_checkpoints = 3
  # Comma-separated fields (or sections) a resume may change, e.g. 'num_epochs' to extend a
  # finished run; any other difference from WORKDIR/config.json is refused.
  c.allow_resume_changes = ''
  return c


def _default(fn, name: str):
  """The default of keyword ``name`` of ``fn``: each loss default lives in its function."""
  return inspect.signature(fn).parameters[name].default


def distill_section(method: str = 'at') -> ml_collections.ConfigDict:
  """The distillation method and its weights (KD: Hinton et al. 2015; AT: Zagoruyko &
  Komodakis 2016, β at the three stage outputs); defaults from
  :func:`distill_jax.losses.distillation_loss`."""
  d = ml_collections.ConfigDict()
  # none | kd | at | kd_at | hard, or sp | nst | fsp | rkd | pkt | dkd | dist and the learned
  # fitnet | vid | cc | crd, alone or with KD: kd_sp ...
  # (distill_jax.trainers.methods)
  d.method = method
  d.alpha = _default(losses.distillation_loss, 'alpha')              # KD weight of the soft term
  d.temperature = _default(losses.distillation_loss, 'temperature')  # KD (and DKD) temperature T
  # The method's weight; None: its published one (AT 1000, SP 3000, NST 50, FSP 50, RKD 1,
  # PKT 3e4, DKD 1, DIST 1, FitNet 100, VID 1, CC 0.02, CRD 0.8: methods.DEFAULT_BETA).
  d.beta = ml_collections.config_dict.placeholder(float)
  d.at_form = _default(losses.distillation_loss, 'at_form')  # released (squared, mean) | l2 (Eq. 2)
  d.warmup_epochs = 0.0  # DKD only: its term ramps up linearly over these epochs (release: 20)
  # FSP and FitNets only: first train the student's layers below its classifier on the
  # method's loss alone for this many epochs, then train as usual without it (RepDistiller's
  # FSP: 30; Romero et al.'s FitNets: hints, then KD with kd_fitnet).
  d.init_epochs = 0
  # CRD only (RepDistiller train_student.py defaults): negatives per example, temperature,
  # momentum of the memory bank.
  d.nce_k = connectors.NCE_K
  d.nce_t = connectors.NCE_T
  d.nce_m = connectors.NCE_M
  return d


# Each method's release recipe beyond its weight: (field, full value, demo value).
METHOD_RECIPES = {
    'dkd': ('warmup_epochs', 20.0, 1.0),   # mdistiller CFG.DKD.WARMUP
    'fsp': ('init_epochs', 30, 1),         # RepDistiller --init_epochs
    'crd': ('nce_k', connectors.NCE_K, 512),  # demo: digits has ~1,300 examples per split
}


def set_method(distill: ml_collections.ConfigDict, method: str, *, demo: bool = False) -> None:
  """Sets ``distill.method`` and its release recipe (:data:`METHOD_RECIPES`: DKD's
  warm-up, FSP's initialisation stage, CRD's negatives), at the demo's scale with
  ``demo``; the other methods' fields return to their defaults."""
  fresh = distill_section(method)
  distill.method = method
  for field, _, _ in METHOD_RECIPES.values():
    distill[field] = fresh[field]
  base = method[3:] if method.startswith('kd_') else method
  if base in METHOD_RECIPES:
    field, full, small = METHOD_RECIPES[base]
    distill[field] = small if demo else full


def distill_fields(c: ml_collections.ConfigDict, *, teacher: str = 'wrn_40_2',
                   method: str = 'at') -> ml_collections.ConfigDict:
  """Adds the ``distill`` section: the method, its weights and the frozen teacher.

  ``distill.teacher_workdir``: an earlier run's workdir (its latest checkpoint) or one
  checkpoint folder ``WORKDIR/checkpoints/STEP``; empty means "train the teacher first
  in ``WORKDIR/teacher`` with this config's recipe".
  """
  c.job = 'distill'
  c.distill = distill_section(method)
  c.distill.teacher_model = network(teacher, num_classes=c.model.num_classes)
  c.distill.teacher_workdir = ''
  c.distill.teacher_allow_unfinished = False  # True: a teacher run without results.json
  return c


def experiment_run(*, model: str | None = None, method: str = 'at') -> ml_collections.ConfigDict:
  """``config.run`` of an experiment made of many runs (the grid, the pipeline): the
  training recipe every run copies, with a ``distill`` section for its distillations.

  The experiment sets each run's seed, teacher and (without ``model``) network, so
  those fields are not here: nothing in ``config.run`` is overridden or ignored.
  """
  c = train_config()
  del c['job']
  del c['seed']
  del c['allow_resume_changes']  # the experiment's own field names what each run may change
  if model is None:
    del c['model']
  else:
    c.model = network(model)
  c.distill = distill_section(method)
  return c


def experiment_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields of an experiment made of runs (the grid, the pipeline) beside ``run``."""
  # Comma-separated fields a rerun may change (e.g. 'run.num_epochs': finished runs are then
  # extended); seeds and teachers may always be added.
  c.allow_resume_changes = ''
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to the embedded digits data and a few CPU minutes."""
  c.data.name = 'digits'
  c.data.crop_padding = 1
  c.data.flip = False              # a mirrored digit is another glyph
  c.num_epochs = 15
  c.batch_size = 64
  c.eval_batch_size = 360
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = 'cosine'
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 100
  return c


def set_fields(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets dotted fields, e.g. ``{'model.layers': 5, 'seeds': (0,)}``; returns ``c``."""
  for key, value in values.items():
    *parents, leaf = key.split('.')
    target = c
    for part in parents:
      target = target[part]
    target[leaf] = value
  return c


def parse_variants(arg: str, allowed: tuple[str, ...], config_file: str) -> set[str]:
  """``'demo,densenet'`` -> {'demo', 'densenet'}; an unknown variant is a one-line error."""
  variants = set(filter(None, (arg or '').split(',')))
  unknown = sorted(variants - set(allowed))
  if unknown:
    raise ValueError(f'{config_file}:{arg}: unknown variant {unknown[0]!r}; allowed: '
                     f'{", ".join(allowed)} (comma-separated)')
  return variants


_PAUSED: list[str] = []  # non-empty while a traced config serialises itself


class _TracedConfigDict(ml_collections.ConfigDict):
  """A ConfigDict that records the dotted path of every leaf it is asked for.

  Copies (``copy.deepcopy``, as experiments make of ``config.run``) keep recording into
  the same set under the original paths; ``to_dict`` and printing record nothing.
  """

  def __getitem__(self, key):
    value = super().__getitem__(key)
    if not _PAUSED and not isinstance(value, ml_collections.ConfigDict):
      prefix, reads = self.__dict__['_trace']
      reads.add(prefix + str(key))
    return value

  def _unrecorded(name):  # pylint: disable=no-self-argument
    def method(self, *args, **kwargs):
      _PAUSED.append(name)
      try:
        return getattr(ml_collections.ConfigDict, name)(self, *args, **kwargs)
      finally:
        _PAUSED.pop()
    return method

  to_dict = _unrecorded('to_dict')
  to_json = _unrecorded('to_json')
  __str__ = _unrecorded('__str__')
  __repr__ = _unrecorded('__repr__')
  __eq__ = _unrecorded('__eq__')
  __hash__ = None

  def __deepcopy__(self, memo):
    copied = ml_collections.ConfigDict(self.to_dict())
    if self.is_locked:
      copied.lock()
    _trace_in_place(copied, *self.__dict__['_trace'])
    return copied


def _trace_in_place(config: ml_collections.ConfigDict, prefix: str, reads: set) -> None:
  object.__setattr__(config, "__class__", _TracedConfigDict)
  config.__dict__['_trace'] = (prefix, reads)
  for key in config.keys():
    child = config._fields[key]  # pylint: disable=protected-access  (no read recorded)
    if isinstance(child, ml_collections.ConfigDict):
      _trace_in_place(child, f'{prefix}{key}.', reads)


@contextlib.contextmanager
def unrecorded_reads():
  """Within it, reads of traced configs are not recorded (e.g. the validation's, which
  reads every field without using any)."""
  _PAUSED.append('unrecorded_reads')
  try:
    yield
  finally:
    _PAUSED.pop()


def trace_reads(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, set]:
  """``(config, reads)``: the config (changed in place) now adds to ``reads`` the dotted
  path of each field read from it or from its copies; for checking that a job reads
  every field it is given."""
  reads: set[str] = set()
  _trace_in_place(config, '', reads)
  return config, reads


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  """The dotted paths of every leaf field of ``config``."""
  paths = set()
  for key in config.keys():
    child = config._fields[key]  # pylint: disable=protected-access
    if isinstance(child, ml_collections.ConfigDict):
      paths |= leaf_paths(child, f'{prefix}{key}.')
    else:
      paths.add(f'{prefix}{key}')
  return paths
