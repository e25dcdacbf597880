r"""Train one CIFAR network from scratch (the foundation of every other experiment).

Full run, WRN-16-2 on CIFAR-10 with the attention-transfer recipe (200 epochs, batch
128, SGD 0.1 ×0.2 at epochs 60/120/160, weight decay 5e-4, Nesterov momentum 0.9):

  python -m distill_jax.main --config=configs/train.py --workdir=/tmp/wrn16_2 \
      --config.data.data_dir=~/tensorflow_datasets

Expected: about 6.3% top-1 test error (Zagoruyko & Komodakis 2016 report 6.31%).

Demo, a WRN-10-2 on the embedded scikit-learn digits (8x8x1), about two minutes on
2 CPU cores, ending well under 5% test top-1 error:

  python -m distill_jax.main --config=configs/train.py:demo --workdir=/tmp/train_demo

Any field can be overridden, e.g. ``--config.model.depth=40 --config.seed=1``; a
different network: ``--config.model.name=densenet_bc`` together with its own fields
(``--config=configs/train.py:densenet`` gives DenseNet-BC L=100 k=12).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with CIFAR-10 defaults."""
  c = ml_collections.ConfigDict()
  c.job = 'train'
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'          # digits | cifar10 | cifar100
  c.data.data_dir = ''             # tfds data_dir ('' = tfds default); never downloads
  c.data.validation_fraction = 0.0  # part of the training split held out as 'val'
  c.data.crop_padding = 4          # random crop of the padded image
  c.data.pad_mode = 'constant'     # constant | reflect
  c.data.flip = True               # random horizontal flip
  c.data.cutout = 0                # cutout square size in pixels (0 = off)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'wrn'
  c.model.depth = 16
  c.model.widen_factor = 2
  c.model.num_classes = 10
  c.model.dropout_rate = 0.0

  c.num_epochs = 200
  c.batch_size = 128               # global, over all devices and hosts
  c.eval_batch_size = 500

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

  c.log_every_steps = 100
  c.eval_every_steps = 0           # 0 = once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.num_devices = 0                # 0 = every device of every process
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to the embedded digits data and a few CPU minutes."""
  c.data.name = 'digits'
  c.data.crop_padding = 1
  c.data.flip = False              # a mirrored digit is another glyph
  c.model.num_classes = 10
  c.num_epochs = 15
  c.batch_size = 64
  c.eval_batch_size = 360
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = 'cosine'
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 100
  return c


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  variants = set(filter(None, arg.split(',')))
  if 'densenet' in variants:
    c.model = ml_collections.ConfigDict(
        {'name': 'densenet_bc', 'depth': 100, 'growth_rate': 12, 'num_classes': 10})
    c.num_epochs = 300
    c.batch_size = 64
    c.optimizer.milestones = (150, 225)
    c.optimizer.decay_factor = 0.1
    c.optimizer.weight_decay = 1e-4
  if 'demo' in variants:
    c = demo(c)
    if c.model.name == 'wrn':
      c.model.depth = 10
  unknown = variants - {'demo', 'densenet'}
  if unknown:
    raise ValueError(f'configs/train.py:{arg}: unknown variant {sorted(unknown)[0]!r}; '
                     'allowed: demo, densenet (comma-separated)')
  c.lock()
  return c
