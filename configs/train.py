r"""Train one CIFAR network from scratch (the foundation of every other experiment).

Full run, WRN-16-2 on CIFAR-10 with the attention-transfer recipe (200 epochs, batch
128, SGD 0.1 ×0.2 at epochs 60/120/160, weight decay 5e-4, Nesterov momentum 0.9):

  python -m distill_jax.main --config=configs/train.py --workdir=/tmp/wrn16_2 \
      --config.data.data_dir=~/tensorflow_datasets

Expected: about 6.3% top-1 test error (Zagoruyko & Komodakis 2016 report 6.31%).

Variants (comma-separated after the colon):
  :densenet  DenseNet-BC L=100 k=12 with its recipe (300 epochs, batch 64, ×0.1 at 150/225,
             weight decay 1e-4).
  :demo      the embedded scikit-learn digits (8x8x1) and a WRN-10-2: about a minute on
             2 CPU cores, ending near 1% test top-1 error.

  python -m distill_jax.main --config=configs/train.py:demo --workdir=/tmp/train_demo

Any field can be overridden, e.g. ``--config.model.depth=40 --config.seed=1``.
"""

from distill_jax import config_lib


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo', 'densenet'), 'configs/train.py')
  c = config_lib.train_config()
  if 'densenet' in variants:
    c.model = config_lib.network('densenet_bc_100_12')
    c.num_epochs = 300
    c.batch_size = 64
    c.optimizer.milestones = (150, 225)
    c.optimizer.decay_factor = 0.1
    c.optimizer.weight_decay = 1e-4
  if 'demo' in variants:
    c = config_lib.demo(c)
    if c.model.name == 'wrn':
      c.model.depth = 10
    else:
      c.model = config_lib.network('densenet_bc_100_12', demo=True)
  c.lock()
  return c
