r"""The paper's first table: every teacher × student pair with attention transfer.

Teachers WRN-40-2, DenseNet-BC (L=40, k=36) and DARTS_V1 with 25 layers; students
WRN-16-2, DenseNet-BC (L=100, k=12) and DARTS_V1 with 10 layers (C=16), as in the
author's released code. Each teacher is trained once per seed, each student once per
seed alone (the N/A rows) and once per seed under each teacher (AT, β = 1000 at the
three stage outputs). Common recipe: 200 epochs, batch 128, SGD 0.1 ×0.2 at
60/120/160, Nesterov momentum 0.9, weight decay 5e-4; DARTS networks add drop path 0.2.

  python -m distill_jax.main --config=configs/teacher_student.py --workdir=/tmp/grid \
      --config.run.data.data_dir=~/tensorflow_datasets

Every run copies ``config.run`` (the recipe: ``--config.run.num_epochs=...``,
``--config.run.optimizer.learning_rate=...``, ``--config.run.distill.beta=...``) with
its own model, seed and teacher. Runs are independent workdirs under /tmp/grid; a re-run skips finished runs and
resumes killed ones. To spread runs over GPUs or machines, start one shard per GPU,
``python -m distill_jax.main --config=configs/teacher_student.py --workdir=/tmp/grid
--shard=i/n``, then ``--mode=report``. The table lands in WORKDIR/report.md and report.csv (paper: 5.7-8.5%
top-1 error on CIFAR-10; DARTS students worst whatever the teacher).

``config.methods`` sweeps distillation methods: each pair is then trained once per
method (``--config.methods=kd,at,sp``; any name of ``configs/distill.py``), and the
report gains a Method column. Empty (the default): ``config.run.distill.method`` alone.

``:demo`` runs the whole grid with small stand-ins of the same families on the
embedded digits data, 2 seeds, in a few minutes on 2 CPU cores:

  python -m distill_jax.main --config=configs/teacher_student.py:demo --workdir=/tmp/grid_demo

``:methods_demo``: one student (the WRN-16-2 stand-in) under one teacher (the WRN-40-2
stand-in) by every method alone (kd, at, kd_at, hard, sp, nst, fsp, rkd, pkt, dkd, dist,
fitnet, vid, cc, crd), each at its published weight and its release recipe at the demo's
scale (DKD's warm-up and FSP's initialisation stage 1 epoch, CRD 512 negatives), 2 seeds,
on digits:

  python -m distill_jax.main --config=configs/teacher_student.py:methods_demo \
      --workdir=/tmp/methods_demo
"""

import ml_collections

from distill_jax import config_lib
from distill_jax.trainers import methods as methods_lib

# Every method alone (RepDistiller's kd_<method> combinations left out), for :methods_demo.
METHODS_DEMO = tuple(m for m in methods_lib.NAMES
                     if m != 'none' and (m == 'kd_at' or not m.startswith('kd_')))


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo', 'methods_demo'),
                                       'configs/teacher_student.py')
  c = ml_collections.ConfigDict()
  c.job = 'teacher_student'
  c.teachers = ('wrn_40_2', 'densenet_bc_40_36', 'darts_v1_25')
  c.students = ('wrn_16_2', 'densenet_bc_100_12', 'darts_v1_10')
  c.seeds = (0, 1, 2)
  c.methods = ()                   # distillation methods to sweep; () = run.distill.method
  c.demo_networks = False          # use config_lib.DEMO_NETWORKS stand-ins
  c.darts_drop_path_prob = 0.2     # drop path of the DARTS runs (other families have none)
  c.shard_wait_timeout_s = 86400.0  # a shard waits this long for a teacher another trains
  config_lib.experiment_fields(c)
  # The recipe every run copies (its model, seed and teacher are set per run).
  c.run = config_lib.experiment_run(method='at')
  if 'demo' in variants or 'methods_demo' in variants:
    c.run = config_lib.demo(c.run)
    c.demo_networks = True
    c.seeds = (0, 1)
    c.run.num_epochs = 3
    c.run.distill.beta = 50.0      # 8x8 maps: see configs/distill.py
    c.darts_drop_path_prob = 0.0
  if 'methods_demo' in variants:
    c.teachers, c.students = ('wrn_40_2',), ('wrn_16_2',)
    c.methods = METHODS_DEMO
    c.run.distill.beta = None      # each method's published weight
    c.run.num_epochs = 2
  c.lock()
  return c
