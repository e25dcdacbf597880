r"""Benchmark of the DARTS search step: first order, exact and finite-difference second order.

Measures, on random 8x8 (or ``--image``) batches and one device, the steady-state time
of one compiled :func:`distill_jax.trainers.search_step.search_step` for ``order=1``,
``order=2, hessian='exact'`` and ``order=2, hessian='finite_difference'``, and of a plain
supernet forward + backward pass (the gradient in weights and alphas of the training
loss: the unit of work the search steps are made of; first order costs two of them).
Everything is compiled and called once first; then ``--repeats`` rounds call each
variant once in turn (so that load from other processes hits all alike), and each
timing is the median of its rounds. Compile times are reported too. Prints a table and
writes JSON with the ratios ``second_over_first_order`` (the DARTS paper's second-order
search costs about 2-3 first-order steps; target here <= 3) and ``fd_over_first_order``.
``--phase-scan`` times the steps with ``arch.phase_scan`` (first order and finite
differences as one ``lax.scan`` around one network copy: shorter compiles, slower steps).

  python benchmarks/darts_search.py --json out.json
  python benchmarks/darts_search.py --layers 5 --channels 4 --only first_order,second_order_fd \
      [--phase-scan]      # the :demo sizes
  python benchmarks/darts_search.py --layers 8 --channels 16 --batch 64 --image 32 --json out.json

Small defaults (5 cells, C=8, batch 32, 8x8x1 images) keep it to a few minutes on 2
CPU cores, most of it compiling. References: Liu, Simonyan & Yang, "DARTS:
Differentiable Architecture Search" (ICLR 2019, arXiv:1806.09055).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax.models import darts_ops
from distill_jax.trainers import search
from distill_jax.trainers import search_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(rng: np.random.Generator, batch: int, image: int, channels: int, classes: int) -> dict:
  return {'image': jnp.asarray(rng.integers(0, 256, (batch, image, image, channels)), jnp.uint8),
          'label': jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32),
          'mask': jnp.ones((batch,), jnp.float32)}


def search_setup(args: argparse.Namespace, **fields) -> search_step.SearchSetup:
  """The step pieces of ``configs/darts_search.py`` (the full search's recipe) with the
  benchmark's network and ``fields`` (dotted names) set."""
  config = load_search_config()
  values = {'model.layers': args.layers, 'model.init_channels': args.channels,
            'model.impl': args.impl, 'arch.reuse_train_grad': args.reuse,
            'arch.phase_scan': args.phase_scan, **fields}
  config = config_lib.set_fields(config, values)
  search.validate(config)
  channels = args.image_channels
  return search_step.build_setup(config, mean=(0.5,) * channels, std=(0.25,) * channels,
                            steps_per_epoch=1)


def load_search_config():
  spec = importlib.util.spec_from_file_location(
      'configs_darts_search', os.path.join(REPO, 'configs', 'darts_search.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('')
  config.unlock()
  return config


def prepare_search_step(setup: search_step.SearchSetup, batches: tuple) -> tuple[float, Callable]:
  """(compile seconds, a zero-argument callable running one step and waiting for it)."""
  mesh = data_lib.make_mesh(1)
  holder = {'state': data_lib.replicate(search_step.create_search_state(setup, 0, (1, *batches[2])),
                                        mesh)}
  step, _ = search_step.jit_search_steps(setup, mesh)
  t = time.perf_counter()
  compiled = step.lower(holder['state'], batches[0], batches[1]).compile()
  compile_s = time.perf_counter() - t

  def run():
    holder['state'], metrics = compiled(holder['state'], batches[0], batches[1])
    jax.block_until_ready(metrics)

  run()  # the first call (allocation, warm-up) is not timed
  return compile_s, run


def prepare_forward_backward(setup: search_step.SearchSetup, batches: tuple) -> tuple[float, Callable]:
  """The gradient of the training loss in weights and alphas (train-mode BN)."""
  state = search_step.create_search_state(setup, 0, (1, *batches[2]))
  losses = search_step.Losses(setup.model, jax.tree.map(jnp.asarray, state.batch_stats))
  images = setup.normalize(batches[0]['image'])
  fn = jax.jit(lambda p, a, x, y: (lambda out: (out.loss, out.grad))(losses.grads(p, a, x, y)))
  args = (jax.tree.map(jnp.asarray, state.params), jax.tree.map(jnp.asarray, state.alphas),
          images, batches[0]['label'])
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t

  def run():
    jax.block_until_ready(compiled(*args))

  run()
  return compile_s, run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=5, help='supernet cells (>= 3)')
  parser.add_argument('--channels', type=int, default=8, help='init_channels C')
  parser.add_argument('--batch', type=int, default=32, help='batch size (train and val)')
  parser.add_argument('--image', type=int, default=8, help='image height = width')
  parser.add_argument('--image-channels', type=int, default=1)
  parser.add_argument('--impl', default='lax', choices=darts_ops.IMPLS,
                      help='darts_ops implementation')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--reuse', action='store_true',
                      help='second order: arch.reuse_train_grad (the weight step reuses grad_w '
                      'L_train from before the alpha update; default: recompute it, as Algorithm 1)')
  parser.add_argument('--phase-scan', action='store_true',
                      help='first order / finite differences: arch.phase_scan (one network copy '
                      'in the compiled step)')
  parser.add_argument('--only', default='', help='comma-separated subset of: fwd_bwd, first_order, '
                      'second_order_exact, second_order_fd')
  parser.add_argument('--json', default='', help='write the results here')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  shape = (args.image, args.image, args.image_channels)
  batches = (_batch(rng, args.batch, args.image, args.image_channels, 10),
             _batch(rng, args.batch, args.image, args.image_channels, 10), shape)
  prepare = {
      'fwd_bwd': lambda: prepare_forward_backward(search_setup(args, order=1), batches),
      'first_order': lambda: prepare_search_step(search_setup(args, order=1), batches),
      'second_order_exact': lambda: prepare_search_step(
          search_setup(args, order=2, hessian='exact'), batches),
      'second_order_fd': lambda: prepare_search_step(
          search_setup(args, order=2, hessian='finite_difference'), batches),
  }
  only = [x for x in args.only.split(',') if x] or list(prepare)
  compiled = {}
  for name in only:
    compiled[name] = prepare[name]()
    print(f'{name:20s} compiled in {compiled[name][0]:6.1f} s', flush=True)
  # Round-robin repeats, so that load from other processes hits every variant alike.
  times = {name: [] for name in only}
  for _ in range(args.repeats):
    for name in only:
      t = time.perf_counter()
      compiled[name][1]()
      times[name].append(time.perf_counter() - t)
  results = {name: {'compile_s': compiled[name][0], 'median_s': statistics.median(times[name]),
                    'times_s': times[name]} for name in only}

  out = {'settings': {**{k: v for k, v in vars(args).items() if k != 'json'},
                      'devices': str(jax.devices()[0].device_kind),
                      'backend': jax.default_backend(),
                      'cpu_count': os.cpu_count(), 'jax': jax.__version__,
                      'python': platform.python_version()},
         'results': results}
  first = results.get('first_order', {}).get('median_s')
  if first:
    for key, name in (('second_over_first_order', 'second_order_exact'),
                      ('fd_over_first_order', 'second_order_fd'),
                      ('first_order_over_fwd_bwd', None)):
      if name is None and 'fwd_bwd' in results:
        out[key] = first / results['fwd_bwd']['median_s']
      elif name in results:
        out[key] = results[name]['median_s'] / first
  out['compile_s'] = {k: v['compile_s'] for k, v in results.items()}

  print()
  print(f'| step ({args.layers} cells, C={args.channels}, batch {args.batch}, '
        f'{args.image}x{args.image}, impl {args.impl}{", phase scan" if args.phase_scan else ""})'
        ' | compile (s) | median step (ms) |')
  print('|---|---:|---:|')
  for name, r in results.items():
    print(f'| {name} | {r["compile_s"]:.1f} | {1e3 * r["median_s"]:.1f} |')
  for key in ('second_over_first_order', 'fd_over_first_order', 'first_order_over_fwd_bwd'):
    if key in out:
      print(f'{key}: {out[key]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
