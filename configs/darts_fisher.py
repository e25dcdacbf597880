r"""The paper's main experiment: grow a difficult DARTS student into its own teacher.

Student DARTS_V1 with 10 cells and C=16 (about 0.32M parameters) on CIFAR-10. Per seed:
train the student alone; measure per-channel Fisher information at its cell outputs;
build three teachers from it — 25 cells (depth), every cell widened to about twice the
parameters (uniform), and the cell holding the most important channel widened
repeatedly to about twice the parameters (fisher) —; train them; distill the student
from each with attention transfer (β = 1000 at cell 0 and the two reduction cells);
report mean ± std over 3 seeds and draw the attention maps.

Every run copies ``config.run`` (the student's model and the recipe, e.g.
``--config.run.num_epochs=...``, ``--config.run.distill.beta=...``); the teachers change
only its model. Recipe of the author's released code: 200 epochs, batch 64, SGD 0.1 ×0.2 at epochs
60/120/160, momentum 0.9, weight decay 5e-4, drop path 0.2, no auxiliary head. Each
run fits on one GPU and spreads over several (the global batch is sharded):

  python -m distill_jax.main --config=configs/darts_fisher.py --workdir=/tmp/darts_fisher \
      --config.run.data.data_dir=~/tensorflow_datasets

Expected (paper, CIFAR-10 top-1 error): student alone 8.47 ± 1.11, from the 25-cell
teacher 7.79 ± 0.30, from the uniform teacher 6.42 ± 0.17, from the Fisher teacher
6.40 ± 0.08. Stages are skipped when done and resume when killed, so the command can be
repeated. Options: ``--config.growth.teacher_init=grown`` trains teachers from the grown
weights instead of from scratch; ``--config.growth.operator=denser`` grows by halving
the group count of a cell's convolutions (the author's dissertation code) instead of
widening; ``--config.growth.function_preserving=True`` makes the grown network compute
the student's function (Net2WiderNet).

``:demo`` runs every stage with a 5-cell, C=4 student on the embedded digits data in a
few minutes on 2 CPU cores (the README's main command):

  python -m distill_jax.main --config=configs/darts_fisher.py:demo --workdir=/tmp/darts_fisher_demo
"""

import ml_collections

from distill_jax import config_lib


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo',), 'configs/darts_fisher.py')
  c = ml_collections.ConfigDict()
  c.job = 'darts_fisher'
  c.seeds = (0, 1, 2)
  c.teachers = ('depth', 'uniform', 'fisher')
  config_lib.experiment_fields(c)

  # The student and the recipe every run copies (teachers change only the model).
  c.run = config_lib.experiment_run(model='darts_v1_10', method='at')
  c.run.num_epochs = 200
  c.run.batch_size = 64
  c.run.optimizer.nesterov = False
  c.run.drop_path_prob = 0.2

  c.growth = ml_collections.ConfigDict()
  c.growth.target_param_ratio = 2.0
  c.growth.depth_layers = 25       # the depth teacher's cells
  c.growth.operator = 'widen'      # widen | denser
  c.growth.function_preserving = False
  c.growth.teacher_init = 'scratch'  # scratch (the paper) | grown

  c.fisher = ml_collections.ConfigDict()
  c.fisher.num_batches = 10        # Fisher is accumulated over this many training batches
  c.fisher.batch_size = 64

  c.figure = ml_collections.ConfigDict()
  c.figure.num_images = 4
  c.figure.point = 0               # which attention point to draw (0 = highest resolution)

  if 'demo' in variants:
    c.run = config_lib.demo(c.run)
    c.run.model = config_lib.network('darts_v1_10', demo=True)
    c.seeds = (0, 1)
    c.run.num_epochs = 3
    c.growth.depth_layers = 8
    c.fisher.num_batches = 2
    c.run.distill.beta = 50.0      # 8x8 maps: see configs/distill.py
    c.run.drop_path_prob = 0.0
  c.lock()
  return c
