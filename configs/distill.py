r"""Train a student under a frozen teacher: KD, attention transfer, both, or hard labels.

Default: WRN-16-2 student, WRN-40-2 teacher, attention transfer (β = 1000 at the three
group outputs) on CIFAR-10 with the AT recipe (200 epochs, batch 128, SGD 0.1 ×0.2 at
60/120/160, weight decay 5e-4). With a teacher trained earlier by configs/train.py:

  python -m distill_jax.main --config=configs/train.py --workdir=/tmp/wrn40_2 \
      --config.model.depth=40
  python -m distill_jax.main --config=configs/distill.py --workdir=/tmp/wrn16_2_at \
      --config.distill.teacher_workdir=/tmp/wrn40_2

Expected: about 5.85% top-1 test error (Zagoruyko & Komodakis 2016 report 5.85% AT,
6.31% without a teacher, teacher 5.23%). Without ``teacher_workdir`` the teacher is
first trained in WORKDIR/teacher with the same recipe (doubling the time).

Methods (``--config.distill.method``): none | kd (α=0.9, T=4) | at | kd_at | hard, and
sp | nst | fsp | rkd | pkt | dkd | dist and the learned fitnet | vid | cc | crd (a
regressor, heads or CRD's memory bank trained with the student) alone or with KD
(kd_sp, ...), each with its published weight unless ``distill.beta`` is given
(distill_jax/trainers/methods.py).

Variants: each method's name picks it with its release recipe (``:kd``, ``:kd_at``,
``:sp``, ``:kd_rkd``...; ``:dkd`` also sets DKD's 20-epoch warm-up, ``:fsp`` FSP's
30-epoch initialisation stage, ``:crd`` CRD's 16,384 negatives;
``--config.distill.init_epochs=E`` with ``:fitnet`` gives Romero et al.'s hint stage);
``:demo`` runs teacher and student (small WRNs) on the embedded digits data in about
two minutes on 2 CPU cores (β = 50 for AT's 8x8 maps, DKD's warm-up and FSP's stage 1
epoch, CRD 512 negatives):

  python -m distill_jax.main --config=configs/distill.py:demo --workdir=/tmp/distill_demo
"""

from distill_jax import config_lib
from distill_jax.trainers import methods

METHOD_VARIANTS = methods.NAMES


def get_config(arg: str = ''):
  variants = config_lib.parse_variants(arg, ('demo', *METHOD_VARIANTS), 'configs/distill.py')
  chosen = [v for v in variants if v in METHOD_VARIANTS]
  c = config_lib.train_config()
  c.model = config_lib.network('wrn_16_2')
  method = chosen[0] if chosen else 'at'
  config_lib.distill_fields(c, teacher='wrn_40_2', method=method)
  config_lib.set_method(c.distill, method, demo='demo' in variants)
  if 'demo' in variants:
    c = config_lib.demo(c)
    c.num_epochs = 8
    c.model = config_lib.network('wrn_16_2', demo=True)
    c.distill.teacher_model = config_lib.network('wrn_40_2', demo=True)
    if method in ('at', 'kd_at'):
      # Each layer's AT term scales like 1/(H·W): 8x8 digits have 16x fewer positions
      # than 32x32 CIFAR, and β = 1000 would drown the cross-entropy there.
      c.distill.beta = 50.0
  c.lock()
  return c
