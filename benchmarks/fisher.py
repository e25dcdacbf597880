r"""Time of one Fisher batch over one plain forward + backward of the same network and batch.

  python benchmarks/fisher.py --json /tmp/fisher.json
  python benchmarks/fisher.py --model=wrn --image_size=32 --batch=64

The plain step is the training computation (``value_and_grad`` of the cross-entropy
with respect to the parameters, batch norm in training mode); the Fisher batch is
:func:`distill_jax.fisher.fisher_sums` (per-example activation gradients through
``jax.vmap``, batch norm in inference mode, no weight gradients). Both jitted; times
are medians over ``--repeats`` calls after compilation. Target: ratio <= 0.6.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax

from distill_jax import fisher as fisher_lib
from distill_jax import losses
from distill_jax import models

flags.DEFINE_enum('model', 'darts', ['darts', 'wrn', 'densenet_bc'], 'Network.')
flags.DEFINE_integer('image_size', 32, 'Square input size.')
flags.DEFINE_integer('channels', 3, 'Input channels.')
flags.DEFINE_integer('batch', 64, 'Batch size.')
flags.DEFINE_integer('repeats', 10, 'Timed calls after compilation.')
flags.DEFINE_string('json', '', 'Write the figures here as JSON.')
FLAGS = flags.FLAGS

NETWORKS = {
    'darts': dict(name='darts', genotype='DARTS_V1', layers=10, init_channels=16),
    'wrn': dict(name='wrn', depth=16, widen_factor=2),
    'densenet_bc': dict(name='densenet_bc', depth=40, growth_rate=12),
}


def median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compile_seconds(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def measure(model_name, image_size, channels, batch, repeats):
  model = models.create_model(**NETWORKS[model_name], num_classes=10)
  shape = (batch, image_size, image_size, channels)
  variables = models.init_variables(model, jax.random.key(0), (1, *shape[1:]))
  images = jax.random.normal(jax.random.key(1), shape)
  labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

  @jax.jit
  def forward_backward(params, batch_stats, images, labels):
    def loss(params):
      (logits, _), state = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                       train=True, mutable=['batch_stats'])
      return losses.cross_entropy(logits, labels), state
    return jax.value_and_grad(loss, has_aux=True)(params)

  plain = lambda: forward_backward(variables['params'], variables['batch_stats'], images, labels)
  fisher = lambda: fisher_lib.fisher_sums(model, variables, images, labels)
  result = {'model': model_name, 'input': list(shape), 'backend': jax.default_backend(),
            'device': jax.devices()[0].device_kind,
            'fwd_bwd_compile_s': compile_seconds(plain), 'fisher_compile_s': compile_seconds(fisher)}
  result['fwd_bwd_s'] = median_seconds(plain, repeats)
  result['fisher_s'] = median_seconds(fisher, repeats)
  result['fisher_over_fwd_bwd'] = result['fisher_s'] / result['fwd_bwd_s']
  return result


def main(argv):
  del argv
  result = measure(FLAGS.model, FLAGS.image_size, FLAGS.channels, FLAGS.batch, FLAGS.repeats)
  for key, value in result.items():
    print(f'{key:>22}: {value:.4f}' if isinstance(value, float) else f'{key:>22}: {value}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
