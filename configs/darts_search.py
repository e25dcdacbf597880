r"""DARTS architecture search (Liu, Simonyan & Yang, ICLR 2019): find a normal and a reduction cell.

A supernet of 8 cells (C=16; every edge a softmax mixture of the 8 DARTS operations) is
trained on half of the CIFAR-10 training set while its architecture parameters alphas
are trained on the other half: bilevel optimisation, 50 epochs, batch 64; weights by SGD
(lr 0.025 cosine to 0.001, momentum 0.9, weight decay 3e-4, clip 5), alphas by Adam
(lr 3e-4, betas (0.5, 0.999), weight decay 1e-3). Default: the second-order
architecture gradient (the paper's DARTS, "DARTS_V2"), exact Hessian-vector term by
automatic differentiation (``--config.hessian=finite_difference`` gives the release's
approximation). Writes ``genotype.json`` every epoch, ``alphas.png``,
``normal_cell.png``, ``reduce_cell.png`` and ``results.json`` at the end.

  python -m distill_jax.main --config=configs/darts_search.py --workdir=/tmp/darts_search \
      --config.data.data_dir=~/tensorflow_datasets

Expected result: the derived cells, trained from scratch as the evaluation network (20
cells, C=36, 600 epochs: ``configs/darts_eval.py`` with
``--config.model.genotype=WORKDIR/genotype.json``), give about 2.76 +- 0.09% (second
order) / 3.00 +- 0.14% (first order) CIFAR-10 test error in the paper, whose cells were
the best of four searches after a short evaluation; the genotype varies with the seed.
Expected runtime: not measured yet (no accelerator was available); per step, second
order costs 1.5-2x first order here (``benchmarks/darts_search.py``).
On 2 CPU cores a full-size step takes minutes: use an accelerator.

Variants (comma-separated after the colon):
  :first_order   ``order=1`` (DARTS first order, "DARTS_V1"; about 2x cheaper per step).
  :second_order  ``order=2`` (the default for the full search; opt-in for the demo).
  :demo          the embedded digits (8x8x1), a 5-cell supernet with C=4 (lax ops),
                 first order, 3 epochs of 22 steps (batch 32): about 1-1.5 minutes on 2
                 CPU cores (~25 s of it compiling), ending near 22% supernet validation
                 error (eval-mode BN) and a valid, after so few steps arbitrary, genotype.

  python -m distill_jax.main --config=configs/darts_search.py:demo --workdir=/tmp/search_demo
  python -m distill_jax.main --config=configs/darts_search.py:demo,second_order \
      --workdir=/tmp/search_demo2     # second order (exact): about 1.5-2 minutes

Any field can be overridden, e.g. ``--config.model.layers=5 --config.order=1``.
Short CPU runs with ``--config.hessian=finite_difference`` compile ~40 s faster with
``--config.arch.phase_scan=True`` (same result; see ``distill_jax/trainers/search.py``).
"""

import ml_collections

from distill_jax import config_lib


def search_config() -> ml_collections.ConfigDict:
  """Every field ``distill_jax.trainers.search.run_search`` reads, with the paper's search recipe."""
  c = ml_collections.ConfigDict()
  c.job = 'darts_search'
  c.seed = 0

  # The release's search augmentation (crop + flip); alphas train on the other half.
  c.data = config_lib.data_section(validation_fraction=0.5)

  c.model = ml_collections.ConfigDict()
  c.model.layers = 8                # cells of the supernet
  c.model.init_channels = 16        # C
  c.model.num_classes = 10
  c.model.stem_multiplier = 3
  c.model.impl = 'auto'             # darts_ops: auto (fast on CPU, lax on GPU/TPU) | fast | lax

  c.order = 2                       # 1: first order; 2: second order (virtual step)
  c.hessian = 'exact'               # exact | finite_difference (order 2 only)

  c.num_epochs = 50
  c.batch_size = 64                 # global; the same for the training and validation batch
  c.eval_batch_size = 256

  c.optimizer = ml_collections.ConfigDict()  # the weights
  c.optimizer.learning_rate = 0.025
  c.optimizer.schedule = 'cosine'   # cosine (per epoch) | constant
  c.optimizer.final_learning_rate = 0.001
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 3e-4
  c.optimizer.grad_clip_norm = 5.0

  c.arch = ml_collections.ConfigDict()  # the alphas
  c.arch.learning_rate = 3e-4
  c.arch.b1 = 0.5
  c.arch.b2 = 0.999
  c.arch.weight_decay = 1e-3
  c.arch.fd_epsilon = 0.01          # finite differences: eps = fd_epsilon / ||v||
  c.arch.reuse_train_grad = False   # order 2: True reuses grad_w L_train(w, alpha) for the
                                    # weight step (one pass fewer; Algorithm 1: False)
  c.arch.phase_scan = False         # first order / finite differences: one network copy in the
                                    # compiled step (shorter CPU compile, slower step)

  c.log_every_steps = 50
  config_lib.workdir_fields(c, checkpoint_every_steps=500)
  c.plot_every_epoch = False        # also redraw the pictures after every epoch
  c.num_devices = 0                 # 0 = every device of every process
  return c


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo', 'first_order', 'second_order'),
                                       'configs/darts_search.py')
  if {'first_order', 'second_order'} <= variants:
    raise ValueError('configs/darts_search.py: choose one of first_order, second_order')
  c = search_config()
  if 'demo' in variants:
    c.data.name = 'digits'
    c.data.crop_padding = 1
    c.data.flip = False             # a mirrored digit is another glyph
    c.model.layers = 5
    c.model.init_channels = 4
    c.model.impl = 'lax'            # at this size: same step time, ~3x shorter compile
    c.order = 1
    c.num_epochs = 3
    c.batch_size = 32
    c.eval_batch_size = 360
    c.log_every_steps = 11
    c.checkpoint_every_steps = 33
  if 'first_order' in variants:
    c.order = 1
  if 'second_order' in variants:
    c.order = 2
  c.lock()
  return c
