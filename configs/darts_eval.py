r"""Train a DARTS evaluation network from a genotype (Liu, Simonyan & Yang 2018).

The published CIFAR-10 recipe: DARTS_V2, 20 cells, C=36, 600 epochs, batch 96, SGD
0.025 cosine to 0, momentum 0.9, weight decay 3e-4, cutout 16, drop path 0.2 (ramped
linearly), auxiliary head weight 0.4, gradient-norm clip 5:

  python -m distill_jax.main --config=configs/darts_eval.py --workdir=/tmp/darts_v2 \
      --config.data.data_dir=~/tensorflow_datasets

Expected: 2.76 ± 0.09% test error (DARTS_V2), 3.00 ± 0.14% (DARTS_V1,
``--config.model.genotype=DARTS_V1``); 3.35M parameters without the auxiliary head.
A genotype found by configs/darts_search.py: ``--config.model.genotype=SEARCH_DIR/genotype.json``.

``:demo``: DARTS_V2 with 5 cells, C=8, auxiliary head and drop path on the embedded
digits data, about a minute on 2 CPU cores (a few percent test error):

  python -m distill_jax.main --config=configs/darts_eval.py:demo --workdir=/tmp/darts_demo
"""

import ml_collections

from distill_jax import config_lib


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo',), 'configs/darts_eval.py')
  c = config_lib.train_config()
  c.model = ml_collections.ConfigDict({
      'name': 'darts', 'genotype': 'DARTS_V2', 'layers': 20, 'init_channels': 36,
      'num_classes': 10, 'auxiliary': True})
  c.num_epochs = 600
  c.batch_size = 96
  c.data.cutout = 16
  c.optimizer.learning_rate = 0.025
  c.optimizer.schedule = 'cosine'
  c.optimizer.final_learning_rate = 0.0
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 3e-4
  c.optimizer.grad_clip_norm = 5.0
  c.aux_weight = 0.4
  c.drop_path_prob = 0.2
  if 'demo' in variants:
    c = config_lib.demo(c)
    c.model.layers = 5
    c.model.init_channels = 8
    c.num_epochs = 10
    c.data.cutout = 2
  c.lock()
  return c
