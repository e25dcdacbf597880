"""distill_jax: which teacher should a difficult student learn from?

Knowledge distillation and attention-transfer losses, CIFAR networks (Wide ResNet,
DenseNet-BC, DARTS), DARTS search, per-channel Fisher information and Fisher-guided
growth of a student into its teacher, in JAX/Flax.

Submodules are imported on first use, so ``import distill_jax.losses`` pulls in only
JAX (no TensorFlow, no Flax training machinery).
"""

import importlib

from distill_jax.losses import (at_loss, attention_map, cross_entropy, distillation_loss,
                                kd_loss)

__version__ = '0.1.0'

# The library (data, models, losses, fisher, grow), the trainers and the experiments.
_SUBMODULES = ('config_lib', 'data', 'experiments', 'fisher', 'genotypes', 'grow', 'jobs',
               'losses', 'models', 'options', 'trainers', 'validation')


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'distill_jax.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
