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

``:release`` runs the author's release's recipe instead (github.com/DWhettam/
FisherDistillation): a DARTS_V2 student; Fisher measured as the release does (a freshly
initialised student, batch norm in training mode, drop path 0.2, one batch of 32 and an
SGD step per growth step: :func:`distill_jax.fisher.release_fisher_step`); growth by
densifying until the release's parameter measure exceeds 0.975 x 1.4M, cells in the
release's order, densified operations rebuilt whole (:mod:`distill_jax.grow.release`);
teachers trained from the grown weights. ``:release,demo`` runs it at demo size (goal 2x
the student's measure; about 12 minutes on 2 CPU cores, a third of it compiling the Fisher
step of each grown layout; at that size no teacher row is distinguishable from the student
alone):

  python -m distill_jax.main --config=configs/darts_fisher.py:release,demo --workdir=/tmp/release_demo The default keeps the paper's text: the trained student's
Fisher in inference mode (the quantity Fisher pruning's derivation assumes, examples
independent), ±3% of twice the student's trainable count.

``:demo`` runs every stage with a 5-cell, C=4 student on the embedded digits data in a
few minutes on 2 CPU cores (the README's main command):

  python -m distill_jax.main --config=configs/darts_fisher.py:demo --workdir=/tmp/darts_fisher_demo
"""

import ml_collections

from distill_jax import config_lib


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo', 'release'), 'configs/darts_fisher.py')
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
  c.growth.protocol = 'band'       # band (±3% of the ratio) | release (the author's loop)
  c.growth.param_goal = 0          # release only: absolute goal; 0 = ratio x the student's

  c.fisher = ml_collections.ConfigDict()
  c.fisher.protocol = 'trained'    # trained (inference-mode BN) | release (see :release)
  c.fisher.num_batches = 10        # batches per estimate (release: per growth step)
  c.fisher.batch_size = 64

  c.figure = ml_collections.ConfigDict()
  c.figure.num_images = 4
  c.figure.point = 0               # which attention point to draw (0 = highest resolution)

  if 'release' in variants:
    # The author's release (github.com/DWhettam/FisherDistillation, fisher_expand.py):
    # DARTS_V2 (its --std_arch default), Fisher on a fresh student in training mode, one
    # batch of 32 and an SGD step per growth step, densify until 0.975 x 1.4M of its
    # state-dict measure, teachers trained from the grown weights.
    c.run.model.genotype = 'DARTS_V2'
    c.growth.operator = 'denser'
    c.growth.protocol = 'release'
    c.growth.param_goal = 1_400_000
    c.growth.teacher_init = 'grown'
    c.fisher.protocol = 'release'
    c.fisher.num_batches = 1
    c.fisher.batch_size = 32
  if 'demo' in variants:
    c.run = config_lib.demo(c.run)
    c.run.model = config_lib.network('darts_v1_10', demo=True)
    c.seeds = (0, 1)
    c.run.num_epochs = 3
    c.growth.depth_layers = 8
    c.fisher.num_batches = 2
    c.run.distill.beta = 50.0      # 8x8 maps: see configs/distill.py
    c.run.drop_path_prob = 0.0
    if 'release' in variants:
      c.run.model.genotype = 'DARTS_V2'
      c.growth.param_goal = 0      # 2x the demo student's measure (1.4M is the CIFAR goal)
  c.lock()
  return c
