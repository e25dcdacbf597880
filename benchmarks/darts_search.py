r"""Benchmark of the DARTS search step: first order, exact and finite-difference second order.

Measures, on random 8x8 (or ``--image``) batches and one device, the steady-state time
of one compiled :func:`distill_jax.search.search_step` for ``order=1``,
``order=2, hessian='exact'`` and ``order=2, hessian='finite_difference'``, and of a plain
supernet forward + backward pass (the gradient in weights and alphas of the training
loss: the unit of work the search steps are made of; first order costs two of them).
Each timing is the median of ``--repeats`` calls after the first (compiling) call;
compile times are reported too. Prints a table and writes JSON with the ratios
``second_over_first_order`` (the DARTS paper's second-order search costs about 2-3
first-order steps; target here <= 3) and ``fd_over_first_order``.

  python benchmarks/darts_search.py --json out.json
  python benchmarks/darts_search.py --layers 8 --channels 16 --batch 64 --image 32 --json out.json

Small defaults (5 cells, C=8, batch 32, 8x8x1 images) keep it to a few minutes on 2
CPU cores, most of it compiling. References: Liu, Simonyan & Yang, "DARTS:
Differentiable Architecture Search" (ICLR 2019).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import data as data_lib
from distill_jax import search


def _batch(rng: np.random.Generator, batch: int, image: int, channels: int, classes: int) -> dict:
  return {'image': jnp.asarray(rng.integers(0, 256, (batch, image, image, channels)), jnp.uint8),
          'label': jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32),
          'mask': jnp.ones((batch,), jnp.float32)}


def _time(fn, args_fn, repeats: int) -> tuple[float, list[float]]:
  """(first call seconds incl. compile, steady-state seconds of ``repeats`` later calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args_fn()))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    args = args_fn()
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, times


def bench_search_step(base: dict, variant: dict, batches: tuple, repeats: int) -> dict:
  cfg = search.SearchConfig(**base, **variant)
  mesh = data_lib.make_mesh(1)
  state = data_lib.replicate(search.create_search_state(cfg, 0, (1, *batches[2])), mesh)
  step, _ = search.compile_search_steps(cfg, mesh)
  t = time.perf_counter()
  compiled = step.lower(state, batches[0], batches[1]).compile()
  compile_s = time.perf_counter() - t
  holder = {'state': state}

  def run(train, val):
    holder['state'], metrics = compiled(holder['state'], train, val)
    return metrics

  _, times = _time(run, lambda: (batches[0], batches[1]), repeats)
  return {'compile_s': compile_s, 'median_s': statistics.median(times), 'times_s': times}


def bench_forward_backward(base: dict, batches: tuple, repeats: int) -> dict:
  cfg = search.SearchConfig(**base, order=1)
  state = search.create_search_state(cfg, 0, (1, *batches[2]))
  losses = search.Losses(cfg.model(), jax.tree.map(jnp.asarray, state.batch_stats))
  images = data_lib.normalize(batches[0]['image'], cfg.mean, cfg.std)
  labels = batches[0]['label']
  fn = jax.jit(lambda p, a, x, y: {k: v for k, v in losses.grads(p, a, x, y).items()
                                   if k in ('loss', 'gw', 'ga')})
  args = (jax.tree.map(jnp.asarray, state.params), jax.tree.map(jnp.asarray, state.alphas),
          images, labels)
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  _, times = _time(compiled, lambda: args, repeats)
  return {'compile_s': compile_s, 'median_s': statistics.median(times), 'times_s': times}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=5, help='supernet cells (>= 3)')
  parser.add_argument('--channels', type=int, default=8, help='init_channels C')
  parser.add_argument('--batch', type=int, default=32, help='batch size (train and val)')
  parser.add_argument('--image', type=int, default=8, help='image height = width')
  parser.add_argument('--image-channels', type=int, default=1)
  parser.add_argument('--impl', default='lax', choices=('fast', 'lax'),
                      help='darts_ops implementation')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--no-reuse', action='store_true',
                      help='second order recomputes grad_w L_train after the alpha update')
  parser.add_argument('--only', default='', help='comma-separated subset of: fwd_bwd, first_order, '
                      'second_order_exact, second_order_fd')
  parser.add_argument('--json', default='', help='write the results here')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  shape = (args.image, args.image, args.image_channels)
  batches = (_batch(rng, args.batch, args.image, args.image_channels, 10),
             _batch(rng, args.batch, args.image, args.image_channels, 10), shape)
  base = dict(mean=(0.5,) * args.image_channels, std=(0.25,) * args.image_channels,
              layers=args.layers, init_channels=args.channels, impl=args.impl,
              reuse_train_grad=not args.no_reuse)
  runs = {
      'fwd_bwd': lambda: bench_forward_backward(base, batches, args.repeats),
      'first_order': lambda: bench_search_step(base, dict(order=1), batches, args.repeats),
      'second_order_exact': lambda: bench_search_step(
          base, dict(order=2, hessian='exact'), batches, args.repeats),
      'second_order_fd': lambda: bench_search_step(
          base, dict(order=2, hessian='finite_difference'), batches, args.repeats),
  }
  only = [x for x in args.only.split(',') if x] or list(runs)
  results = {}
  for name in only:
    results[name] = runs[name]()
    r = results[name]
    print(f'{name:20s} compile {r["compile_s"]:7.1f} s   step {1e3 * r["median_s"]:8.1f} ms '
          f'(median of {args.repeats})', flush=True)

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
        f'{args.image}x{args.image}, impl {args.impl}) | compile (s) | median step (ms) |')
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
